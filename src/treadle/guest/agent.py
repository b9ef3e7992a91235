"""The guest agent: the first program of a long-lived sandbox, inside its boundary.

Shuttle starts it as the sandbox's program (`python3 -I -S -c <this file>`), in the same
namespaces, cgroup, seccomp filter and user as anything the sandbox will run, and talks to it
over the agent's stdin (requests) and stdout (events). Every process a client starts with
`exec` is a child of this agent, so it is inside the boundary by construction; every file a
client reads or writes is opened here, as the sandbox's user, in the sandbox's own view of
the file system, so `..` and symlinks resolve inside the sandbox and never on the host.

It uses the standard library only (it runs on whatever Python 3.9+ the sandbox sees) and one
thread: a selector loop over the channel, the processes' pipes and a SIGCHLD wake-up pipe.

Frames, both ways: 8 bytes (the length of a JSON header, the length of a binary payload, both
unsigned 32-bit big-endian), the header (UTF-8 JSON object), then the payload. Requests carry
`op`; events carry `ev`. The host holds what it reads to `treadle.protocol.guest`; this side
trusts the host.

Users: where Shuttle asks for it (`TREADLE_AGENT_USER=uid:gid`, in tiers whose user namespace
maps every id of the sandbox), the agent starts as the sandbox's root with a few capabilities
and settles at once as real and saved uid 0, effective uid the sandbox's user, with no effective
capability: every file operation is then the user's own, the user's processes can neither
signal nor trace it, and a request naming another `user` switches to that user for its file
operation, or starts its process as that user (root keeping the capabilities, any other user
losing them all). Elsewhere every process runs as the one user the sandbox has.

Flow control: each exec process has an output window (bytes the host will take); the agent
stops reading a process's pipes while its window is spent, so a client that stops reading
one process stalls that process alone, never the channel or another process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import selectors
import signal
import stat
import struct
import sys
import termios
import time

# os.execvpe looks PATH up with os.get_exec_path, which imports `warnings`: imported here
# once, not in every forked child.
import warnings  # noqa: F401
from collections.abc import Callable, Iterator

# A frame's header. Unparametrized, and the imports above kept few: every sandbox starts this
# program, and `typing`, `contextlib`, `shutil` and `pty` cost milliseconds of its start.
Msg = dict

HEADER = struct.Struct(">II")
_PF_KTHREAD = 0x00200000  # /proc/PID/stat's flags: a kernel thread
READ_SIZE = 64 * 1024
FILE_CHUNK = 256 * 1024
MAX_LISTED = 2000
# `sudo` (treadle.guest.sudo): the largest request, how many at once, and what of the
# caller's environment its command keeps without -E (as sudo's env_reset does).
SUDO_MAX_REQUEST = 128 * 1024
SUDO_MAX_SESSIONS = 64
SUDO_KEEP = (
    "TERM",
    "COLORTERM",
    "DISPLAY",
    "XAUTHORITY",
    "LANG",
    "LANGUAGE",
    "TZ",
    "COLUMNS",
    "LINES",
)


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


class Channel:
    """Frames in from fd 0 and out to fd 1; writes are buffered and sent as fd 1 allows."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.rfd, self.wfd = 0, 1
        for fd in (self.rfd, self.wfd):
            os.set_blocking(fd, False)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False
        selector.register(self.rfd, selectors.EVENT_READ, self.on_readable)

    def send(self, header: Msg, payload: bytes = b"") -> None:
        head = json.dumps(header, separators=(",", ":")).encode()
        self.outbuf += HEADER.pack(len(head), len(payload)) + head + payload
        self.flush()

    def flush(self) -> None:
        while self.outbuf:
            try:
                n = os.write(self.wfd, self.outbuf)
            except BlockingIOError:
                break
            except BrokenPipeError:
                self.closed = True
                self.outbuf.clear()
                return
            del self.outbuf[:n]
        key = self._key(self.wfd)
        if self.outbuf and key is None:
            self.selector.register(self.wfd, selectors.EVENT_WRITE, lambda: self.flush())
        elif not self.outbuf and key is not None:
            self.selector.unregister(self.wfd)

    @property
    def backlog(self) -> int:
        return len(self.outbuf)

    def _key(self, fd: int) -> selectors.SelectorKey | None:
        try:
            return self.selector.get_key(fd)
        except KeyError:
            return None

    def on_readable(self) -> None:
        try:
            data = os.read(self.rfd, READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            self.closed = True
            self.selector.unregister(self.rfd)
            return
        self.inbuf += data

    def frames(self) -> Iterator[tuple[Msg, bytes]]:
        while len(self.inbuf) >= HEADER.size:
            hlen, plen = HEADER.unpack_from(self.inbuf)
            end = HEADER.size + hlen + plen
            if len(self.inbuf) < end:
                return
            header = json.loads(bytes(self.inbuf[HEADER.size : HEADER.size + hlen]))
            payload = bytes(self.inbuf[HEADER.size + hlen : end])
            del self.inbuf[:end]
            yield header, payload


def _become(
    argv: list,
    env: dict,
    cwd: str,
    fds: tuple,
    ids: tuple | None,
    new_session: bool,
    fallback: str | None = None,
) -> None:  # pragma: no cover - runs in a forked child, and execs or exits
    """In a forked child: take `fds` as stdin, stdout and stderr, the user `ids` (uid, gid;
    None: stay who the agent is), `cwd` (or `fallback` where the user may not enter it), and
    exec `argv` with `env`."""
    try:
        if new_session:
            os.setsid()
        for target, source in enumerate(fds):
            os.dup2(source, target)
        os.closerange(3, 65536)
        for sig in (signal.SIGPIPE, signal.SIGCHLD, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if ids is not None:
            uid, gid = ids
            # Root first (the agent's real and saved uid), which makes its capabilities
            # effective; then all three ids at once: leaving uid 0 on every one drops
            # every capability, ambient ones included.
            os.setresuid(0, 0, 0)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        try:
            try:
                os.chdir(cwd)
            except OSError:
                if fallback is None:
                    raise
                os.chdir(fallback)
        except OSError as exc:
            os.write(2, f"treadle: cannot enter {cwd!r}: {exc.strerror}\n".encode())
            os._exit(126)
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        os.write(2, f"treadle: cannot run {argv[0]!r}: {exc.strerror}\n".encode())
        os._exit(127 if exc.errno == errno.ENOENT else 126)
    except BaseException:
        os._exit(126)


class Process:
    """One exec'd process: its pipes (or PTY), its output window, its exit."""

    def __init__(self, agent: Agent, pid: int, req: Msg) -> None:
        self.agent = agent
        self.id = pid
        self.tag = req.get("tag")
        self.service = bool(req.get("service"))
        self.argv = req.get("argv") or []
        self.window = int(req.get("window", 1 << 20))
        self.paused: set[int] = set()
        self.streams: dict[int, str] = {}
        self.stdin: int | None = None
        self.stdin_queue: list[list] = []  # [unwritten bytes, req]
        self.stdin_waits: int | None = None  # the fd registered for writing, if any
        self.close_pending = False
        self.pty_fd: int | None = None
        self.os_pid = 0
        self.status: int | None = None
        # Seconds its output may go on once it exited (a process it left holds its pipes):
        # then the pipes are closed and its exit reported. None: until they close.
        drain = req.get("drain_s")
        self.drain_s = float(drain) if isinstance(drain, (int, float)) else None
        self.deadline: float | None = None
        self.start(req)

    def start(self, req: Msg) -> None:
        self.ids = self.agent.acting
        env = dict(self.agent.base_env)
        env.update(self.agent.acting_env)
        env.update(req.get("env") or {})
        cwd = req.get("cwd") or self.agent.home
        size = req.get("pty")
        if size:
            self._spawn_pty(env, cwd, size)
        else:
            self._spawn_pipes(env, cwd, bool(req.get("stdin")))

    def _spawn_pipes(self, env: dict[str, str], cwd: str, with_stdin: bool) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        if with_stdin:
            in_r, in_w = os.pipe()
        else:
            in_r, in_w = os.open(os.devnull, os.O_RDONLY), None
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child execs at once
            self._child(env, cwd, in_r, out_w, err_w)
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        self.os_pid = pid
        self.stdin = in_w
        if in_w is not None:
            os.set_blocking(in_w, False)
        self.streams = {out_r: "stdout", err_r: "stderr"}
        for fd in self.streams:
            os.set_blocking(fd, False)
            self.agent.selector.register(fd, selectors.EVENT_READ, self._reader(fd))

    def _spawn_pty(self, env: dict[str, str], cwd: str, size: Msg) -> None:
        import pty  # only terminals need it

        master, slave = pty.openpty()
        _set_size(master, size)
        env.setdefault("TERM", "xterm-256color")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child execs at once
            os.close(master)
            try:
                os.setsid()
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            except OSError:
                os._exit(126)
            self._child(env, cwd, slave, slave, slave, new_session=False)
        os.close(slave)
        self.os_pid = pid
        self.pty_fd = master
        os.set_blocking(master, False)
        # Its own fd for writing, so that the selector can wait on it apart from reading.
        self.stdin = os.dup(master)
        self.streams = {master: "stdout"}
        self.agent.selector.register(master, selectors.EVENT_READ, self._reader(master))

    def _child(
        self, env: dict[str, str], cwd: str, fd0: int, fd1: int, fd2: int, new_session: bool = True
    ) -> None:  # pragma: no cover - runs in the forked child
        _become(
            self.argv,
            env,
            cwd,
            (fd0, fd1, fd2),
            self.ids if self.agent.switches else None,
            new_session,
        )

    def _reader(self, fd: int) -> Callable[[], None]:
        return lambda: self.read(fd)

    def read(self, fd: int) -> None:
        try:
            data = os.read(fd, min(READ_SIZE, max(self.window, 1)))
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO: a PTY whose other side is gone; ECONNRESET: a connection's server
            if exc.errno not in (errno.EIO, errno.ECONNRESET):
                raise
            data = b""
        if not data:
            self._close_stream(fd)
            return
        self.window -= len(data)
        self.agent.channel.send({"ev": "out", "pid": self.id, "stream": self.streams[fd]}, data)
        if self.window <= 0:
            for stream in self.streams:
                if stream not in self.paused:
                    self.agent.selector.unregister(stream)
                    self.paused.add(stream)

    def grant(self, amount: int) -> None:
        self.window += amount
        if self.window > 0:
            for fd in list(self.paused):
                self.paused.discard(fd)
                self.agent.selector.register(fd, selectors.EVENT_READ, self._reader(fd))

    def _close_stream(self, fd: int) -> None:
        if fd in self.paused:
            self.paused.discard(fd)
        else:
            self.agent.selector.unregister(fd)
        del self.streams[fd]
        if fd == self.pty_fd:
            self._drop_stdin()
        os.close(fd)
        self.maybe_done()

    def write_stdin(self, data: bytes, req: int | None) -> None:
        """Queue `data` for the process's stdin; "result" for `req` once all of it is
        written. The process takes it at its own pace, and only it waits for that."""
        self.stdin_queue.append([memoryview(data), req])
        self.flush_stdin()

    def flush_stdin(self) -> None:
        while self.stdin_queue:
            view, req = self.stdin_queue[0]
            if self.stdin is not None and view:
                try:
                    view = view[os.write(self.stdin, view) :]
                except BlockingIOError:
                    break
                except OSError:
                    view = view[:0]  # the process closed its stdin: the rest goes nowhere
                self.stdin_queue[0][0] = view
                if view:
                    continue
            self.stdin_queue.pop(0)
            if req is not None:
                self.agent.channel.send({"ev": "result", "req": req, "value": None})
        waiting = self.stdin if self.stdin_queue else None
        if waiting is not None and self.stdin_waits is None:
            self.agent.selector.register(waiting, selectors.EVENT_WRITE, self.flush_stdin)
        elif waiting is None and self.stdin_waits is not None:
            self.agent.selector.unregister(self.stdin_waits)
        self.stdin_waits = waiting
        if not self.stdin_queue and self.close_pending:
            self.close_pending = False
            self.close_stdin()

    def close_stdin(self) -> None:
        if self.stdin_queue:
            self.close_pending = True  # after what is queued
            return
        if self.pty_fd is not None:
            self.write_stdin(b"\x04", None)  # end of file, as a terminal says it
        else:
            self._drop_stdin()

    def _drop_stdin(self) -> None:
        if self.stdin_waits is not None:
            self.agent.selector.unregister(self.stdin_waits)
            self.stdin_waits = None
        if self.stdin is not None:
            os.close(self.stdin)
        self.stdin = None
        for _, req in self.stdin_queue:
            if req is not None:
                self.agent.channel.send({"ev": "result", "req": req, "value": None})
        self.stdin_queue.clear()

    def signal(self, number: int) -> None:
        if self.status is None:
            try:
                os.killpg(self.os_pid, number)
            except (ProcessLookupError, PermissionError):
                try:  # noqa: SIM105 - contextlib costs this program's start time
                    os.kill(self.os_pid, number)
                except ProcessLookupError:
                    pass

    def reaped(self, status: int) -> None:
        self.status = status
        self._drop_stdin()
        self.maybe_done()

    def _drain_terminal(self) -> None:
        """What the terminal holds when its process is reaped, read now (within the window):
        the process may have written its last output and exited before the selector saw
        the terminal readable, and closing it would drop that output. Only what is there:
        a background process that keeps the terminal open is not waited for."""
        fd = self.pty_fd
        while fd in self.streams and fd not in self.paused and self.window > 0:
            try:
                data = os.read(fd, min(READ_SIZE, self.window))
            except OSError:  # EAGAIN: nothing more now; EIO: nobody holds the terminal
                return
            if not data:
                return
            self.window -= len(data)
            self.agent.channel.send({"ev": "out", "pid": self.id, "stream": "stdout"}, data)

    def maybe_done(self, force: bool = False) -> None:
        # The exit is reported once the process is gone and its output read to the end
        # (a PTY's output ends when the last holder of the terminal is gone, or at once),
        # or, with `drain_s`, that long after it is gone.
        if self.status is None:
            return
        if self.streams and self.pty_fd is None and not force:
            if self.drain_s is not None and self.deadline is None:
                self.deadline = time.monotonic() + max(0.0, min(self.drain_s, 3600.0))
            return
        self.deadline = None
        if self.pty_fd is not None:
            self._drain_terminal()
        for fd in list(self.streams):
            if fd in self.paused:
                self.paused.discard(fd)
            else:
                self.agent.selector.unregister(fd)
            os.close(fd)
        self.streams.clear()
        status = self.status
        event = {"ev": "exit", "pid": self.id}
        if os.WIFSIGNALED(status):
            event["signal"] = os.WTERMSIG(status)
            event["code"] = None
        else:
            event["code"] = os.WEXITSTATUS(status)
        self.agent.channel.send(event)
        self.agent.processes.pop(self.id, None)
        self.agent.by_os_pid.pop(self.os_pid, None)


class Connection(Process):
    """A TCP connection to a port on the sandbox's own loopback, opened from inside its
    network namespace: what the server sends is this 'process's' stdout, what the client
    sends its stdin. It ends, with code 0, once the server has closed its side."""

    def start(self, req: Msg) -> None:
        import socket  # only ports need it

        port = int(req["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not 1-65535")
        failure: OSError = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(5)  # loopback: refused or accepted at once, unless its backlog is full
            try:
                sock.connect((host, port))
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH):
                    failure = exc
                continue
            fd = sock.detach()
            break
        else:
            raise failure
        os.set_blocking(fd, False)
        self.stdin = os.dup(fd)  # its own fd for writing, as a PTY's
        self.streams = {fd: "stdout"}
        self.agent.selector.register(fd, selectors.EVENT_READ, self._reader(fd))

    def _close_stream(self, fd: int) -> None:
        if self.status is None:
            self.status = 0  # the server is done: so is the connection
            self._drop_stdin()
        super()._close_stream(fd)

    def _drop_stdin(self) -> None:
        if self.stdin is not None:
            _shutdown(self.stdin, 1)  # SHUT_WR: the server reads its end of file
        super()._drop_stdin()

    def signal(self, number: int) -> None:
        for fd in list(self.streams):
            _shutdown(fd, 2)  # SHUT_RDWR: the read ends, and with it the connection
            if fd in self.paused:  # not read while its window is spent: end it here
                self._close_stream(fd)


class Watch(Process):
    """Changes under a directory, as they happen (inotify), written as JSON lines to this
    'process's' stdout: {"type": create|write|remove|rename|chmod, "name": path relative to
    the directory, "dir": bool}. It ends when the directory goes, or when signalled."""

    MASKS = (
        (0x100, "create"),  # IN_CREATE
        (0x80, "create"),  # IN_MOVED_TO
        (0x2, "write"),  # IN_MODIFY
        (0x200, "remove"),  # IN_DELETE
        (0x40, "rename"),  # IN_MOVED_FROM
        (0x4, "chmod"),  # IN_ATTRIB
    )
    WANTED = 0x100 | 0x80 | 0x2 | 0x200 | 0x40 | 0x4 | 0x400 | 0x800  # + DELETE_SELF, MOVE_SELF
    MAX_WATCHES = 4096

    def start(self, req: Msg) -> None:
        import ctypes  # only watches need it

        self.root = self.agent._path(req)
        if not stat.S_ISDIR(os.stat(self.root).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory")
        self.libc = ctypes.CDLL(None, use_errno=True)
        fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.fd = fd
        self.recursive = bool(req.get("recursive"))
        self.dirs: dict = {}  # watch descriptor -> directory, relative to the root
        self.pending = bytearray()  # events not yet sent (the window was spent)
        self.last = b""
        self._watch("")
        self.streams = {fd: "stdout"}
        self.agent.selector.register(fd, selectors.EVENT_READ, self._reader(fd))

    def _watch(self, relative: str, found: list | None = None) -> None:
        """Watch a directory (and, recursive, those under it). For one made after the watch
        began, `found` gets what was made in it before its own watch was in place."""
        if len(self.dirs) >= self.MAX_WATCHES:
            return
        path = os.path.join(self.root, relative).encode("utf-8", "surrogateescape")
        wd = self.libc.inotify_add_watch(self.fd, path, self.WANTED)
        if wd < 0:
            return  # gone already, or not readable: nothing to watch there
        self.dirs[wd] = relative
        if not self.recursive:
            return
        try:
            entries = list(os.scandir(os.path.join(self.root, relative) or "."))
        except OSError:
            return
        for entry in entries:
            name = os.path.join(relative, entry.name)
            is_dir = entry.is_dir(follow_symlinks=False)
            if found is not None:
                found.append(_change("create", name, is_dir))
            if is_dir:
                self._watch(name, found)

    def read(self, fd: int) -> None:
        try:
            raw = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        offset, lines = 0, []
        while offset + 16 <= len(raw):
            wd, mask, _cookie, size = struct.unpack_from("iIII", raw, offset)
            name = (
                raw[offset + 16 : offset + 16 + size]
                .rstrip(b"\0")
                .decode("utf-8", "surrogateescape")
            )
            offset += 16 + size
            base = self.dirs.get(wd)
            if base is None:
                continue
            if mask & (0x400 | 0x800) and base == "":  # the directory itself went
                self.status = 0
            if mask & 0x8000:  # IN_IGNORED: that watch is gone
                self.dirs.pop(wd, None)
                continue
            relative = os.path.join(base, name) if name else base
            is_dir = bool(mask & 0x40000000)  # IN_ISDIR
            for bit, kind in self.MASKS:
                if mask & bit:
                    lines.append(_change(kind, relative, is_dir))
            if is_dir and self.recursive and mask & (0x100 | 0x80):
                self._watch(relative, lines)
        for encoded in lines:
            if encoded != self.last:  # a write in many pieces is one event
                self.pending += encoded
            self.last = encoded
        self.flush()
        if self.status is not None:
            self.stop()

    def flush(self) -> None:
        while self.pending and self.window > 0:
            chunk = bytes(self.pending[: min(self.window, READ_SIZE)])
            del self.pending[: len(chunk)]
            self.window -= len(chunk)
            self.agent.channel.send({"ev": "out", "pid": self.id, "stream": "stdout"}, chunk)
        if len(self.pending) > 1 << 20:
            # A client that reads none of a storm of changes: the oldest are dropped.
            del self.pending[: len(self.pending) - (1 << 20)]

    def grant(self, amount: int) -> None:
        self.window += amount
        self.flush()

    def signal(self, number: int) -> None:
        self.status = 0
        self.stop()

    def stop(self) -> None:
        if self.fd in self.streams:
            self.agent.selector.unregister(self.fd)
            del self.streams[self.fd]
            os.close(self.fd)
        self.maybe_done()


def _change(kind: str, name: str, is_dir: bool) -> bytes:
    return json.dumps({"type": kind, "name": _text(name), "dir": is_dir}).encode() + b"\n"


def _shutdown(fd: int, how: int) -> None:
    import socket

    sock = socket.socket(fileno=fd)
    try:  # noqa: SIM105 - contextlib costs this program's start time
        sock.shutdown(how)
    except OSError:
        pass
    sock.detach()


def _set_size(fd: int, size: Msg) -> None:

    rows, cols = int(size.get("rows", 24)), int(size.get("cols", 80))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Sudo:
    """One `sudo` asked for by a process in the sandbox (`treadle.guest.sudo`): the command
    it named, started as the user it named with the caller's own stdin, stdout and stderr,
    and the caller's connection, which forwards the caller's signals and hears the command's
    end. A caller that goes away takes its command with it, as a killed `sudo` would.

    Who asks is known by the credentials that come with the request (SCM_CREDENTIALS, which
    the kernel checks: no process can claim a uid other than its own without CAP_SETUID), not
    by SO_PEERCRED, which gVisor answers with the listener's."""

    def __init__(self, agent: Agent, conn: object) -> None:
        self.agent = agent
        self.conn = conn
        self.caller = (-1, -1)  # (uid, gid) of the process that asked
        self.pid = 0
        self.since = agent.accepted = agent.accepted + 1  # the order of arrival
        self.fd = conn.fileno()  # type: ignore[attr-defined]
        agent.selector.register(self.fd, selectors.EVENT_READ, self.on_readable)

    def on_readable(self) -> None:
        import _socket

        try:
            data, ancillary, flags, _ = self.conn.recvmsg(  # type: ignore[attr-defined]
                SUDO_MAX_REQUEST + 1, _socket.CMSG_SPACE(4 * 4) + _socket.CMSG_SPACE(3 * 4)
            )
        except BlockingIOError:
            return
        except OSError:
            data, ancillary, flags = b"", [], 0
        fds: list = []
        caller = None
        for level, kind, body in ancillary:
            if level != _socket.SOL_SOCKET:
                continue
            if kind == _socket.SCM_RIGHTS:
                fds += struct.unpack(f"{len(body) // 4}i", body[: len(body) - len(body) % 4])
            elif kind == _socket.SCM_CREDENTIALS and len(body) >= 12:
                caller = struct.unpack_from("3i", body)[1:]
        try:
            if not data:
                self.close()
            elif self.pid:
                self.signal(data)
            elif caller is None:
                self.finish({"error": "the request carries no credentials"})
            elif caller[0] not in (0, self.agent.user[0]):
                self.finish({"error": f"{_name_of(caller[0])} is not in the sudoers file"})
            elif flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC) or len(fds) != 3:
                self.finish({"error": "the request is malformed or too long"})
            else:
                self.caller = caller
                self.start(json.loads(data), fds)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            self.finish({"error": str(exc)[:1000]})
        finally:
            for fd in fds:
                _close_at_once(fd)

    def start(self, req: Msg, fds: list) -> None:
        argv = req["argv"]
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise ValueError("no command, or an argument that is not text")
        uid, gid, home, name = _lookup(req["user"])
        self.agent.switch(uid, gid)
        try:
            home = self.agent.home_of(home)
        finally:
            self.agent.switch(*self.agent.user)
        caller_env = req.get("env") or {}
        preserve = req.get("preserve")
        if preserve is True:
            env = dict(self.agent.base_env)
            env.update(caller_env)
        else:
            keep = set(SUDO_KEEP).union(preserve or ())
            env = dict(self.agent.base_env)
            env.update((k, v) for k, v in caller_env.items() if k in keep or k.startswith("LC_"))
        caller_name = _name_of(self.caller[0])
        env.update(
            HOME=home,
            USER=name or str(uid),
            LOGNAME=name or str(uid),
            SUDO_USER=caller_name,
            SUDO_UID=str(self.caller[0]),
            SUDO_GID=str(self.caller[1]),
            SUDO_COMMAND=" ".join(argv)[:4096],
        )
        # sudo's secure_path: the sandbox's own PATH, whatever the caller's
        if "PATH" in self.agent.base_env:
            env["PATH"] = self.agent.base_env["PATH"]
        env.update(req.get("assign") or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("an environment variable that is not text")
        cwd = home if req.get("login") else str(req.get("cwd") or home)
        # As sudo does: the caller's directory where the user may enter it, else the root;
        # a directory asked for (-D) or none at all.
        fallback = None if req.get("chdir") else "/"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child execs at once
            _become(argv, env, cwd, tuple(fds), (uid, gid), True, fallback)
        self.pid = pid
        self.agent.sudo[pid] = self

    def signal(self, data: bytes) -> None:
        """The caller got a signal: the command gets it too. Anything else is ignored."""
        try:
            number = json.loads(data).get("signal")
        except (ValueError, AttributeError):
            return
        if isinstance(number, int) and 0 < number < 65:
            self.agent.kill_group(self.pid, number)

    def ended(self, status: int) -> None:
        if os.WIFSIGNALED(status):
            self.finish({"signal": os.WTERMSIG(status)})
        else:
            self.finish({"exit": os.WEXITSTATUS(status)})

    def finish(self, answer: Msg) -> None:
        try:  # noqa: SIM105 - contextlib costs this program's start time
            self.conn.send(json.dumps(answer).encode())  # type: ignore[attr-defined]
        except OSError:
            pass
        self.pid = 0
        self.close()

    def close(self) -> None:
        if self.pid:  # the caller is gone while its command runs
            self.agent.kill_group(self.pid, signal.SIGKILL)
            self.pid = 0
        if self.fd >= 0:
            self.agent.selector.unregister(self.fd)
            self.agent.sudoers.discard(self)
            self.conn.close()  # type: ignore[attr-defined]
            self.fd = -1


class Agent:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.channel = Channel(self.selector)
        self.processes: dict[int, Process] = {}
        self.by_os_pid: dict[int, Process] = {}
        self.uploads: dict[int, int] = {}
        self.downloads: dict[int, list[int]] = {}  # req -> [fd, window]
        self.home = os.environ.get("HOME") or "/"
        self.user = (os.getuid(), os.getgid())
        self.switches = False
        wanted = os.environ.get("TREADLE_AGENT_USER")
        if wanted:
            uid, gid = (int(part) for part in wanted.split(":"))
            self.switches = _settle(uid, gid)
            self.user = (uid, gid)
        self.acting = self.user  # whose request this is, while it is handled
        self.acting_env: dict = {}
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("TREADLE_AGENT")}
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.reap)
        self.sudo: dict[int, Sudo] = {}  # the os pid of a command -> its session
        self.accepted = 0
        self.sudoers: set[Sudo] = set()  # every connection of a `sudo`, running or not
        self.listener: object = None
        sudo = os.environ.get("TREADLE_AGENT_SUDO")
        if sudo and self.switches:
            self.listen(sudo)

    def listen(self, name: str) -> None:
        """Take `sudo` requests at the abstract socket `name` (`treadle.guest.sudo`)."""
        import _socket

        listener = _socket.socket(
            _socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC | _socket.SOCK_NONBLOCK
        )
        listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_PASSCRED, 1)
        listener.bind("\0" + name)
        listener.listen(16)
        self.listener = listener
        self.selector.register(listener.fileno(), selectors.EVENT_READ, self.accept)

    def accept(self) -> None:
        import _socket

        try:
            fd, _ = self.listener._accept()  # type: ignore[attr-defined]
        except OSError:
            return
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, fd)
        conn.setblocking(False)
        conn.setsockopt(_socket.SOL_SOCKET, _socket.SO_PASSCRED, 1)
        if len(self.sudoers) >= SUDO_MAX_SESSIONS:
            # Connections that asked nothing yet go first, the oldest of them: whoever holds
            # many open cannot keep the sandbox's user from its sudo.
            idle = [s for s in self.sudoers if not s.pid]
            if idle:
                min(idle, key=lambda s: s.since).finish({"error": "too many sudo requests"})
        session = Sudo(self, conn)
        self.sudoers.add(session)
        if len(self.sudoers) > SUDO_MAX_SESSIONS:
            session.finish({"error": "too many sudo commands at once in this sandbox"})

    def home_of(self, home: str | None) -> str:
        """The HOME of the user the agent acts as, whose /etc/passwd home is `home`: that,
        where the user may write in it, else the sandbox's own (the read-only root file
        system of the host's programs holds no home of anyone's)."""
        if home and os.access(home, os.W_OK, effective_ids=True):
            return home
        return self.home

    def switch(self, uid: int, gid: int) -> None:
        """Act as `uid`/`gid` (effective ids) from now on, where this agent can."""
        if self.switches:
            os.seteuid(0)  # the capabilities to take any ids
            os.setresgid(-1, gid, -1)
            os.seteuid(uid)

    def kill_group(self, pid: int, number: int) -> None:
        """Signal the process group `pid`, whoever runs it (with the capability to)."""
        if self.switches:
            os.seteuid(0)
        try:
            os.killpg(pid, number)
        except OSError:
            pass
        finally:
            if self.switches:
                os.seteuid(self.user[0])

    def run(self) -> None:
        if os.getpid() > 2:
            _adopt_orphans()
        self.channel.send(
            {"ev": "ready", "pid": os.getpid(), "uid": self.user[0], "users": self.switches}
        )
        busy = False
        while not self.channel.closed:
            deadlines = [d for p in self.processes.values() if (d := getattr(p, "deadline", None))]
            timeout = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
            for key, _ in self.selector.select(0 if busy else timeout):
                key.data()
            if deadlines:
                now = time.monotonic()
                for process in list(self.processes.values()):
                    deadline = getattr(process, "deadline", None)
                    if deadline is not None and deadline <= now:
                        process.maybe_done(force=True)
            for header, payload in self.channel.frames():
                self.handle(header, payload)
            busy = self.pump()
        for process in list(self.processes.values()):
            process.signal(signal.SIGKILL)
        for session in list(self.sudoers):
            session.close()

    def reap(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            process = self.by_os_pid.get(pid)
            if process is not None:
                process.reaped(status)
            session = self.sudo.pop(pid, None)
            if session is not None:
                session.ended(status)

    def handle(self, header: Msg, payload: bytes) -> None:
        op = header.get("op")
        method = getattr(self, "op_" + str(op), None)
        req = header.get("req")
        try:
            if method is None:
                raise ValueError(f"unknown op {op!r}")
            user = header.get("user")
            if user is None:
                method(header, payload)
            else:
                self._as(user, method, header, payload)
        except OSError as exc:
            if req is not None:
                self.channel.send(
                    {"ev": "error", "req": req, "errno": _errno_name(exc), "message": exc.strerror}
                )
        except (ValueError, KeyError, TypeError) as exc:
            if req is not None:
                self.channel.send(
                    {"ev": "error", "req": req, "errno": "EINVAL", "message": str(exc)}
                )

    def _as(self, user: object, method: Callable, header: Msg, payload: bytes) -> None:
        """Handle one request as `user` (a name in the sandbox's /etc/passwd, or a uid)."""
        uid, gid, home, name = _lookup(user)
        if (uid, gid) != self.user and not self.switches:
            raise PermissionError(
                errno.EPERM, f"this sandbox runs every process as uid {self.user[0]}"
            )
        self.switch(uid, gid)
        self.acting = (uid, gid)
        self.acting_env = {"USER": name, "LOGNAME": name} if name else {}
        self.acting_env["HOME"] = self.home_of(home)
        try:
            method(header, payload)
        finally:
            self.acting, self.acting_env = self.user, {}
            self.switch(*self.user)

    # processes

    def op_exec(self, header: Msg, _payload: bytes) -> None:
        process = Process(self, int(header["pid"]), header)
        self.processes[process.id] = process
        self.by_os_pid[process.os_pid] = process
        self.channel.send({"ev": "started", "pid": process.id, "os_pid": process.os_pid})
        if header.get("req") is not None:
            self.channel.send({"ev": "result", "req": header["req"], "value": process.os_pid})

    def op_connect(self, header: Msg, _payload: bytes) -> None:
        connection = Connection(self, int(header["pid"]), header)
        self.processes[connection.id] = connection
        self._result(header, None)

    def op_watch(self, header: Msg, _payload: bytes) -> None:
        watch = Watch(self, int(header["pid"]), header)
        self.processes[watch.id] = watch
        self._result(header, None)

    def op_activity(self, header: Msg, _payload: bytes) -> None:
        """What runs in the sandbox besides the agent: how many processes, and the CPU
        clock ticks the sandbox has spent so far (exited processes' included)."""
        own = os.getpid()
        table: dict = {}  # pid -> (ppid, ticks, state)
        try:
            names = os.listdir("/proc")
        except OSError:
            names = []
        for name in names:
            if not name.isdigit():
                continue
            try:
                with open("/proc/" + name + "/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            fields = raw[raw.rfind(b")") + 2 :].split()
            if int(fields[6]) & _PF_KTHREAD:
                continue  # the kernel's own threads: a microVM's agent sees them
            table[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]), fields[0])
        children: dict = {}  # pid -> its children
        for pid, entry in table.items():
            children.setdefault(entry[0], []).append(pid)
        if own <= 2:
            # The sandbox's own pid namespace: everything in it is the sandbox's, and what
            # is neither the agent nor the init above it is work.
            mine = set(table)
            above = set()
            pid = own
            while pid in table and pid not in above:
                above.add(pid)
                pid = table[pid][0]
            workers = [p for p in table if p not in above]
        else:
            # The process tier shares the host's: the agent's descendants only.
            mine = {own}
            todo = [own]
            while todo:
                for child in children.get(todo.pop(), []):
                    if child not in mine:
                        mine.add(child)
                        todo.append(child)
            workers = [p for p in mine if p != own]
        # Services (the desktop's ctrl) and the programs they start themselves (its X server,
        # window manager, VNC server) are not work; what those start in turn (an application
        # opened from the desktop) is.
        services = {p.os_pid for p in self.processes.values() if p.service and p.status is None}
        for service in list(services):
            services.update(children.get(service, []))
        running = [
            p
            for p in workers
            if p in table and table[p][2] not in (b"Z", b"X") and p not in services
        ]
        self._result(
            header,
            {
                "processes": len(running),
                "ticks": sum(table[p][1] for p in mine if p in table and p not in services),
                "hz": os.sysconf("SC_CLK_TCK"),
            },
        )

    def op_stdin(self, header: Msg, payload: bytes) -> None:

        process = self.processes.get(int(header["pid"]))
        req = header.get("req")
        if process is not None:
            process.write_stdin(payload, req)
        elif req is not None:
            self.channel.send({"ev": "result", "req": req, "value": None})

    def op_stdin_close(self, header: Msg, _payload: bytes) -> None:
        process = self.processes.get(int(header["pid"]))
        if process is not None:
            process.close_stdin()

    def op_signal(self, header: Msg, _payload: bytes) -> None:
        process = self.processes.get(int(header["pid"]))
        if process is not None:
            process.signal(int(header["signal"]))

    def op_resize(self, header: Msg, _payload: bytes) -> None:
        process = self.processes.get(int(header["pid"]))
        if process is not None and process.pty_fd is not None:
            _set_size(process.pty_fd, header)

    def op_window(self, header: Msg, _payload: bytes) -> None:
        process = self.processes.get(int(header["pid"]))
        if process is not None:
            process.grant(int(header["bytes"]))

    # files: every path as the sandbox sees it, relative ones from its home

    def _path(self, header: Msg, key: str = "path") -> str:
        path = header[key]
        if not isinstance(path, str) or not path or "\0" in path:
            raise ValueError(f"invalid path {path!r}")
        return os.path.join(self.home, path)

    def _result(self, header: Msg, value: object) -> None:
        self.channel.send({"ev": "result", "req": header["req"], "value": value})

    def op_read(self, header: Msg, _payload: bytes) -> None:
        req = int(header["req"])
        fd = os.open(self._path(header), os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory")
        except OSError:
            os.close(fd)
            raise
        self.channel.send({"ev": "size", "req": req, "size": info.st_size})
        self.downloads[req] = [fd, int(header.get("window", 1 << 20))]

    def op_read_window(self, header: Msg, _payload: bytes) -> None:
        download = self.downloads.get(int(header["req"]))
        if download is not None:
            download[1] += int(header["bytes"])

    def op_read_cancel(self, header: Msg, _payload: bytes) -> None:
        download = self.downloads.pop(int(header["req"]), None)
        if download is not None:
            os.close(download[0])

    def pump(self) -> bool:
        """Send what downloads may send now (their window, and room in the channel);
        returns whether one could send more at once."""
        more = False
        for req, download in list(self.downloads.items()):
            fd, window = download
            if window <= 0 or self.channel.backlog > 4 * FILE_CHUNK:
                continue
            try:
                chunk = os.read(fd, min(FILE_CHUNK, window))
            except OSError as exc:
                chunk = None
                self.channel.send(
                    {"ev": "error", "req": req, "errno": _errno_name(exc), "message": exc.strerror}
                )
            if not chunk:
                os.close(fd)
                del self.downloads[req]
                if chunk is not None:
                    self.channel.send({"ev": "done", "req": req})
                continue
            download[1] -= len(chunk)
            self.channel.send({"ev": "data", "req": req}, chunk)
            more = more or download[1] > 0
        return more and self.channel.backlog <= 4 * FILE_CHUNK

    def op_write_open(self, header: Msg, _payload: bytes) -> None:
        path = self._path(header)
        if header.get("parents"):
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        if header.get("append"):
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, int(header.get("mode", 0o644)))
        self.uploads[int(header["req"])] = fd
        self._result(header, None)

    def op_write_data(self, header: Msg, payload: bytes) -> None:
        fd = self.uploads[int(header["req"])]
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            os.close(self.uploads.pop(int(header["req"])))
            raise
        if header.get("ack"):
            self._result(header, None)

    def op_write_close(self, header: Msg, _payload: bytes) -> None:
        fd = self.uploads.pop(int(header["req"]))
        size = os.fstat(fd).st_size
        os.close(fd)
        self._result(header, size)

    def op_stat(self, header: Msg, _payload: bytes) -> None:
        path = self._path(header)
        self._result(header, _describe(path, os.path.basename(path) or "/"))

    def op_list(self, header: Msg, _payload: bytes) -> None:
        root = self._path(header)
        depth = max(1, int(header.get("depth", 1)))
        found: list[Msg] = []
        # What Shuttle takes in one answer (treadle.protocol.guest.MAX_HEADER_BYTES).
        limit = min(int(header.get("limit", MAX_LISTED)), MAX_LISTED)

        def walk(directory: str, level: int) -> None:
            with os.scandir(directory) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if len(found) >= limit:
                        return
                    found.append(_describe(entry.path, entry.name))
                    if level < depth and entry.is_dir(follow_symlinks=False):
                        try:  # noqa: SIM105 - contextlib costs this program's start time
                            walk(entry.path, level + 1)
                        except OSError:
                            pass

        walk(root, 1)
        self._result(header, found)

    def op_mkdir(self, header: Msg, _payload: bytes) -> None:
        path = self._path(header)
        existed = os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        self._result(header, not existed)

    def op_remove(self, header: Msg, _payload: bytes) -> None:
        path = self._path(header)
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode):
            import shutil  # only removals need it

            shutil.rmtree(path)
        else:
            os.unlink(path)
        self._result(header, None)

    def op_move(self, header: Msg, _payload: bytes) -> None:
        source, target = self._path(header, "source"), self._path(header, "target")
        os.rename(source, target)
        self._result(header, None)

    def op_ps(self, header: Msg, _payload: bytes) -> None:
        self._result(
            header,
            [
                {"pid": p.id, "os_pid": p.os_pid, "tag": p.tag, "argv": p.argv}
                for p in self.processes.values()
                if not isinstance(p, (Connection, Watch))
            ],
        )


def _settle(uid: int, gid: int) -> bool:
    """Become real and saved root, effective `uid`/`gid`, no effective capability; False
    (nothing changed) where this agent may not take other ids."""
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        return False
    os.setresgid(0, gid, 0)
    os.setresuid(0, uid, 0)  # effective 0 to `uid`: the effective capabilities go
    return True


def _lookup(user: object) -> tuple:
    """(uid, gid, home, name) of `user`: a name in the sandbox's /etc/passwd ("root" and
    "user" are there in every sandbox, even an image without them), or a number."""
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)
    if not isinstance(user, str) or not user or len(user) > 64 or ":" in user:
        raise ValueError(f"invalid user {user!r}")
    try:
        with open("/etc/passwd", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and user in (fields[0], fields[2]):
                    uid, gid = int(fields[2]), int(fields[3])
                    if not (0 <= uid < 65536 and 0 <= gid < 65536):
                        break
                    return uid, gid, fields[5] or None, fields[0]
    except (OSError, ValueError):
        pass
    known = {"root": (0, 0, "/root", "root"), "user": (1000, 1000, None, "user")}
    if user in known:
        return known[user]
    if user.isdigit() and int(user) < 65536:
        return int(user), int(user), None, None
    raise ValueError(f"no user {user!r} in the sandbox")


def _close_at_once(fd: int) -> None:
    """Close a descriptor a caller passed, never waiting on it: a socket's lingering unsent
    data is dropped, not waited for."""
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            import _socket

            sock = _socket.socket(fileno=fd)
            try:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 0, 0))
            finally:
                sock.detach()
    except OSError:
        pass
    os.close(fd)


def _name_of(uid: int) -> str:
    """The name of `uid` in the sandbox's /etc/passwd, else the number."""
    try:
        return _lookup(uid)[3] or str(uid)
    except ValueError:
        return str(uid)


def _adopt_orphans() -> None:
    """Without a pid namespace of its own (the process tier), become the subreaper of what
    runs here, so that a background job whose parent exited (`sleep 60 &`) is still a
    descendant, seen as work by `activity`. In a pid namespace its init adopts them."""
    import ctypes  # only the process tier needs it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _describe(path: str, name: str) -> Msg:
    info = os.lstat(path)
    kind = "file"
    if stat.S_ISDIR(info.st_mode):
        kind = "dir"
    elif stat.S_ISLNK(info.st_mode):
        kind = "symlink"
    elif not stat.S_ISREG(info.st_mode):
        kind = "other"
    described = {
        "name": _text(name),
        "path": _text(path),
        "type": kind,
        "size": info.st_size,
        "mode": stat.S_IMODE(info.st_mode),
        "mtime": info.st_mtime,
        "uid": info.st_uid,
        "gid": info.st_gid,
    }
    if kind == "symlink":
        described["target"] = _text(os.readlink(path))
    return described


def _text(name: str) -> str:
    """`name` as JSON can carry it: bytes that are not UTF-8 (which a file name may hold)
    become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def main() -> None:
    try:
        Agent().run()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
