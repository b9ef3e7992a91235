"""Network for a microVM guest that asks for it: the VMM's jail gets the namespace tier's
network (slirp4netns, fenced off this host, its cloud and Weaver), QEMU's user-mode network
carries the guest's traffic into it, and the guest's own routes hold the same fence. What
the guest reaches, and what it does not, is what a namespace-tier sandbox reaches."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.test_sandbox_network import (
    OTHER_HOST,
    PROBE,
    REPORT,
    host_address,
    listening,
    other_host,  # noqa: F401 (a fixture)
    reach_code,
    report,
    unavailable,
)
from support.runtimes import make_runtime, run, spec
from treadle.domain.resources import Tier
from treadle.shuttle.microvm.runtime import MicrovmRuntime
from treadle.shuttle.runtimes import gives_network

pytestmark = pytest.mark.microvm

PY = "python3"  # the guest's, on its PATH


def microvm(home: Path, **settings: object) -> MicrovmRuntime:
    runtime = make_runtime((Tier.MICROVM, {"microvm": True}), home, **settings)
    assert isinstance(runtime, MicrovmRuntime)
    return runtime


async def test_a_guest_reaches_other_hosts_but_not_this_one(
    image: object,
    tmp_path: Path,
    other_host: str,  # noqa: F811 (the fixture imported above)
) -> None:
    runtime = microvm(tmp_path / "home", allow_network=True)
    if not gives_network(runtime):
        unavailable("slirp4netns does not work here (see the log)")
    this_host = host_address()
    async with (
        listening(OTHER_HOST, other_host) as elsewhere,
        listening(this_host) as on_this_host,
        listening("127.0.0.1") as loopback,
        listening("0.0.0.0") as everywhere,
    ):
        code = reach_code(this_host, elsewhere, on_this_host, everywhere, loopback)

        seen = report(
            await run(runtime, spec([PY, "-c", code], network=True), tmp_path / "home" / "w")
        )

        assert seen.pop("other host") == "pong"
        assert elsewhere.connections != []
        # The node's fence, in the guest's own routes: refused there, nothing sent.
        assert seen.pop("this host") == "EACCES"
        assert seen.pop("this host, any address") == "EACCES"
        assert seen.pop("metadata service") == "EACCES"
        assert seen.pop("link-local") == "EACCES"
        assert seen.pop("other host's route") == "routed"
        # 127.0.0.1 is the guest's own loopback; 10.0.2.2 is the empty loopback of its
        # VMM's jail, not the host's.
        assert seen.pop("127.0.0.1") == "ECONNREFUSED"
        assert seen.pop("gateway to loopback") != "pong"
        assert seen.pop("gateway to any address") != "pong"
        assert seen.pop("dns address") != "pong"  # QEMU's DNS forwards DNS alone
        assert on_this_host.connections == []
        assert loopback.connections == []
        assert everywhere.connections == []
        assert seen.pop("interfaces") == ["lo", "tap0"]
        assert seen.pop("resolv.conf") == "nameserver 10.0.2.3\n"
        assert seen.pop("fds") == []


async def test_no_network_unless_asked_and_allowed(image: object, tmp_path: Path) -> None:
    code = PROBE + 'connect("anywhere", "198.51.100.2", 9)\n' + REPORT
    runtime = microvm(tmp_path / "home", allow_network=True)
    seen = report(await run(runtime, spec([PY, "-c", code]), tmp_path / "home" / "a"))
    assert seen["interfaces"] == ["lo"]
    assert seen["anywhere"] == "ENETUNREACH"

    refusing = microvm(tmp_path / "other", allow_network=False)
    assert not gives_network(refusing)
    result = await run(refusing, spec([PY, "-c", code], network=True), tmp_path / "other" / "b")
    assert result.status.reason == "spawn_failed"
    assert "network" in result.text("stderr")
