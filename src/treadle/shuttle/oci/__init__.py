"""OCI bundles, images and runtime tools for the `oci` and `gvisor` tiers (DESIGN §4)."""
