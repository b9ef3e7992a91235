"""The sandbox layer every isolation tier shares (DESIGN §8, §10): the policy of what a
sandbox may do (`seccomp`: one denylist, rendered as a BPF filter and as an OCI profile),
resource groups (`cgroups`: create, limit, join, freeze, read, kill, remove, sweep), how a
sandboxed program ended (`exits`), and cleanup kept off the path of the exit report
(`cleanup`). A tier describes how it builds its boundary; what the boundary enforces is
decided here, once."""
