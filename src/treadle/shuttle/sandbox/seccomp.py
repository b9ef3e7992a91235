"""The seccomp policy of sandboxed code, one for every tier: the calls it denies, by name, with
their numbers per architecture, rendered as a classic BPF program built here (no libseccomp)
for bubblewrap (`deny_filter`) and as the `linux.seccomp` of an OCI bundle (`oci_profile`) for
crun, runc and runsc. tests/unit/test_seccomp.py runs both renderings over every call in the
tables and checks that they give the same verdicts.

It denies, with EPERM, the system calls that code in a sandbox never needs and that widen the
kernel's attack surface or reach outside the sandbox: tracing other processes, (re)mounting
(the read-only binds are only as read-only as the mount table is frozen), module and kexec
loading, BPF, perf, keyrings, userfaultfd, io_uring (its requests bypass seccomp), file handles
(`open_by_handle_at` walks outside a bind mount), new namespaces (`unshare`, `setns`, and
`clone` with a CLONE_NEW* flag), and sockets of a few families (`DENIED_FAMILIES`: vsock above
all, which no network namespace confines). `clone3` answers ENOSYS: its flags sit behind a
pointer the filter cannot read, and ENOSYS makes libc fall back to `clone`, whose flags it can.

The filter checks the architecture first: a call made through another ABI (x32 numbers on
x86-64, or a 32-bit `int 0x80` call, whose numbers differ) is denied outright, or the numbers
below would be checked against the wrong table.

bubblewrap installs the filter (`--seccomp FD`) right before it executes the program, after its
own namespace and mount set-up, so the filter never has to allow what bubblewrap needs; the
OCI runtimes do the same with the profile (gVisor's sentry applies it to the program's calls
to its own kernel).
"""

from __future__ import annotations

import errno
import platform
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AARCH64",
    "AUDIT_ARCH_AARCH64",
    "AUDIT_ARCH_X86_64",
    "DENIED",
    "DENIED_FAMILIES",
    "SECCOMP_RET_ALLOW",
    "SECCOMP_RET_ERRNO",
    "X86_64",
    "Arch",
    "arch_for_machine",
    "deny_filter",
    "oci_profile",
]

# linux/audit.h
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
# linux/seccomp.h
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
# linux/filter.h opcodes (classic BPF)
BPF_LD_W_ABS = 0x20  # A = *(u32 *)(seccomp_data + k)
BPF_JEQ_K = 0x15  # pc += (A == k) ? jt : jf
BPF_JGE_K = 0x35  # pc += (A >= k) ? jt : jf
BPF_JSET_K = 0x45  # pc += (A & k) ? jt : jf
BPF_RET_K = 0x06  # return k

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARG0_LOW = 16  # the low word of args[0] on a little-endian machine

_X32_SYSCALL_BIT = 0x40000000
# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
# CLONE_NEWNET. (CLONE_NEWTIME shares its bit with the exit signal in clone(); only clone3
# and unshare take it, and both are refused anyway.)
_CLONE_NEW_FLAGS = 0x7E020000

# What the sandbox may never do, by name; numbers per architecture below.
DENIED = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "reboot",
    "swapon",
    "swapoff",
    "syslog",
    "name_to_handle_at",
    "open_by_handle_at",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "unshare",
    "setns",
)


# Calls added since Linux 5.1 have one number on every architecture (asm-generic/unistd.h).
_SHARED_NUMBERS = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
}


# Socket families a sandbox may not open, whatever its network: AF_VSOCK reaches the
# hypervisor and the host's other guests, and no network namespace confines it (measured: a
# sandbox without network could listen on the machine's vsock ports); AF_ALG, AF_RDS and
# AF_TIPC are kernel code that sandboxed programs do not need and that exploits have used.
DENIED_FAMILIES = {"AF_RDS": 21, "AF_TIPC": 30, "AF_ALG": 38, "AF_VSOCK": 40}


@dataclass(frozen=True)
class Arch:
    name: str
    audit: int
    numbers: Mapping[str, int]
    # Numbers at or above this bit belong to another ABI on the same architecture (x32).
    foreign_bit: int | None = None
    # libseccomp's name of the architecture, as OCI profiles give it
    oci: str = ""


# asm/unistd_64.h
X86_64 = Arch(
    "x86_64",
    AUDIT_ARCH_X86_64,
    {
        "clone": 56,
        "socket": 41,
        "socketpair": 53,
        "ptrace": 101,
        "syslog": 103,
        "pivot_root": 155,
        "mount": 165,
        "umount2": 166,
        "swapon": 167,
        "swapoff": 168,
        "reboot": 169,
        "init_module": 175,
        "delete_module": 176,
        "kexec_load": 246,
        "add_key": 248,
        "request_key": 249,
        "keyctl": 250,
        "unshare": 272,
        "perf_event_open": 298,
        "name_to_handle_at": 303,
        "open_by_handle_at": 304,
        "setns": 308,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "kcmp": 312,
        "finit_module": 313,
        "kexec_file_load": 320,
        "bpf": 321,
        "userfaultfd": 323,
        **_SHARED_NUMBERS,
    },
    foreign_bit=_X32_SYSCALL_BIT,
    oci="SCMP_ARCH_X86_64",
)

# asm-generic/unistd.h
AARCH64 = Arch(
    "aarch64",
    AUDIT_ARCH_AARCH64,
    {
        "umount2": 39,
        "mount": 40,
        "pivot_root": 41,
        "unshare": 97,
        "kexec_load": 104,
        "init_module": 105,
        "delete_module": 106,
        "syslog": 116,
        "ptrace": 117,
        "reboot": 142,
        "add_key": 217,
        "request_key": 218,
        "keyctl": 219,
        "clone": 220,
        "socket": 198,
        "socketpair": 199,
        "swapon": 224,
        "swapoff": 225,
        "perf_event_open": 241,
        "name_to_handle_at": 264,
        "open_by_handle_at": 265,
        "setns": 268,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "kcmp": 272,
        "finit_module": 273,
        "bpf": 280,
        "userfaultfd": 282,
        "kexec_file_load": 294,
        **_SHARED_NUMBERS,
    },
    oci="SCMP_ARCH_AARCH64",
)

_MACHINES = {"x86_64": X86_64, "amd64": X86_64, "aarch64": AARCH64, "arm64": AARCH64}


def arch_for_machine(machine: str | None = None) -> Arch | None:
    """The table for `machine` (default: this one), or None where there is none."""
    return _MACHINES.get((machine or platform.machine()).lower())


def deny_filter(arch: Arch, denied: Iterable[str] = DENIED) -> bytes:
    """The filter program, as the array of `struct sock_filter` that `--seccomp` reads."""
    program = _Program()
    program.load(_OFFSET_ARCH)
    program.jump_unless(BPF_JEQ_K, arch.audit, "foreign")
    program.load(_OFFSET_NR)
    if arch.foreign_bit is not None:
        program.jump_if(BPF_JGE_K, arch.foreign_bit, "foreign")
    for name in sorted(set(denied), key=lambda n: arch.numbers[n]):
        program.jump_if(BPF_JEQ_K, arch.numbers[name], "eperm")
    program.jump_if(BPF_JEQ_K, arch.numbers["clone3"], "enosys")
    program.jump_if(BPF_JEQ_K, arch.numbers["socket"], "family")
    program.jump_if(BPF_JEQ_K, arch.numbers["socketpair"], "family")
    program.jump_unless(BPF_JEQ_K, arch.numbers["clone"], "allow")
    program.load(_OFFSET_ARG0_LOW)
    program.jump_if(BPF_JSET_K, _CLONE_NEW_FLAGS, "eperm")
    program.label("allow")
    program.ret(SECCOMP_RET_ALLOW)
    program.label("family")
    program.load(_OFFSET_ARG0_LOW)
    for family in sorted(DENIED_FAMILIES.values()):
        program.jump_if(BPF_JEQ_K, family, "eperm")
    program.ret(SECCOMP_RET_ALLOW)
    program.label("eperm")
    program.ret(SECCOMP_RET_ERRNO | errno.EPERM)
    program.label("enosys")
    program.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    program.label("foreign")
    program.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    return program.assemble()


def oci_profile(
    arch: Arch, denied: Iterable[str] = DENIED, *, clone3: bool = True
) -> dict[str, Any]:
    """The same policy as `deny_filter`, as an OCI runtime-spec `linux.seccomp`: allowed by
    default; EPERM for every denied call and for clone() with any CLONE_NEW* flag (one rule
    per flag: a masked comparison tests one value); ENOSYS for clone3 (with `clone3`;
    gVisor's sentry answers it so itself, and turns an errno rule into EPERM). Only the
    native ABI is listed: calls through another one (32-bit, x32) meet the runtime's
    bad-architecture action, which never allows them, as the BPF filter denies them."""
    flags = [1 << bit for bit in range(32) if _CLONE_NEW_FLAGS & (1 << bit)]
    rules: list[dict[str, Any]] = [
        {
            "names": sorted(set(denied), key=lambda n: arch.numbers[n]),
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": errno.EPERM,
        },
        *(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            }
            for flag in flags
        ),
    ]
    rules += [
        {
            "names": ["socket", "socketpair"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": errno.EPERM,
            "args": [
                {"index": 0, "value": 0xFFFFFFFF, "valueTwo": family, "op": "SCMP_CMP_MASKED_EQ"}
            ],
        }
        for family in sorted(DENIED_FAMILIES.values())
    ]
    if clone3:
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": [arch.oci], "syscalls": rules}


class _Program:
    """Straight-line code with forward jumps to labels; every jump has one branch that falls
    through to the next instruction."""

    def __init__(self) -> None:
        # (code, jt, jf, k); a jump's target is a label name until assembly.
        self._code: list[tuple[int, int | str, int | str, int]] = []
        self._labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self._code.append((BPF_LD_W_ABS, 0, 0, offset))

    def jump_if(self, op: int, k: int, label: str) -> None:
        self._code.append((op, label, 0, k))

    def jump_unless(self, op: int, k: int, label: str) -> None:
        self._code.append((op, 0, label, k))

    def ret(self, k: int) -> None:
        self._code.append((BPF_RET_K, 0, 0, k))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self._code):
            out += struct.pack("=HBBI", code, self._offset(pc, jt), self._offset(pc, jf), k)
        return bytes(out)

    def _offset(self, pc: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        offset = self._labels[target] - pc - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump to {target!r} out of range: {offset}")
        return offset
