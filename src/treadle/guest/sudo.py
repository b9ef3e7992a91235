"""`sudo` inside a sandbox: run a command as another of the sandbox's users (root by default).

A sandbox's processes run under `no_new_privs` and own no host id, so a set-uid program
cannot raise anyone's privileges there. This program asks the guest agent instead, which is
the sandbox's root (`treadle.guest.agent`): it sends the command, its working directory, the
caller's environment and its own stdin, stdout and stderr (as descriptors) over the agent's
socket, the agent starts the command as the user asked with those descriptors, and this
program waits, forwards the signals it gets, and exits as the command did. Only the sandbox's
own user and root may ask (the agent checks the caller's uid); root here is the sandbox's
root, with exactly what an exec as `root` gets, and nothing of the host's.

It runs on the agent's runtime, as `-I -S` (no site, no PYTHON* variables), with the standard
library only. Options are sudo's (`sudo -h`); those about passwords are accepted and do
nothing, as no password is ever asked.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import sys

# Where the agent listens: an abstract socket's name, seen only in the sandbox's own network
# namespace (Shuttle tells the agent, by TREADLE_AGENT_SUDO).
SOCKET_NAME = "treadle/sudo"
# What one request may be, the caller's environment included (a SOCK_SEQPACKET message).
MAX_REQUEST = 128 * 1024
VERSION = "treadle sudo 1"

USAGE = """\
usage: sudo [-EHiknSs] [-D directory] [-u user] [--preserve-env[=list]] [VAR=value]...
            [--] command [arg ...]
       sudo -i | -s  (a shell)
       sudo -l | -v | -k | -K | -V | -h

Runs a command as another user of this sandbox: root unless -u says otherwise.

  -u, --user=USER         the user to run as (a name or #uid)
  -E, --preserve-env[=L]  keep the caller's environment (or only the variables in L)
  -i, --login             a login shell of the user (in the user's home), or the command
                          through it
  -s, --shell             a shell ($SHELL), or the command through it
  -D, --chdir=DIR         run in DIR
  -H, -n, -S, -k, -A, -B  accepted: no password is ever asked
  -l, --list              what you may run
  -v, -K                  nothing to validate: exit 0
"""

# Forwarded to the command: what a terminal or a supervisor sends to the caller.
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
)

_WITH_VALUE = {"u": "user", "D": "chdir", "p": "prompt"}
_FLAGS = {
    "E": "preserve",
    "i": "login",
    "s": "shell",
    "l": "list",
    "v": "validate",
    "K": "validate",
    "k": "reset",
    "V": "version",
    "h": "help",
}
_NO_OPS = set("HnSAB")
_LONG = {
    "--user": "u",
    "--chdir": "D",
    "--prompt": "p",
    "--login": "i",
    "--shell": "s",
    "--list": "l",
    "--validate": "v",
    "--remove-timestamp": "K",
    "--reset-timestamp": "k",
    "--version": "V",
    "--help": "h",
    "--set-home": "H",
    "--non-interactive": "n",
    "--stdin": "S",
    "--askpass": "A",
    "--bell": "B",
}


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> dict:
    """sudo's command line as a request: {user, chdir, preserve, login, shell, assign,
    argv, and the flags that need no command}. UsageError for what is not understood."""
    options: dict = {"user": "root", "preserve": False, "assign": {}, "argv": []}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            break
        if arg.startswith("--"):
            name, has_value, value = arg.partition("=")
            if name == "--preserve-env":
                options["preserve"] = [v for v in value.split(",") if v] if has_value else True
                continue
            short = _LONG.get(name)
            if short is None:
                raise UsageError(f"unrecognized option '{arg}'")
            if short in _WITH_VALUE:
                if not has_value:
                    if not args:
                        raise UsageError(f"option '{name}' requires an argument")
                    value = args.pop(0)
                options[_WITH_VALUE[short]] = value
            elif has_value:
                raise UsageError(f"option '{name}' doesn't allow an argument")
            elif short in _FLAGS:
                options[_FLAGS[short]] = True
            continue
        if arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            while letters:
                letter, letters = letters[0], letters[1:]
                if letter in _WITH_VALUE:
                    given = letters or (args.pop(0) if args else None)
                    if given is None:
                        raise UsageError(f"option requires an argument -- '{letter}'")
                    options[_WITH_VALUE[letter]] = given
                    letters = ""
                elif letter in _FLAGS:
                    options[_FLAGS[letter]] = True
                elif letter not in _NO_OPS:
                    raise UsageError(f"invalid option -- '{letter}'")
            continue
        args.insert(0, arg)
        break
    # VAR=value before the command: set in its environment.
    while args and "=" in args[0] and not args[0].startswith("="):
        name, _, value = args.pop(0).partition("=")
        options["assign"][name] = value
    user = options["user"]
    if user.startswith("#") and user[1:].isdigit():
        options["user"] = user[1:]
    options["argv"] = args
    return options


def command_line(options: dict, shell: str) -> list[str]:
    """What is run: the command itself, or a shell (-i, -s) that runs it."""
    argv: list[str] = options["argv"]
    if not (options.get("login") or options.get("shell")):
        return argv
    login = ["-l"] if options.get("login") else []
    if not argv:
        return [shell, *login]
    # sudo's own rule: every character but letters, digits, `_`, `-` and `$` escaped.
    escaped = ["".join(c if c.isalnum() or c in "_-$" else "\\" + c for c in arg) for arg in argv]
    return [shell, *login, "-c", " ".join(escaped)]


def request(options: dict) -> dict:
    shell = os.environ.get("SHELL") or "/bin/sh"
    return {
        "argv": command_line(options, shell),
        "user": options["user"],
        "cwd": options.get("chdir") or _cwd(),
        "env": dict(os.environ),
        "preserve": options["preserve"],
        "assign": options["assign"],
        "login": bool(options.get("login")),
        "chdir": bool(options.get("chdir")),
    }


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "/"


def main(argv: list[str]) -> int:
    try:
        options = parse(argv)
    except UsageError as exc:
        sys.stderr.write(f"sudo: {exc}\n{USAGE}")
        return 1
    if options.get("help"):
        sys.stdout.write(USAGE)
        return 0
    if options.get("version"):
        sys.stdout.write(VERSION + "\n")
        return 0
    if options.get("validate") or (options.get("reset") and not options["argv"]):
        return 0
    if options.get("list"):
        sys.stdout.write("User may run the following commands in this sandbox:\n")
        sys.stdout.write("    (ALL : ALL) NOPASSWD: ALL\n")
        return 0
    if not options["argv"] and not (options.get("login") or options.get("shell")):
        sys.stderr.write(USAGE)
        return 1
    payload = json.dumps(request(options)).encode()
    if len(payload) > MAX_REQUEST:
        sys.stderr.write("sudo: argument list too long\n")
        return 1
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_REQUEST * 2)
        conn.connect("\0" + SOCKET_NAME)
    except OSError:
        sys.stderr.write("sudo: this sandbox has no sudo (it was not asked for at its creation)\n")
        return 1
    return converse(conn, payload)


def converse(conn: socket.socket, payload: bytes) -> int:
    """Send the request with our stdio, forward signals while the command runs, and give
    its exit status."""
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    signal.set_wakeup_fd(writer)
    for number in FORWARDED:
        signal.signal(number, lambda *_: None)
    fds = array.array("i", [0, 1, 2])
    # Our credentials, given explicitly: the kernel checks them, and gVisor attaches wrong
    # ones where a message carries none.
    credentials = array.array("i", [os.getpid(), os.getuid(), os.getgid()])
    try:
        conn.sendmsg(
            [payload],
            [
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes()),
                (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, credentials.tobytes()),
            ],
        )
    except OSError as exc:
        sys.stderr.write(f"sudo: cannot reach the sandbox's agent: {exc.strerror}\n")
        return 1
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(conn, selectors.EVENT_READ)
    selector.register(reader, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is reader:
                for got in os.read(reader, 64):
                    if got != signal.SIGCHLD:
                        _send(conn, {"signal": got})
                continue
            try:
                data = conn.recv(64 * 1024)
            except OSError:
                data = b""
            if not data:
                sys.stderr.write("sudo: the sandbox's agent went away\n")
                return 1
            return _answer(json.loads(data))


def _send(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        conn.send(json.dumps(message).encode())


def _answer(answer: dict) -> int:
    if "error" in answer:
        sys.stderr.write(f"sudo: {answer['error']}\n")
        return 1
    number: int = answer.get("signal") or 0
    if number:
        # Die of it too, as the command did, so that our caller sees the same.
        signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {number})
        os.kill(os.getpid(), number)
        return 128 + number
    code: int = answer.get("exit", 1)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
