"""The committed envd code is what scripts/gen-envd makes from proto/envd, byte for byte: the
.proto files are the source, and nobody edits the generated modules by hand."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src/treadle/weaver/envd/gen"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def test_the_generated_envd_code_matches_its_proto_files(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts/gen-envd"), str(tmp_path)], check=True, cwd=ROOT)
    made = _files(tmp_path)
    assert set(made) >= {"process/process_pb.py", "filesystem/filesystem_connect.py"}
    assert made == _files(GENERATED)
