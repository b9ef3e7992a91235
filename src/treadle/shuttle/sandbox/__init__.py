"""The sandbox layer every isolation tier shares (DESIGN §8, §10): the policy of what a
sandbox may do (`policy`: the seccomp denylist, rendered as a BPF filter and as an OCI
profile), resource groups (`treadle.shuttle.cgroups`), how a sandboxed program ended
(`exits`), and cleanup kept off the path of the exit report (`cleanup`). A tier describes
how it builds its boundary; what the boundary enforces is decided here, once."""
