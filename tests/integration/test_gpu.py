"""GPU detection and per-execution device assignment on a host with NVIDIA GPUs.

Skipped where `nvidia-smi` is absent (CI); run on a GPU machine to check real hardware.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from support.cluster import Cluster

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
