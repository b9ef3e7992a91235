"""The microvm tier (DESIGN §14): one virtual machine per workload, Shuttle on the host.

`image` builds the guest (a kernel from Debian's package, an initramfs with the guest agent
and the Python it runs on), `qemu` boots it with QEMU's `microvm` machine, and the guest agent
speaks the same frames as in every other tier over a virtio-serial port.
"""
