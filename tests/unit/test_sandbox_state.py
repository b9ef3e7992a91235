"""Shuttle's machine-wide state lives only in directories no other user controls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from treadle.shuttle.sandbox.state import private_dir


def test_a_private_directory_is_made_with_its_mode(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "state")

    assert made.is_dir()
    assert made.stat().st_mode & 0o777 == 0o711
    assert private_dir(made) == made  # again: found as it was left


def test_a_link_in_its_place_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "theirs"
    elsewhere.mkdir()
    (tmp_path / "state").symlink_to(elsewhere)

    with pytest.raises(PermissionError, match="not a directory"):
        private_dir(tmp_path / "state")


def test_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "state"
    shared.mkdir()
    shared.chmod(0o1777)  # what a squatter leaves in /tmp

    with pytest.raises(PermissionError, match="writable by others"):
        private_dir(shared)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "state"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)

    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        private_dir(theirs)
