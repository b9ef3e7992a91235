"""GPU detection and per-execution device assignment on a host with NVIDIA GPUs.

Skipped where `nvidia-smi` is absent (CI); run on a GPU machine to check real hardware.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from integration.test_executions import register, run
from integration.test_usage_ledger import ledger
from support.cluster import Cluster, eventually

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU here"),
]

# Counts the devices CUDA can use, through the driver API (no framework needed).
CUDA_COUNT = (
    "import ctypes, os\n"
    "cuda = ctypes.CDLL('libcuda.so.1')\n"
    "n = ctypes.c_int(0)\n"
    "rc = cuda.cuInit(0)\n"
    "print(0 if rc else (cuda.cuDeviceGetCount(ctypes.byref(n)) or n.value))\n"
    "print(os.environ.get('CUDA_VISIBLE_DEVICES'))\n"
)


def smi() -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,name", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]


def test_node_advertises_its_gpus_and_executions_get_their_own(cluster: Cluster) -> None:
    gpus = smi()
    with cluster.client() as api:
        node = api.get("/v1/nodes").json()["items"][0]
        assert node["capacity"]["gpu_count"] == len(gpus)
        gpu_type = node["capacity"]["gpu_type"]
        assert gpu_type and gpu_type in gpus[0][1].lower().replace(" ", "")

        api.post(
            "/v1/functions",
            json={
                "name": "one-gpu",
                "command": [sys.executable, "-c", CUDA_COUNT],
                "resources": {"gpu_count": 1, "gpu_type": gpu_type, "cpu_millicores": 100},
            },
        )
        api.post(
            "/v1/functions",
            json={
                "name": "no-gpu",
                "command": [sys.executable, "-c", CUDA_COUNT],
                "resources": {"cpu_millicores": 100},
            },
        )
        api.post(
            "/v1/functions",
            json={
                "name": "too-many",
                "command": ["/bin/true"],
                "resources": {"gpu_count": len(gpus) + 1, "cpu_millicores": 100},
            },
        )

        one = api.post("/v1/functions/one-gpu/invoke", params={"wait": 120}).json()
        assert one["state"] == "success", api.get(f"/v1/executions/{one['id']}/output").text
        count, visible = api.get(f"/v1/executions/{one['id']}/output").json()["stdout"].split()
        assert count == "1"
        assert visible in [uuid for uuid, _ in gpus]

        none = api.post("/v1/functions/no-gpu/invoke", params={"wait": 120}).json()
        stdout = api.get(f"/v1/executions/{none['id']}/output").json()["stdout"]
        assert stdout.splitlines()[0] == "0"

        too_many = api.post("/v1/functions/too-many/invoke", json={}).json()
        pending = api.get(f"/v1/executions/{too_many['id']}").json()
        assert pending["state"] == "open"
        api.post(f"/v1/executions/{too_many['id']}/cancel")


# Keeps one device busy for a few seconds with a buffer of 2 GiB held on it.
CUDA_BUSY = (
    "import time, torch\n"
    "a = torch.ones((4096, 4096), device='cuda')\n"
    "held = torch.empty(512 * 1024 * 1024, dtype=torch.float32, device='cuda')\n"
    "end = time.monotonic() + 4\n"
    "while time.monotonic() < end:\n"
    "    a = (a @ a) / 4096\n"
    "    torch.cuda.synchronize()\n"
    "print(float(a[0, 0]))\n"
)


def cuda_framework() -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A node that samples its workloads twice a second, on the host's real devices."""
    cluster = Cluster(tmp_path_factory.mktemp("gpu-metered"))
    try:
        cluster.start_weaver()
        cluster.start_shuttle("gpu", "--usage-interval", "0.5")
        yield cluster
    finally:
        cluster.stop()


def test_an_execution_that_works_its_gpu_is_metered_for_it(metered: Cluster) -> None:
    if not cuda_framework():
        pytest.skip("no CUDA framework (torch) in this Python to keep a device busy")
    with metered.client() as api:
        gpu_type = api.get("/v1/nodes").json()["items"][0]["capacity"]["gpu_type"]
        register(
            api,
            "busy-gpu",
            [sys.executable, "-c", CUDA_BUSY],
            resources={"gpu_count": 1, "gpu_type": gpu_type, "cpu_millicores": 1000},
        )
        register(api, "idle", [sys.executable, "-c", "import time; time.sleep(1)"])
        busy, idle = run(api, "busy-gpu"), run(api, "idle")
        assert busy["state"] == "success", api.get(f"/v1/executions/{busy['id']}/output").text
        assert idle["state"] == "success"
        rows = eventually(
            lambda: (rows := ledger(metered, busy["id"])) and rows[-1].final and rows,
            what="the busy execution's last record",
        )
        plain = eventually(
            lambda: (rows := ledger(metered, idle["id"])) and rows[-1].final and rows,
            what="the idle execution's last record",
        )
    running = sum(r.wall_s - r.paused_s for r in rows)
    gpu_s = sum(r.gpu_s for r in rows)
    # Busy most of its 4 s on one device, never more than one device's worth.
    assert 1.0 < gpu_s <= running, (gpu_s, running)
    assert max(r.gpu_memory_peak_mib for r in rows) >= 2048
    assert [(r.gpu_s, r.gpu_memory_peak_mib) for r in plain] == [(0, 0)] * len(plain)
