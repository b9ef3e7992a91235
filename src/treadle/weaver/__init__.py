"""Weaver: the control plane (API, state, scheduler loop, metering ledger)."""
