"""The README's placement demo (examples/placement-demo.sh) runs and says what the README
shows: each strategy's node, and the GPU function on the only node with a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support.cluster import free_port

DEMO = Path(__file__).resolve().parents[2] / "examples" / "placement-demo.sh"


def test_the_placement_demo_places_by_strategy() -> None:
    treadle = Path(sys.executable).with_name("treadle")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREADLE")}
    env.update(PORT=str(free_port()), TREADLE=str(treadle))
    run = subprocess.run(["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    blocks = {
        match.group(1): match.group(2)
        for match in re.finditer(
            r"\$ treadle invoke (\S+(?: --strategy \S+)?)[^\n]*\n(.*?)(?=\n\$|\Z)", run.stdout, re.S
        )
    }
    placed = {key: re.search(r"on node (\S+)", text).group(1) for key, text in blocks.items()}  # type: ignore[union-attr]
    assert placed == {
        "hello --strategy lowest_cost;": "budget-eu",
        "hello --strategy best_performance;": "gpu-de",
        "hello --strategy balanced;": "cloud-us",
        "hello --strategy high_availability;": "cloud-us",
        "train": "gpu-de",
    }
    assert "ruled out 2 node(s) with too few free gpus" in blocks["train"]
