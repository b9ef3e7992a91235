"""Gauge on the node (DESIGN §13): what each workload used, measured and sent to Weaver."""
