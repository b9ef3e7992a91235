"""The guest agent's channel in a Firecracker microVM, run in the guest before the agent.

Firecracker gives a guest no virtio-serial port, only a vsock device, whose host end is a
Unix socket: Shuttle connects to it and asks for a guest port (`CONNECT 52`), and Firecracker
forwards the connection to whoever listens on that port in the guest, or closes it when
nobody does. This program is that listener: it takes one connection, makes it the standard
input and output of the program it was given (the guest agent, unchanged from the other
tiers), and becomes that program, so the agent is still the guest's PID 1 and its end still
ends the guest. One connection only: a second `CONNECT` finds nobody listening.

    python3 -I -S vsock_stdio.py PORT PROGRAM [ARG...]

Standard library only, like the agent. AF_VSOCK is looked up when it runs, not when it is
imported, so the module loads on a Python built without it and fails, saying so, only there.
"""

from __future__ import annotations

import os
import socket
import sys

__all__ = ["PORT", "main", "serve"]

# The guest port the agent listens on. Any port works; this one is Firecracker's example.
PORT = 52
# Linux's values, for a Python whose socket module lacks the names.
_AF_VSOCK = 40
_VMADDR_CID_ANY = 0xFFFFFFFF


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: vsock_stdio.py PORT PROGRAM [ARG...]", file=sys.stderr)
        return 2
    port = int(argv[0])
    try:
        listener = socket.socket(getattr(socket, "AF_VSOCK", _AF_VSOCK), socket.SOCK_STREAM)
        listener.bind((getattr(socket, "VMADDR_CID_ANY", _VMADDR_CID_ANY), port))
        listener.listen(1)
    except OSError as e:
        print(f"treadle: cannot listen on vsock port {port}: {e}", file=sys.stderr)
        return 1
    return serve(listener, argv[1:])


def serve(listener: socket.socket, command: list[str]) -> int:
    """Take one connection on `listener` and become `command` with it as stdin and stdout;
    returns only where that fails."""
    try:
        connection, _ = listener.accept()
    except OSError as e:
        print(f"treadle: cannot accept the host's connection: {e}", file=sys.stderr)
        return 1
    listener.close()
    fd = connection.detach()
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    if fd > 1:
        os.close(fd)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"treadle: cannot run {command[0]}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
