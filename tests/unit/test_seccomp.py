"""The seccomp filter generator, checked by running its program on a small classic-BPF
interpreter (the kernel's own verdicts are checked by tests/contract/test_escape.py)."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from treadle.shuttle.sandbox import seccomp
from treadle.shuttle.sandbox.seccomp import (
    AARCH64,
    AUDIT_ARCH_AARCH64,
    AUDIT_ARCH_X86_64,
    DENIED,
    DENIED_FAMILIES,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    X86_64,
    Arch,
    deny_filter,
    oci_profile,
)

EPERM = SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS
AUDIT_ARCH_I386 = 0x40000003
CLONE_THREAD_FLAGS = 0x003D0F00  # what glibc's pthread_create passes
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
BPF_MAXINSNS = 4096


def verdict(program: bytes, nr: int, arch: int, arg0: int = 0) -> int:
    """What the kernel would do with the call: the value the program returns."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    code = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    pc, a = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        if op == seccomp.BPF_LD_W_ABS:
            (a,) = struct.unpack_from("=I", data, k)
            pc += 1
        elif op == seccomp.BPF_RET_K:
            return k
        else:
            taken = {
                seccomp.BPF_JEQ_K: a == k,
                seccomp.BPF_JGE_K: a >= k,
                seccomp.BPF_JSET_K: bool(a & k),
            }[op]
            pc += 1 + (jt if taken else jf)


@pytest.mark.parametrize("arch", [X86_64, AARCH64], ids=lambda a: a.name)
def test_every_denied_call_answers_eperm(arch: Arch) -> None:
    program = deny_filter(arch)

    for name in DENIED:
        assert verdict(program, arch.numbers[name], arch.audit) == EPERM, name


@pytest.mark.parametrize(
    ("arch", "allowed"),
    [
        (X86_64, {"read": 0, "write": 1, "openat": 257, "execve": 59, "fork": 57, "kill": 62}),
        (AARCH64, {"read": 63, "write": 64, "openat": 56, "execve": 221, "kill": 129}),
    ],
    ids=["x86_64", "aarch64"],
)
def test_ordinary_calls_are_allowed(arch: Arch, allowed: dict[str, int]) -> None:
    program = deny_filter(arch)

    for name, number in allowed.items():
        assert verdict(program, number, arch.audit) == SECCOMP_RET_ALLOW, name


@pytest.mark.parametrize("arch", [X86_64, AARCH64], ids=lambda a: a.name)
def test_clone_is_allowed_for_processes_and_threads_but_not_namespaces(arch: Arch) -> None:
    program = deny_filter(arch)
    clone = arch.numbers["clone"]

    assert verdict(program, clone, arch.audit, 17) == SECCOMP_RET_ALLOW  # fork(): SIGCHLD
    assert verdict(program, clone, arch.audit, CLONE_THREAD_FLAGS) == SECCOMP_RET_ALLOW
    assert verdict(program, clone, arch.audit, CLONE_NEWUSER | 17) == EPERM
    assert verdict(program, clone, arch.audit, CLONE_NEWNET) == EPERM
    # clone3 hides its flags behind a pointer: ENOSYS sends libc back to clone.
    assert verdict(program, arch.numbers["clone3"], arch.audit) == ENOSYS


def test_other_abis_are_refused() -> None:
    program = deny_filter(X86_64)

    # x32: x86-64's own arch value, numbers with bit 30 set (0x40000000 + read).
    assert verdict(program, 0x40000000, AUDIT_ARCH_X86_64) == ENOSYS
    # 32-bit calls through int 0x80 (20 is getpid there): refused whatever the number.
    assert verdict(program, 20, AUDIT_ARCH_I386) == ENOSYS
    assert verdict(program, 0, AUDIT_ARCH_AARCH64) == ENOSYS
    assert verdict(deny_filter(AARCH64), 63, AUDIT_ARCH_X86_64) == ENOSYS


def test_both_tables_know_every_denied_call() -> None:
    for arch in (X86_64, AARCH64):
        assert set(DENIED) | {"clone", "clone3", "socket", "socketpair"} <= set(arch.numbers)


@pytest.mark.parametrize("arch", [X86_64, AARCH64], ids=lambda a: a.name)
def test_vsock_and_other_unneeded_socket_families_are_refused(arch: Arch) -> None:
    program = deny_filter(arch)
    for name in ("socket", "socketpair"):
        number = arch.numbers[name]
        assert verdict(program, number, arch.audit, 40) == EPERM  # AF_VSOCK
        assert verdict(program, number, arch.audit, 38) == EPERM  # AF_ALG
        for family in (1, 2, 10, 16):  # unix, inet, inet6, netlink
            assert verdict(program, number, arch.audit, family) == SECCOMP_RET_ALLOW


def test_the_program_is_small_enough_for_the_kernel() -> None:
    program = deny_filter(X86_64)

    assert len(program) % 8 == 0
    assert len(program) // 8 < BPF_MAXINSNS


def test_machines_map_to_their_tables() -> None:
    assert seccomp.arch_for_machine("x86_64") is X86_64
    assert seccomp.arch_for_machine("aarch64") is AARCH64
    assert seccomp.arch_for_machine("riscv64") is None


def profile_verdict(profile: dict[str, Any], arch: Arch, name: str, arg0: int = 0) -> int:
    """What an OCI runtime (libseccomp) does with a native call under `profile`."""
    assert profile["architectures"] == [arch.oci]
    actions = []
    for rule in profile["syscalls"]:
        if name not in rule["names"]:
            continue
        conditions = rule.get("args", [])
        for condition in conditions:
            assert condition["index"] == 0 and condition["op"] == "SCMP_CMP_MASKED_EQ"
        if all(arg0 & c["value"] == c["valueTwo"] for c in conditions):
            assert rule["action"] == "SCMP_ACT_ERRNO"
            actions.append(SECCOMP_RET_ERRNO | rule["errnoRet"])
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert len(set(actions)) <= 1, f"{name}: rules disagree"
    return actions[0] if actions else SECCOMP_RET_ALLOW


CLONE_ARGS = [17, CLONE_THREAD_FLAGS, *(1 << bit for bit in range(32)), 0x7E020011]


@pytest.mark.parametrize("arch", [X86_64, AARCH64], ids=lambda a: a.name)
def test_the_bpf_filter_and_the_oci_profile_deny_the_same_calls(arch: Arch) -> None:
    program = deny_filter(arch)
    profile = oci_profile(arch)

    families = [1, 2, 10, 16, *DENIED_FAMILIES.values(), 0x100000028]
    for name, number in arch.numbers.items():
        args = {"clone": CLONE_ARGS, "socket": families, "socketpair": families}.get(name, [0])
        for arg0 in args:
            assert profile_verdict(profile, arch, name, arg0) == verdict(
                program, number, arch.audit, arg0
            ), (name, hex(arg0))
    # io_uring carries reads and writes that seccomp never sees: denied at the door.
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        assert profile_verdict(profile, arch, name) == EPERM


def test_gvisor_gets_the_policy_without_its_clone3_rule() -> None:
    with_clone3 = oci_profile(X86_64)
    without = oci_profile(X86_64, clone3=False)

    assert [r for r in with_clone3["syscalls"] if r["names"] != ["clone3"]] == without["syscalls"]
    assert profile_verdict(with_clone3, X86_64, "clone3") == ENOSYS
    assert profile_verdict(without, X86_64, "clone3") == SECCOMP_RET_ALLOW
