"""The guest agent's own Python: a small, self-contained copy of Shuttle's interpreter that
every sandbox gets, read-only, at `MOUNT_POINT`, so that the agent runs the same in any image
(busybox, distroless: nothing is required inside it) and a tenant's image cannot put its own
`python3` in its place.

The runtime is a directory built once per node and interpreter, under the node's state root
(`treadle.shuttle.sandbox.state`), named by a hash of the interpreter's version and of every
file it is made of (host path, size, modification time), so that an upgrade of the host's
Python or libc makes a new one::

    bin/python3.X                   the interpreter (Shuttle's own, sys._base_executable)
    bin/python3 -> ../lib/ld-…so.2  what is run: the dynamic loader (see below)
    lib/ld-linux-x86-64.so.2, lib/libc.so.6, …
                                    the loader and every shared library the interpreter and
                                    the agent's extension modules load, by their sonames
    lib/python3.X/…                 the standard-library modules the agent imports (found by
                                    importing them in a trial run), all of `encodings`, with
                                    their bytecode; lib-dynload/ their extension modules
    libexec/sudo.py                 `sudo` (`treadle.guest.sudo`), run on this Python
    libexec/ctrl.py                 a desktop's ctrl (`treadle.guest.ctrl`), run on the
                                    sandbox's own Python
    tools/sudo                      the command that runs it: the directory that a sandbox
                                    with sudo has first on its PATH (`TOOLS`)

Nothing else of the host is in it. Binaries are stripped of debug information and local
symbols where `strip` is installed (a shared libpython carries tens of MB of them).

Running it: `bin/python3 --library-path <dir>/lib <dir>/bin/python3.X -I -S -c SRC`. The
loader is run explicitly, so neither the image's loader nor its libraries are used, and the
library path is an option of that one process, not an environment variable that the agent's
children (what users exec) would inherit. It is reached through `bin/python3` so that the
agent's process is, by its command line, the `python3` it is. Python finds its standard
library on its own, from where its executable lies (`lib/python3.X/os.py` beside `bin/`),
which `-I` (that ignores PYTHONHOME) needs.

Building is atomic: a finished tree in `tmp/` is renamed into place, and a Shuttle that loses
a race with another uses the winner's. A built runtime is never modified, so a sandbox can
mount it while another Shuttle builds its own.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from treadle.shuttle.sandbox.state import private_dir, state_root

__all__ = [
    "LIBEXEC",
    "MOUNT_POINT",
    "TOOLS",
    "AgentRuntime",
    "RuntimeBuildError",
    "ensure",
    "ensure_async",
    "prepare",
]

log = logging.getLogger(__name__)

# Where every sandbox sees the runtime: hidden from a plain `ls /`, and not a place any
# image uses.
MOUNT_POINT = "/.treadle/agent"
# Programs for the sandbox's own processes (`sudo`): a directory of the mounted runtime.
TOOLS = f"{MOUNT_POINT}/tools"
# Programs' sources, as the sandbox sees them.
LIBEXEC = f"{MOUNT_POINT}/libexec"
# The layout's version: a change of this module's output changes every runtime's name.
_FORMAT = 2
# The programs of `TOOLS`, each run on the runtime's Python from `libexec/`.
_TOOL_SOURCES = {"sudo": "sudo.py"}
# Programs in `libexec/` that the sandbox's own Python runs (the desktop's ctrl, which needs
# the sandbox's X and imaging libraries): copied, their imports none of the runtime's.
_SANDBOX_PROGRAMS = ("ctrl.py",)
_ENTRY = "python3"
_DISCOVER_TIMEOUT_S = 60.0
_STRIP_TIMEOUT_S = 120.0
_STALE_BUILD_S = 3600.0

# Run by the interpreter to copy, isolated (-I -S) as the agent is: imports the modules named
# in argv (those after "--" where they can be), and reports what that loaded, Python files and
# mapped shared objects alike.
_DISCOVER = """
import sys
split = sys.argv.index("--")
for name in sys.argv[1:split]:
    __import__(name)
missing = []
for name in sys.argv[split + 1:]:
    try:
        __import__(name)
    except ImportError:
        missing.append(name)
import json, os
files = sorted({m.__file__ for m in list(sys.modules.values())
                if isinstance(getattr(m, "__file__", None), str)})
mapped = set()
with open("/proc/self/maps") as maps:
    for line in maps:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/"):
            mapped.add(fields[5].strip())
print(json.dumps({
    "version": sys.version,
    "version_info": list(sys.version_info[:2]),
    "platlibdir": sys.platlibdir,
    "stdlib": os.path.dirname(os.__file__),
    "path": sys.path,
    "files": files,
    "mapped": sorted(mapped),
    "missing": missing,
}))
"""

# Run by the interpreter to copy: compiles the sources named on stdin (a JSON list), each
# into its __pycache__, as `import` would name it, mode 0644.
_COMPILE = """
import importlib.util, json, os, py_compile, sys
for source in json.load(sys.stdin):
    cache = importlib.util.cache_from_source(source)
    py_compile.compile(source, cfile=cache, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    os.chmod(cache, 0o644)
    os.chmod(os.path.dirname(cache), 0o755)
"""


class RuntimeBuildError(OSError):
    """The agent's runtime cannot be built on this node; the message says why."""


@dataclass(frozen=True, slots=True)
class AgentRuntime:
    """A built runtime. `path` is its directory on the host; `built` tells whether this call
    made it (False: it was found ready)."""

    path: Path
    interpreter: str  # its name under bin/, e.g. "python3.11"
    loader: str | None  # the dynamic loader's name under lib/; None for a static interpreter
    version: str
    size_bytes: int
    files: int
    built: bool = False

    def argv(self, root: str) -> list[str]:
        """The command that starts the runtime's Python where the sandbox sees the runtime
        at `root`; Python's options and the program follow."""
        return _argv(root, self.interpreter, self.loader)


def _argv(root: str, interpreter: str, loader: str | None) -> list[str]:
    program = f"{root}/bin/{interpreter}"
    if loader is None:
        return [program]
    return [f"{root}/bin/{_ENTRY}", "--library-path", f"{root}/lib", program]


def default_root() -> Path:
    """Where this node keeps its runtimes: traversable (not listable) by the sandboxes'
    users, whose tools (bubblewrap, gVisor's gofer) open the runtime by its host path."""
    return private_dir(state_root() / "agent-runtime")


# By root (None: the node's): what this process found or built.
_CACHE: dict[Path | None, AgentRuntime] = {}
_LOCK = threading.Lock()


def ensure(root: Path | None = None) -> AgentRuntime:
    """The runtime under `root` (default: the node's), built if missing; found once per
    process, then remembered (while its directory is there). Blocking: a trial run of the
    interpreter (~50 ms), and a build (~0.3 s) where none is there."""
    with _LOCK:
        found = _CACHE.get(root)
        if found is None or not found.path.is_dir():
            found = _CACHE[root] = prepare(default_root() if root is None else root)
        return found


async def ensure_async(root: Path | None = None) -> AgentRuntime:
    """`ensure`, off the event loop where it has work to do."""
    found = _CACHE.get(root)
    if found is not None and found.path.is_dir():
        return found
    return await asyncio.to_thread(ensure, root)


def prepare(root: Path, *, python: str | None = None) -> AgentRuntime:
    """Find out what the agent needs, and build the runtime under `root` unless a runtime
    of the same files is there already. `python`: the interpreter to copy (default:
    Shuttle's own); any Python 3.9+, which compiles the runtime's bytecode itself."""
    executable = os.path.realpath(python or getattr(sys, "_base_executable", "") or sys.executable)
    plan = _plan(executable, *_agent_modules())
    final = root / plan.name
    if not final.is_dir():
        started = time.monotonic()
        _build(plan, root, final)
        runtime = plan.runtime(final, built=True)
        log.info(
            "agent runtime: built %s (%d files, %.1f MiB) in %.2fs",
            final,
            runtime.files,
            runtime.size_bytes / 2**20,
            time.monotonic() - started,
        )
        return runtime
    return plan.runtime(final, built=False)


def _agent_modules() -> tuple[list[str], list[str]]:
    """The modules the guest agent's source imports at its start, and those it imports
    later, where a feature needs them (`pty` for terminals, say)."""
    with _PARSE_LOCK:  # `ast.parse` in two threads at once fails on CPython 3.11
        if not _MODULES:
            _MODULES.append(_imports())
        return _MODULES[0]


_PARSE_LOCK = threading.Lock()
_MODULES: list[tuple[list[str], list[str]]] = []


def _imports() -> tuple[list[str], list[str]]:
    first: set[str] = set()
    later: set[str] = set()
    for source in ("agent.py", *_TOOL_SOURCES.values()):
        tree = ast.parse(resources.files("treadle.guest").joinpath(source).read_text())
        # What the tools import is needed only when they run, not at the agent's start.
        at_start = {id(node) for node in tree.body} if source == "agent.py" else set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = {node.module}
            else:
                continue
            (first if id(node) in at_start else later).update(names)
    return sorted(first), sorted(later - first)


@dataclass(frozen=True, slots=True)
class _File:
    source: Path
    dest: str  # relative to the runtime's directory
    kind: str  # "elf", "py" (a module, compiled) or "tool" (a program's source, as is)


@dataclass(frozen=True, slots=True)
class _Plan:
    name: str
    interpreter: str
    loader: str | None
    version: str
    executable: str  # the interpreter copied, on the host
    files: tuple[_File, ...]

    def runtime_argv(self, root: str) -> list[str]:
        return _argv(root, self.interpreter, self.loader)

    def runtime(self, path: Path, *, built: bool) -> AgentRuntime:
        size = count = 0
        for dirpath, _, filenames in os.walk(path):
            for filename in filenames:
                size += os.lstat(os.path.join(dirpath, filename)).st_size
                count += 1
        return AgentRuntime(
            path=path,
            interpreter=self.interpreter,
            loader=self.loader,
            version=self.version,
            size_bytes=size,
            files=count,
            built=built,
        )


def _plan(executable: str, first: Iterable[str], later: Iterable[str]) -> _Plan:
    found = _discover(executable, [*first, "--", *later])
    if found["missing"]:
        # The agent starts without them; only what needs them fails, as on a host without.
        log.warning("agent runtime: %s cannot import %s", executable, ", ".join(found["missing"]))
    major, minor = found["version_info"]
    interpreter = f"python{major}.{minor}"
    stdlib_dest = f"{found['platlibdir']}/{interpreter}"
    stdlib = os.path.realpath(found["stdlib"])
    dynload = next((p for p in found["path"] if p.endswith("lib-dynload")), None)
    dynload = os.path.realpath(dynload) if dynload else None
    files: dict[str, _File] = {}

    def add(source: str, dest: str, kind: str) -> None:
        files.setdefault(dest, _File(Path(source), dest, kind))

    add(executable, f"bin/{interpreter}", "elf")
    program = _elf(executable)
    if program is None:
        raise RuntimeBuildError(f"{executable} is not an ELF program")
    interp = program.interp
    loader = os.path.basename(interp) if interp else None
    loader_real = os.path.realpath(interp) if interp else None
    for path in found["mapped"]:
        real = os.path.realpath(path)
        if real == executable or not os.path.isfile(real):
            continue
        elf = _elf(real)
        if elf is None:  # the loader's cache, a locale: not something Python needs
            continue
        if real == loader_real:
            assert loader is not None
            add(real, f"lib/{loader}", "elf")
        elif _under(real, dynload) or _under(real, stdlib):
            continue  # an extension module: copied with the modules below
        else:
            add(real, f"lib/{elf.soname or os.path.basename(real)}", "elf")
    for name in found["files"]:
        real = os.path.realpath(name)
        if _under(real, stdlib):
            dest = f"{stdlib_dest}/{os.path.relpath(real, stdlib)}"
        elif _under(real, dynload):
            dest = f"{stdlib_dest}/lib-dynload/{os.path.basename(real)}"
        else:
            raise RuntimeBuildError(f"the agent imports {name}, outside the standard library")
        add(real, dest, "py" if real.endswith(".py") else "elf")
    guest = resources.files("treadle.guest")
    for source in (*_TOOL_SOURCES.values(), *_SANDBOX_PROGRAMS):
        add(str(guest.joinpath(source)), f"libexec/{source}", "tool")
    # Its landmark: where Python finds it, it takes the directory above bin/ for its prefix.
    add(os.path.join(stdlib, "os.py"), f"{stdlib_dest}/os.py", "py")
    encodings = os.path.join(stdlib, "encodings")
    for entry in sorted(os.listdir(encodings)):
        if entry.endswith(".py"):
            add(os.path.join(encodings, entry), f"{stdlib_dest}/encodings/{entry}", "py")
    if loader is not None and f"lib/{loader}" not in files:
        raise RuntimeBuildError(f"the dynamic loader {interp} was not found loaded")
    ordered = tuple(sorted(files.values(), key=lambda f: f.dest))
    digest = hashlib.sha256()
    digest.update(json.dumps([_FORMAT, found["version"]]).encode())
    for file in ordered:
        info = os.stat(file.source)
        digest.update(
            json.dumps([file.dest, str(file.source), info.st_size, info.st_mtime_ns]).encode()
        )
    return _Plan(
        name=f"{interpreter}-{digest.hexdigest()[:20]}",
        interpreter=interpreter,
        loader=loader,
        version=found["version"],
        executable=executable,
        files=ordered,
    )


# The interpreter's environment: no locale (nothing of one is needed, or copied), and the
# library path where Shuttle's own Python needs one to start.
_ENV = {k: v for k, v in os.environ.items() if k == "LD_LIBRARY_PATH"}


def _discover(executable: str, arguments: Iterable[str]) -> dict[str, Any]:
    out = _python(executable, [_DISCOVER, *arguments], b"", "import the agent's modules")
    found: dict[str, Any] = json.loads(out)
    return found


def _python(executable: str, argv: list[str], stdin: bytes, doing: str) -> bytes:
    """Run `executable -I -S -c ...` (a trial run or a compile); its stdout, or a
    RuntimeBuildError saying what failed."""
    try:
        proc = subprocess.run(
            [executable, "-I", "-S", "-c", *argv],
            input=stdin,
            env=_ENV,
            capture_output=True,
            timeout=_DISCOVER_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeBuildError(f"cannot run {executable}: {exc}") from None
    if proc.returncode != 0:
        said = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeBuildError(f"{executable} cannot {doing}: {said[0]}")
    return proc.stdout


def _under(path: str, directory: str | None) -> bool:
    return directory is not None and path.startswith(directory.rstrip("/") + "/")


def _build(plan: _Plan, root: Path, final: Path) -> None:
    tmp = root / "tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    _sweep(tmp)
    staging = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{plan.name}."))
    try:
        elves: list[Path] = []
        sources: list[str] = []
        for file in plan.files:
            dest = staging / file.dest
            dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            shutil.copyfile(file.source, dest)
            # Keep the source's times: the bytecode below records them.
            info = os.stat(file.source)
            os.utime(dest, ns=(info.st_atime_ns, info.st_mtime_ns))
            dest.chmod(0o755 if file.kind == "elf" else 0o644)
            if file.kind == "elf":
                elves.append(dest)
            elif file.kind == "py":
                sources.append(str(dest))
        _compile(plan.executable, sources)
        _strip(elves)
        target = f"../lib/{plan.loader}" if plan.loader else plan.interpreter
        os.symlink(target, staging / "bin" / _ENTRY)
        _write_tools(plan, staging)
        for directory in _directories(staging):
            directory.chmod(0o755)
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    except OSError as exc:
        if final.is_dir():
            return
        raise RuntimeBuildError(f"cannot build the agent runtime in {final}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_tools(plan: _Plan, staging: Path) -> None:
    """`tools/NAME`: a shell script that runs the tool's source on the runtime's Python, as
    the sandbox sees the runtime (at `MOUNT_POINT`)."""
    tools = staging / "tools"
    tools.mkdir(mode=0o755)
    python = " ".join(plan.runtime_argv(MOUNT_POINT))
    for name, source in _TOOL_SOURCES.items():
        script = tools / name
        script.write_text(f'#!/bin/sh\nexec {python} -I -S {MOUNT_POINT}/libexec/{source} "$@"\n')
        script.chmod(0o755)


def _sweep(tmp: Path) -> None:
    """Remove what builds that did not finish (their Shuttle died) left in `tmp`: anything
    older than any build takes."""
    now = time.time()
    for entry in tmp.iterdir():
        with contextlib.suppress(OSError):
            if now - entry.lstat().st_mtime > _STALE_BUILD_S:
                shutil.rmtree(entry)


def _directories(top: Path) -> Iterator[Path]:
    yield top
    for dirpath, dirnames, _ in os.walk(top):
        for name in dirnames:
            yield Path(dirpath) / name


def _compile(executable: str, sources: list[str]) -> None:
    """Bytecode beside each source, by the interpreter that will run it, checked by nothing
    at import (the runtime never changes): the agent starts without compiling, and without
    a stat of each source."""
    _python(executable, [_COMPILE], json.dumps(sources).encode(), "compile the agent's modules")


def _strip(paths: list[Path]) -> None:
    """Drop debug information and local symbols (a shared libpython carries tens of MB of
    them); where `strip` is missing or fails, the files stay as they are."""
    tool = shutil.which("strip")
    if tool is None or not paths:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run(
            [tool, "--strip-unneeded", *map(str, paths)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_STRIP_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            log.info("agent runtime: strip failed: %s", done.stderr.decode(errors="replace"))


# ELF: just enough to read a file's program interpreter and soname.


@dataclass(frozen=True, slots=True)
class _Elf:
    interp: str | None
    soname: str | None


_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_STRTAB, _DT_SONAME = 0, 5, 14


def _elf(path: str) -> _Elf | None:
    """The program interpreter and soname of the ELF file `path`; None if it is not one."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read_elf(data)
    except (OSError, struct.error, ValueError, IndexError):
        return None


def _read_elf(data: mmap.mmap) -> _Elf | None:
    if data[:4] != b"\x7fELF":
        return None
    wide = data[4] == 2
    order = "<" if data[5] == 1 else ">"
    if wide:
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "Q", data, 32)[0],
            *struct.unpack_from(order + "HH", data, 54),
        )
        segment = struct.Struct(order + "IIQQQQQQ")  # type flags offset vaddr paddr filesz ..
        dyn = struct.Struct(order + "qQ")
    else:
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "I", data, 28)[0],
            *struct.unpack_from(order + "HH", data, 42),
        )
        segment = struct.Struct(order + "IIIIIIII")  # type offset vaddr paddr filesz memsz ..
        dyn = struct.Struct(order + "iI")
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    interp = None
    dynamic: tuple[int, int] | None = None  # (offset, size)
    for index in range(phnum):
        fields = segment.unpack_from(data, phoff + index * phentsize)
        if wide:
            kind, _, offset, vaddr, _, filesz = fields[:6]
        else:
            kind, offset, vaddr, _, filesz = fields[:5]
        if kind == _PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif kind == _PT_INTERP:
            interp = data[offset : offset + filesz].split(b"\0", 1)[0].decode()
        elif kind == _PT_DYNAMIC:
            dynamic = (offset, filesz)
    soname = None
    if dynamic is not None:
        strtab = soname_at = None
        offset, size = dynamic
        for position in range(offset, offset + size, dyn.size):
            tag, value = dyn.unpack_from(data, position)
            if tag == _DT_NULL:
                break
            if tag == _DT_STRTAB:
                strtab = value
            elif tag == _DT_SONAME:
                soname_at = value
        if strtab is not None and soname_at is not None:
            for vaddr, file_offset, filesz in loads:
                if vaddr <= strtab < vaddr + filesz:
                    start = strtab - vaddr + file_offset + soname_at
                    soname = data[start : data.find(b"\0", start)].decode()
                    break
    return _Elf(interp, soname)
