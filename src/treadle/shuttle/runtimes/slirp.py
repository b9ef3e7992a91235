"""Network for a sandbox: slirp4netns attached to the sandbox's own network namespace.

A sandbox given network still has a network namespace of its own. slirp4netns adds one
interface to it, `tap0` (10.0.2.100/24, MTU 65520, default route through 10.0.2.2), and
carries its traffic through ordinary sockets that it opens on the host, so what leaves the
sandbox looks like traffic of one more program of the host's, NAT'd to the host's address:

- TCP and UDP to other hosts go out; nothing from outside can connect in (no port is
  forwarded).
- The host's loopback is out of reach: 127.0.0.1 in the sandbox is the sandbox's own loopback,
  and 10.0.2.2, which slirp4netns would otherwise map to the host's 127.0.0.1, is refused
  (`--disable-host-loopback`). Shuttle's, Weaver's and a database's loopback ports stay closed.
- 10.0.2.3 answers DNS: libslirp forwards UDP port 53 there, and nothing else (TCP to it and UDP
  to its other ports are refused: measured with libslirp 4.7), to the first nameserver of the
  host's /etc/resolv.conf, even a loopback one such as systemd-resolved's 127.0.0.53. That
  resolver is the one service on the host's loopback that a sandbox reaches, on purpose. The
  sandbox's /etc/resolv.conf names 10.0.2.3 alone (`RESOLV_CONF`): the host's may name a
  loopback address, which inside would be the sandbox's own.
- This host, its cloud and Weaver are fenced off (`Slirp.fence`): before slirp4netns attaches,
  Shuttle adds `prohibit` routes to the sandbox's own routing table for the link-local range
  (169.254.0.0/16: a cloud's metadata service, which hands out the machine's credentials),
  every address of this host but loopback (its services, as another machine would reach
  them), and Weaver's addresses. A connection to them fails at once with EACCES, inside the
  sandbox, without a packet sent; the program, without CAP_NET_ADMIN, cannot remove the
  routes. A program that binds its socket to tap0 (SO_BINDTODEVICE) gets past the routes,
  as the destination then counts as on the link, but no further: libslirp answers ARP for
  10.0.2.2 and 10.0.2.3 alone, so nothing is sent to such an address (measured:
  EHOSTUNREACH). Everything else the host can reach is reachable. Addresses this host gains
  after a sandbox started are not fenced for that sandbox.

slirp4netns runs as Shuttle's user, in the host's network namespace, so it confines itself as
far as this host lets it (`Slirp.weaker`): `--enable-sandbox` (a mount namespace of its own
holding only /etc and /run, read-only; every capability dropped but binding low ports; no new
privileges) and `--enable-seccomp` (its system call filter, which slirp4netns calls
experimental). A Shuttle that is not root goes without the sandbox where it fails (it needs
root mapped in the sandbox's user namespace, which maps only Shuttle's own user); one that is
root never does. A root Shuttle starts slirp4netns in a mount namespace of its own, with every
mount private (`unshare --mount --propagation private`): slirp4netns builds its sandbox by
pivoting its root and detaching the old one, and as root in the host's mount namespace that
detach reaches every shared mount of the host (measured: `ip netns`' mounts vanished).

Attaching (`Slirp.attach`): slirp4netns enters the user and network namespaces of the
sandbox's first process, which bubblewrap holds before it runs the program, through fds that
Shuttle opened (so a pid reused in between cannot redirect it), creates and configures tap0,
then reports on its ready fd (`Link.ready`); only then does the program run, so it never runs
without its network. A failure to start, or no report within `_READY_TIMEOUT_S`, fails the
attempt with slirp4netns's own words.

Ending: slirp4netns exits when the write end of its exit fd closes, which Shuttle holds alone:
the attempt's end closes it (and SIGKILLs slirp4netns, and reaps it), and so does the death of
Shuttle itself, SIGKILL included. Its stdout and stderr go to Shuttle's log (debug level; a
failure, or an end while the sandbox ran, as a warning with its last words).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterable
from pathlib import Path

from treadle.shuttle import reaper
from treadle.shuttle.runtimes._spawn import spawn

__all__ = [
    "LINK_LOCAL",
    "RESOLV_CONF",
    "Link",
    "Slirp",
    "SlirpFailed",
    "fenced",
    "find",
    "interface_bytes",
]

log = logging.getLogger(__name__)

RESOLV_CONF = b"nameserver 10.0.2.3\n"
LINK_LOCAL = "169.254.0.0/16"
_FENCE_TIMEOUT_S = 10.0
# nsenter's fds: the namespaces to enter and ip's batch of routes.
_FENCE_NETNS_FD, _FENCE_USERNS_FD, _FENCE_BATCH_FD = 3, 4, 5
INTERFACE = "tap0"
_MTU = 65520
_READY_TIMEOUT_S = 10.0
# After slirp4netns failed, how long to wait for the rest of its words.
_OUTPUT_GRACE_S = 1.0
_OUTPUT_KEPT = 2048
# slirp4netns's fds: its inputs sit above stdin, stdout and stderr.
_READY_FD, _EXIT_FD, _NETNS_FD, _USERNS_FD = 3, 4, 5, 6


class SlirpFailed(OSError):
    """slirp4netns could not give the sandbox its network; the message says why."""


def find(weaver: Iterable[str] = ()) -> Slirp | None:
    """slirp4netns as found on PATH (with nsenter and ip, which fence the sandbox), or None.
    `weaver`: the addresses of Weaver, fenced off too."""
    path = shutil.which("slirp4netns")
    nsenter, ip, unshare = shutil.which("nsenter"), shutil.which("ip"), shutil.which("unshare")
    if path is None or nsenter is None or ip is None or unshare is None:
        return None
    return Slirp(path, fence_tools=(nsenter, ip), weaver=tuple(weaver), unshare=unshare)


def interface_bytes(net_dev: str) -> tuple[int, int]:
    """Bytes received and sent on every interface but loopback, from a network namespace's
    `/proc/net/dev` (two header lines, then "name: rx_bytes rx_packets ... tx_bytes ...")."""
    received = sent = 0
    for line in net_dev.splitlines()[2:]:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() == "lo" or len(fields) < 9:
            continue
        received += int(fields[0])
        sent += int(fields[8])
    return received, sent


def host_addresses(fib_trie: str | None = None) -> set[str]:
    """This host's own IPv4 addresses but loopback, from the kernel's local routing table."""
    if fib_trie is None:
        try:
            fib_trie = Path("/proc/net/fib_trie").read_text()
        except OSError:
            return set()
    found: set[str] = set()
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|--"):
            last = text[3:].strip()
        elif text == "/32 host LOCAL" and last and not last.startswith("127."):
            found.add(last)
    return found


def fenced(weaver: Iterable[str] = (), fib_trie: str | None = None) -> list[str]:
    """The destinations a networked sandbox must never reach, as routes' prefixes."""
    hosts = host_addresses(fib_trie) | {a for a in weaver if not a.startswith("127.")}
    return [LINK_LOCAL, *(f"{address}/32" for address in sorted(hosts))]


class Slirp:
    """The slirp4netns program of this host, and how it confines itself."""

    def __init__(
        self,
        path: str,
        *,
        sandbox: bool = True,
        seccomp: bool = True,
        fence_tools: tuple[str, str] | None = None,
        weaver: tuple[str, ...] = (),
        unshare: str | None = None,
    ) -> None:
        self.path = path
        self.sandbox = sandbox
        self.seccomp = seccomp
        self._fence_tools = fence_tools
        self._weaver = weaver
        self._unshare = unshare

    def weaker(self) -> Slirp | None:
        """What to try where this fails to run here: without the seccomp filter, then, for a
        Shuttle that is not root, without the sandbox; None when nothing weaker is allowed."""
        if self.seccomp:
            return self._with(sandbox=self.sandbox, seccomp=False)
        if self.sandbox and os.geteuid() != 0:
            return self._with(sandbox=False, seccomp=True)
        return None

    def _with(self, *, sandbox: bool, seccomp: bool) -> Slirp:
        return Slirp(
            self.path,
            sandbox=sandbox,
            seccomp=seccomp,
            fence_tools=self._fence_tools,
            weaver=self._weaver,
            unshare=self._unshare,
        )

    def fenced(self) -> list[str]:
        """The prefixes this node fences a sandbox's network off (see `fenced`)."""
        return fenced(self._weaver)

    async def fence(self, pid: int, pidfd: int) -> None:
        """Fence the network namespace of process `pid` (of which `pidfd` is a pidfd) off
        this host, its cloud and Weaver (see the module's docstring). Raises SlirpFailed
        when that cannot be done: then the sandbox must not get its network."""
        if self._fence_tools is None:
            raise SlirpFailed("nsenter and ip are needed to fence a sandbox's network")
        nsenter, ip = self._fence_tools
        batch = "".join(f"route add prohibit {prefix}\n" for prefix in self.fenced())
        theirs: list[int] = []
        try:
            netns = _open(f"/proc/{pid}/ns/net", theirs)
            userns = _open(f"/proc/{pid}/ns/user", theirs)
            signal.pidfd_send_signal(pidfd, 0)  # still alive: the namespaces are its own
            batch_r, batch_w = os.pipe()
            theirs.append(batch_r)
            try:
                os.write(batch_w, batch.encode())
            finally:
                os.close(batch_w)
            devnull = _open(os.devnull, theirs)
            argv = [nsenter, f"--net=/proc/self/fd/{_FENCE_NETNS_FD}"]
            if os.geteuid() != 0:
                # Its capabilities over the namespace come with its user namespace.
                argv += [f"--user=/proc/self/fd/{_FENCE_USERNS_FD}", "--preserve-credentials"]
            argv += ["--", ip, "-batch", f"/proc/self/fd/{_FENCE_BATCH_FD}"]
            fds = {
                0: devnull,
                1: devnull,
                2: devnull,
                _FENCE_NETNS_FD: netns,
                _FENCE_USERNS_FD: userns,
                _FENCE_BATCH_FD: batch_r,
            }
            try:
                child = spawn(nsenter, argv, {}, Path("/"), fds)
            except OSError as exc:
                raise SlirpFailed(f"cannot fence the sandbox's network: {exc}") from exc
        finally:
            for fd in theirs:
                os.close(fd)
        code = await _exit_code(child)
        if code != 0:
            raise SlirpFailed(f"cannot fence the sandbox's network: ip ended with {code}")

    def describe(self) -> str:
        confined = [
            name for name, used in (("sandbox", self.sandbox), ("seccomp", self.seccomp)) if used
        ]
        return f"{self.path} ({', '.join(confined) or 'unconfined'})"

    def argv(self) -> list[str]:
        return [
            self.path,
            "--configure",
            f"--mtu={_MTU}",
            "--disable-host-loopback",
            *(["--enable-sandbox"] if self.sandbox else []),
            *(["--enable-seccomp"] if self.seccomp else []),
            f"--ready-fd={_READY_FD}",
            f"--exit-fd={_EXIT_FD}",
            "--netns-type=path",
            f"--userns-path=/proc/self/fd/{_USERNS_FD}",
            f"/proc/self/fd/{_NETNS_FD}",
            INTERFACE,
        ]

    def attach(self, pid: int, pidfd: int) -> Link:
        """Start slirp4netns on the network namespace of process `pid`, of which `pidfd` is a
        pidfd; `Link.ready()` then tells when the network is up. Raises ProcessLookupError
        when the process is gone, SlirpFailed when slirp4netns cannot be started."""
        ours: list[int] = []  # closed here if anything fails
        theirs: list[int] = []  # slirp4netns's ends, closed here once it has them
        try:
            netns = _open(f"/proc/{pid}/ns/net", theirs)
            userns = _open(f"/proc/{pid}/ns/user", theirs)
            # Still alive, so the pid was not reused: those namespaces are the process's.
            signal.pidfd_send_signal(pidfd, 0)
            found, own = os.fstat(netns), os.stat("/proc/self/ns/net")
            if (found.st_dev, found.st_ino) == (own.st_dev, own.st_ino):
                raise SlirpFailed("the sandbox has no network namespace of its own")
            ready_r, ready_w = os.pipe()
            ours.append(ready_r)
            theirs.append(ready_w)
            exit_r, exit_w = os.pipe()
            ours.append(exit_w)
            theirs.append(exit_r)
            output_r, output_w = os.pipe()
            ours.append(output_r)
            theirs.append(output_w)
            devnull = _open(os.devnull, theirs)
            fds = {
                0: devnull,
                1: output_w,
                2: output_w,
                _READY_FD: ready_w,
                _EXIT_FD: exit_r,
                _NETNS_FD: netns,
                _USERNS_FD: userns,
            }
            argv = self.argv()
            if self.sandbox and os.geteuid() == 0:
                if self._unshare is None:
                    raise SlirpFailed("unshare (util-linux) is needed to run slirp4netns as root")
                argv = [self._unshare, "--mount", "--propagation", "private", "--", *argv]
            try:
                child = spawn(argv[0], argv, {}, Path("/"), fds)
            except OSError as exc:
                raise SlirpFailed(f"cannot start {self.path}: {exc.strerror or exc}") from exc
            reaper.track(child)
            try:
                child_fd = os.pidfd_open(child)
            except OSError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                reaper.untrack(child)
                raise
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return Link(child, child_fd, ready_fd=ready_r, exit_fd=exit_w, output_fd=output_r)


class Link:
    """One running slirp4netns, serving one sandbox."""

    def __init__(
        self, pid: int, pidfd: int, *, ready_fd: int, exit_fd: int, output_fd: int
    ) -> None:
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = pidfd
        self._ready: int | None = ready_fd
        self._exit: int | None = exit_fd  # its closing ends slirp4netns
        self._output: int | None = output_fd
        self._output_done: asyncio.Future[None] = self._loop.create_future()
        self._tail = bytearray()
        self._line = bytearray()
        self._up = False  # the network was configured
        self._stopped = False
        self._ended: list[Callable[[], None]] = []
        os.set_blocking(output_fd, False)
        self._loop.add_reader(output_fd, self._read_output)
        self._loop.add_reader(pidfd, self._on_exit)

    async def ready(self) -> None:
        """Returns once the sandbox's network is configured; raises SlirpFailed (having
        stopped slirp4netns) when it will not be."""
        assert self._ready is not None
        # Owned here from now on: `close` meanwhile must not close it under its reader (and
        # this `finally` then close the same number again, by then perhaps another file's).
        fd, self._ready = self._ready, None
        report: asyncio.Future[bytes] = self._loop.create_future()

        def readable() -> None:
            try:
                data = os.read(fd, 16)
            except BlockingIOError:
                return
            if not report.done():
                report.set_result(data)

        os.set_blocking(fd, False)
        self._loop.add_reader(fd, readable)
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                said = await report
        except TimeoutError:
            self.stop()
            raise SlirpFailed(
                f"slirp4netns did not set up the network within {_READY_TIMEOUT_S:.0f}s"
            ) from None
        finally:
            self._loop.remove_reader(fd)
            os.close(fd)
        if said.startswith(b"1"):
            self._up = True
            return
        # It ended without a word on the ready fd: its output says why.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_OUTPUT_GRACE_S):
                await asyncio.shield(self._output_done)
        self.stop()
        words = self._tail.decode(errors="replace").strip().replace("\n", "; ")
        raise SlirpFailed(f"slirp4netns failed to set up the network: {words or 'it said nothing'}")

    def stop(self) -> None:
        """End slirp4netns now (idempotent); `when_ended` tells when it is gone."""
        self._stopped = True
        if self._exit is not None:
            os.close(self._exit)
            self._exit = None
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def when_ended(self, callback: Callable[[], None]) -> None:
        """Call `callback` once slirp4netns has ended and been reaped (at once if it has)."""
        if self._pidfd is None:
            callback()
        else:
            self._ended.append(callback)

    def close(self) -> None:
        """Stop slirp4netns and release all the link holds, without waiting: a slirp4netns
        not yet gone is left to the reaper's sweep."""
        self.stop()
        self._reap()
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
            reaper.untrack(self.pid)
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None
        self._close_output()
        self._ended.clear()

    def _on_exit(self) -> None:
        if not self._reap():
            return  # spurious wake-up
        for callback in self._ended:
            callback()
        self._ended.clear()

    def _reap(self) -> bool:
        """Whether slirp4netns has been reaped, now or before."""
        if self._pidfd is None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return False
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        reaper.untrack(self.pid)
        if self._up and not self._stopped:
            log.warning(
                "slirp4netns %d ended (%s) while its sandbox ran: %s",
                self.pid,
                _describe(status),
                self._tail.decode(errors="replace").strip() or "it said nothing",
            )
        return True

    def _read_output(self) -> None:
        assert self._output is not None
        try:
            data = os.read(self._output, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_output()
            return
        self._tail += data
        del self._tail[:-_OUTPUT_KEPT]
        self._line += data
        *lines, rest = self._line.split(b"\n")
        self._line = bytearray(rest)
        for line in lines:
            log.debug("slirp4netns %d: %s", self.pid, line.decode(errors="replace"))

    def _close_output(self) -> None:
        if self._output is None:
            return
        self._loop.remove_reader(self._output)
        os.close(self._output)
        self._output = None
        if self._line:
            log.debug("slirp4netns %d: %s", self.pid, self._line.decode(errors="replace"))
            self._line.clear()
        if not self._output_done.done():
            self._output_done.set_result(None)


async def _exit_code(pid: int) -> int:
    """Wait for child `pid` without blocking the loop; SIGKILL it past the fence's timeout."""
    reaper.track(pid)
    pidfd = os.pidfd_open(pid)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        try:
            async with asyncio.timeout(_FENCE_TIMEOUT_S):
                await asyncio.shield(ended)  # the timeout must not cancel `ended` itself
        except TimeoutError:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            # Through the loop, not a blocking waitid: uvloop's add_reader leaves the pidfd
            # non-blocking, and waitid on it then fails at once while the child still lives.
            await ended
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return _reaped(pid)


def _reaped(pid: int) -> int:
    """The exit code of child `pid`, which has ended: reaping it does not block."""
    _, status = os.waitpid(pid, os.WNOHANG)
    reaper.untrack(pid)
    return os.waitstatus_to_exitcode(status)


def _open(path: str, opened: list[int]) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    opened.append(fd)
    return fd


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit code {code}"
