"""The namespace tier's bubblewrap options and its view of programs in the sandbox."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from treadle.shuttle.runtimes import bwrap
from treadle.shuttle.sandbox.policy import masked_in_proc

FDS = bwrap.Fds(seccomp=4, files=[(7, "args.json", 0o600), (8, "main", 0o700)], info=5, block=6)


def options(**overrides: object) -> list[str]:
    fields: dict[str, object] = {
        "binds": ["--ro-bind", "/usr", "/usr"],
        "fds": FDS,
        "env": {"PATH": "/usr/bin", "HOME": "/work"},
        "disk_bytes": 8 << 20,
        "network": False,
    }
    fields.update(overrides)
    return bwrap.options(**fields)  # type: ignore[arg-type]


def pairs(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == option]


def test_every_namespace_is_new_and_nothing_is_kept() -> None:
    args = options()

    assert args[:2] == ["--unshare-all", "--unshare-user"]
    assert "--share-net" not in args
    assert pairs(args, "--cap-drop") == ["ALL"]
    assert {"--die-with-parent", "--new-session", "--clearenv"} <= set(args)
    assert pairs(args, "--seccomp") == ["4"]
    assert pairs(args, "--info-fd") == ["5"]
    assert pairs(args, "--userns-block-fd") == pairs(args, "--block-fd") == ["6"]


NETWORK_FDS = bwrap.Fds(seccomp=4, files=[], info=5, block=6, resolv_conf=8)


def test_network_keeps_a_namespace_of_its_own_and_brings_a_resolver() -> None:
    args = options(network=True, fds=NETWORK_FDS, etc=Path("/host/etc"))

    assert args[:2] == ["--unshare-all", "--unshare-user"]
    assert "--share-net" not in args
    # The resolver is the one given, not the host's (which may sit on the host's loopback).
    assert args[args.index("/etc/resolv.conf") - 4 :][:4] == ["--perms", "0644", "--file", "8"]
    assert "/host/etc/resolv.conf" not in args
    assert "/host/etc/ssl" in pairs(args, "--ro-bind-try")
    assert "/etc/resolv.conf" not in options()
    assert "/host/etc/ssl" not in options(etc=Path("/host/etc"))


def test_network_needs_its_resolver() -> None:
    with pytest.raises(ValueError):
        options(network=True)


def test_scratch_space_is_size_limited_tmpfs() -> None:
    args = options(disk_bytes=123 << 20)

    masked_dirs = [p for p in masked_in_proc() if os.path.isdir(p)]
    assert pairs(args, "--tmpfs") == [*masked_dirs, "/dev/shm", "/tmp", "/work"]
    assert pairs(args, "--size") == [str(123 << 20)] * 3


def test_the_root_and_dev_turn_read_only_after_everything_is_in_place() -> None:
    args = options()

    masked_dirs = [p for p in masked_in_proc() if os.path.isdir(p)]
    assert pairs(args, "--remount-ro") == [*masked_dirs, "/dev", "/"]
    remount_root = len(args) - 1 - args[::-1].index("--remount-ro")
    mounts = {"--ro-bind", "--bind", "--tmpfs", "--file", "--dir", "--symlink", "--proc", "--dev"}
    assert all(i < remount_root for i, arg in enumerate(args) if arg in mounts)


def test_host_wide_proc_entries_are_masked_where_this_kernel_has_them() -> None:
    args = options()

    proc = args.index("/proc")
    for path in masked_in_proc():
        if os.path.isdir(path):
            assert args[args.index(path) - 1] == "--tmpfs"
        elif os.path.exists(path):
            assert args[args.index(path) - 2 : args.index(path)] == ["--ro-bind", "/dev/null"]
        else:
            assert path not in args  # bubblewrap cannot mount over what is not there
        assert path not in args or args.index(path) > proc


def test_work_dir_files_get_their_modes() -> None:
    args = options()

    assert pairs(args, "--file") == ["7", "8"]
    assert args[args.index("/work/args.json") - 4 : args.index("/work/args.json")] == [
        "--perms",
        "0600",
        "--file",
        "7",
    ]
    assert args[args.index("/work/main") - 3] == "0700"


def test_the_environment_is_set_inside_only() -> None:
    args = options(env={"A": "1", "B": "two words"})

    assert [args[i : i + 3] for i, a in enumerate(args) if a == "--setenv"] == [
        ["--setenv", "A", "1"],
        ["--setenv", "B", "two words"],
    ]


@pytest.mark.parametrize(
    "env",
    [{"X": "a\0--bind\0/\0/host"}, {"A=B": "1"}, {"": "1"}],
    ids=["nul", "equals", "empty"],
)
def test_values_that_would_smuggle_options_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        options(env=env)


def test_host_binds_mirror_the_hosts_top_level_layout(tmp_path: Path) -> None:
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "lib64").mkdir()

    args = bwrap.host_binds(tmp_path)

    assert args[:3] == ["--ro-bind", str(tmp_path / "usr"), "/usr"]
    assert args[3:6] == ["--symlink", "usr/bin", "/bin"]
    assert ["--ro-bind", str(tmp_path / "lib64"), "/lib64"] == args[6:9]
    assert "/sbin" not in args
    assert pairs(args, "--dir") == ["/etc"]
    assert "/etc/passwd" not in args  # the sandbox's own comes by fd (`sandbox_etc`)
    assert str(tmp_path / "etc" / "passwd") not in args


def test_the_sandbox_has_its_own_users_and_they_travel_by_fd() -> None:
    etc = dict(bwrap.sandbox_etc())
    assert etc["passwd"].decode().splitlines()[1] == "user:x:1000:1000:user:/work:/bin/sh"
    assert b"user:x:1000:" in etc["group"]

    args = options(fds=bwrap.Fds(seccomp=4, files=[], etc=[(9, "passwd"), (10, "group")]))

    assert args[args.index("/etc/passwd") - 2 : args.index("/etc/passwd")] == ["--file", "9"]
    assert args[args.index("/etc/group") - 2 : args.index("/etc/group")] == ["--file", "10"]
    assert args.index("/etc/group") < args.index("--remount-ro", args.index("/work"))


FILES = {"args.json": 0o600, "main.sh": 0o700, "data": 0o600}


def test_programs_are_found_as_execvp_would_in_the_sandbox() -> None:
    assert bwrap.resolve_in_sandbox("./main.sh", "", FILES) == "/work/main.sh"
    assert bwrap.resolve_in_sandbox("main.sh", "/nowhere:.", FILES) == "/work/main.sh"
    sh = bwrap.resolve_in_sandbox("sh", "/usr/local/bin:/usr/bin:/bin", FILES)
    assert sh in ("/usr/bin/sh", "/bin/sh")
    assert os.access(sh, os.X_OK)


def test_a_missing_program_is_not_found() -> None:
    with pytest.raises(FileNotFoundError, match="command not found"):
        bwrap.resolve_in_sandbox("treadle-no-such-program", "/usr/bin:/bin", FILES)
    with pytest.raises(FileNotFoundError):
        bwrap.resolve_in_sandbox("./absent", "/usr/bin", FILES)
    # The host's /tmp and home are not in the sandbox, whatever they hold.
    with pytest.raises(FileNotFoundError):
        bwrap.resolve_in_sandbox("/tmp/x", "", FILES)


def test_a_file_without_execute_permission_cannot_be_run() -> None:
    with pytest.raises(PermissionError):
        bwrap.resolve_in_sandbox("./data", "", FILES)
    with pytest.raises(PermissionError):
        bwrap.resolve_in_sandbox("data", ".", FILES)


def test_host_etc_links_stay_links(tmp_path: Path) -> None:
    (tmp_path / "usr").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/Etc/UTC")
    (tmp_path / "etc" / "ld.so.cache").write_bytes(b"")

    args = bwrap.host_binds(tmp_path)

    where = args.index("/etc/localtime")
    assert args[where - 2 : where] == ["--symlink", "/usr/share/zoneinfo/Etc/UTC"]
    where = args.index("/etc/ld.so.cache")
    assert args[where - 2 : where] == ["--ro-bind-try", str(tmp_path / "etc" / "ld.so.cache")]
