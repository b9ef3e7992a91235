"""The provider contract, run against every provider that starts machines: local Shuttle
processes that join a real Weaver, and EC2 instances in moto's emulator. Then what only one of
them does (user data, tags, process hygiene) and the static provider, which starts nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import typer.main

from support.cluster import Cluster
from treadle.cli.main import app
from treadle.scheduler.offers import Offer
from treadle.weaver.providers import (
    AwsProvider,
    JoinInfo,
    LocalProvider,
    Provider,
    Provisioned,
    ProvisionError,
    StaticProvider,
    load_catalog,
    static_join_command,
)
from treadle.weaver.providers.catalog import CLOUD_RUNTIMES

moto = pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

REGION = "us-east-1"
TOKEN = "tj_contract-test-token-0123456789"


@dataclass
class Bed:
    """One provider under test, two offers of it (the first has a spot price, the second has
    not), how its nodes join, and checks of what only this kind of provider can observe."""

    provider: LocalProvider | AwsProvider
    offers: list[Offer]
    join: JoinInfo
    check_running: Callable[[Provisioned, Offer], Awaitable[None]]
    check_released: Callable[[Provisioned], Awaitable[None]]
    seen: dict[str, Any] = field(default_factory=dict)


# -- the local bed: real Shuttles joining a real Weaver


@pytest.fixture(scope="module")
def weaver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("providers"))
    try:
        cluster.start_weaver(node_down_after_s="1")
        yield cluster
    finally:
        cluster.stop()


def local_offers() -> list[Offer]:
    return [
        Offer(
            provider="local",
            instance_type="small",
            region="eu-central",
            zone="eu-central-a",
            country="DE",
            cpu_millicores=500,
            memory_mib=512,
            price_per_hour=0.25,
            spot_price_per_hour=0.07,
            labels={"team": "contract"},
            perf_score=2.5,
        ),
        Offer(
            provider="local",
            instance_type="large",
            region="us-east",
            country="US",
            cpu_millicores=2000,
            memory_mib=2048,
            price_per_hour=0.9,
        ),
    ]


async def poll(check: Callable[[], Any], what: Callable[[], str], within: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what()}")
        await asyncio.sleep(0.05)


def session_members(sid: int) -> list[int]:
    """Processes in session `sid`: a released Shuttle must leave none behind."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # state, ppid, pgrp, session. A zombie is dead: it lingers only until its parent (this
        # test process, when an earlier test made it a subreaper) collects it.
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@pytest.fixture
async def local_bed(weaver: Cluster, tmp_path: Path) -> AsyncIterator[Bed]:
    provider = LocalProvider(
        "local", local_offers(), home_root=tmp_path / "nodes", max_instances=2, grace_s=5
    )
    join = JoinInfo((weaver.url,), weaver.join_token)
    bed: Bed

    async def check_running(provisioned: Provisioned, offer: Offer) -> None:
        name = provisioned.node_name
        pid = provider.pid(provisioned.instance_id)
        assert pid is not None
        bed.seen[provisioned.instance_id] = pid
        node = await poll(
            lambda: weaver.node_named(name, connected=True),
            lambda: f"node {name} to join\n{provider.log_path(name).read_text()}",
        )
        assert node["provider"] == "local"
        assert (node["region"], node["zone"], node["country"]) == (
            offer.region,
            offer.zone,
            offer.country,
        )
        assert node["price_per_hour"] == offer.price_per_hour
        assert node["spot"] is provisioned.spot
        expected_spot = offer.spot_price_per_hour if provisioned.spot else None
        assert node["spot_price_per_hour"] == expected_spot
        assert node["labels"] == dict(offer.labels)
        assert node["capacity"]["cpu_millicores"] == offer.cpu_millicores
        assert node["capacity"]["memory_mib"] == offer.memory_mib
        assert node["perf_score"] == offer.perf_score
        assert node["runtimes"] == ["namespace"]
        # the token travels in the environment, not on the command line `ps` shows everyone
        cmdline = await asyncio.to_thread(Path(f"/proc/{pid}/cmdline").read_bytes)
        assert join.token.encode() not in cmdline
        assert b"--name\0" + name.encode() in cmdline

    async def check_released(provisioned: Provisioned) -> None:
        name = provisioned.node_name
        await poll(lambda: weaver.node_named(name, connected=False), lambda: f"{name} to leave")
        pid = bed.seen[provisioned.instance_id]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert session_members(pid) == []
        assert provider.pid(provisioned.instance_id) is None

    bed = Bed(provider, local_offers(), join, check_running, check_released)
    try:
        yield bed
    finally:
        await provider.aclose()


# -- the AWS bed: moto's EC2


@pytest.fixture
def ec2() -> Iterator[Any]:
    with moto.mock_aws():
        yield boto3.client("ec2", region_name=REGION)


def aws_offers() -> list[Offer]:
    return [
        Offer(
            provider="aws",
            instance_type="m6i.xlarge",
            region=REGION,
            zone="us-east-1b",
            country="US",
            cpu_millicores=4000,
            memory_mib=16384,
            price_per_hour=0.192,
            spot_price_per_hour=0.0886,
            runtimes=CLOUD_RUNTIMES,
        ),
        Offer(
            provider="aws",
            instance_type="c3.large",
            region=REGION,
            zone="us-east-1c",
            country="US",
            cpu_millicores=2000,
            memory_mib=3840,
            price_per_hour=0.105,
            runtimes=CLOUD_RUNTIMES,
        ),
    ]


_AMI: list[str] = []


def some_ami(ec2: Any) -> str:
    """One of moto's default images (the same in every mock; listing them is slow)."""
    if not _AMI:
        _AMI.append(ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"])
    return _AMI[0]


def describe(ec2: Any, instance_id: str) -> dict[str, Any]:
    reply = ec2.describe_instances(InstanceIds=[instance_id])
    instance: dict[str, Any] = reply["Reservations"][0]["Instances"][0]
    return instance


def user_data_of(ec2: Any, instance_id: str) -> str:
    reply = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(reply["UserData"]["Value"]).decode()


@pytest.fixture
async def aws_bed(ec2: Any, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Bed]:
    caplog.set_level(logging.DEBUG, logger="treadle")
    provider = AwsProvider(
        REGION,
        ami_id=some_ami(ec2),
        offers=aws_offers(),
        max_instances=2,
        tags={"team": "contract"},
    )
    join = JoinInfo(("https://weaver-a.example:8700", "https://weaver-b.example:8700"), TOKEN)

    async def check_running(provisioned: Provisioned, offer: Offer) -> None:
        instance = describe(ec2, provisioned.instance_id)
        assert instance["InstanceType"] == offer.instance_type
        assert instance["Placement"]["AvailabilityZone"] == offer.zone
        assert (
            instance["ImageId"]
            == provider.run_request(offer, spot=False, join=join, node_name="x")["ImageId"]
        )
        tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
        assert tags["treadle:managed"] == "true"
        assert tags["treadle:node"] == provisioned.node_name
        assert tags["treadle:provider"] == "aws"
        assert tags["treadle:offer"] == offer.name
        assert tags["Name"] == provisioned.node_name
        assert tags["team"] == "contract"
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        if provisioned.spot:
            assert instance["InstanceLifecycle"] == "spot"
        else:
            assert instance.get("InstanceLifecycle") != "spot"

        script = user_data_of(ec2, provisioned.instance_id)
        assert script.startswith("#!/bin/bash\n")
        exec_start = next(line for line in script.splitlines() if line.startswith("ExecStart="))
        argv = shlex.split(exec_start.removeprefix("ExecStart="))
        assert argv[:2] == ["/opt/treadle/bin/treadle", "shuttle"]
        assert option(argv, "--weaver") == join.weaver_url
        assert option(argv, "--name") == provisioned.node_name
        assert option(argv, "--provider") == "aws"
        assert option(argv, "--region") == REGION
        assert option(argv, "--zone") == offer.zone
        assert option(argv, "--country") == "US"
        assert float(option(argv, "--price")) == offer.price_per_hour
        assert ("--spot" in argv) is provisioned.spot
        if provisioned.spot:
            assert float(option(argv, "--spot-price")) == offer.spot_price_per_hour
        assert int(option(argv, "--cpu")) == offer.cpu_millicores
        assert int(option(argv, "--memory")) == offer.memory_mib
        assert "systemctl enable --now treadle-shuttle.service" in script
        # the token is in the user data, once, in a root-only file, and nowhere else
        assert script.count(join.token) == 1
        assert f"TREADLE_SHUTTLE_TOKEN={join.token}\n" in script
        assert join.token not in exec_start
        described = json.dumps(ec2.describe_instances(), default=str)
        assert join.token not in described
        assert all(join.token not in record.getMessage() for record in caplog.records)
        assert any(provisioned.instance_id in record.getMessage() for record in caplog.records)

    async def check_released(provisioned: Provisioned) -> None:
        assert describe(ec2, provisioned.instance_id)["State"]["Name"] in {
            "shutting-down",
            "terminated",
        }

    yield Bed(provider, aws_offers(), join, check_running, check_released)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.fixture(params=["local", "aws"])
def bed(request: pytest.FixtureRequest) -> Bed:
    value: Bed = request.getfixturevalue(f"{request.param}_bed")
    return value


# -- the contract


async def test_offers_are_listed(bed: Bed) -> None:
    assert bed.provider.offers() == bed.offers
    assert isinstance(bed.provider, Provider)
    assert await bed.provider.instances() == []


async def test_provision_runs_a_node_and_release_stops_it(bed: Bed) -> None:
    provider, offer = bed.provider, bed.offers[0]
    provisioned = await provider.provision(offer, spot=False, join=bed.join)
    assert provisioned.provider == provider.name
    assert provisioned.offer == offer.name
    assert provisioned.spot is False
    assert provisioned.node_name.startswith(provider.name)
    assert isinstance(provisioned.started_at, datetime) and provisioned.started_at.tzinfo
    assert [p.instance_id for p in await provider.instances()] == [provisioned.instance_id]
    (listed,) = await provider.instances()
    assert (listed.node_name, listed.offer, listed.spot) == (
        provisioned.node_name,
        offer.name,
        False,
    )
    await bed.check_running(provisioned, offer)

    await provider.release(provisioned.instance_id)
    assert await provider.instances() == []
    await provider.release(provisioned.instance_id)  # twice is fine
    await bed.check_released(provisioned)


async def test_spot(bed: Bed) -> None:
    provider, offer = bed.provider, bed.offers[0]
    provisioned = await provider.provision(offer, spot=True, join=bed.join)
    assert provisioned.spot is True
    assert [p.spot for p in await provider.instances()] == [True]
    await bed.check_running(provisioned, offer)
    await provider.release(provisioned.instance_id)
    await bed.check_released(provisioned)


async def test_spot_needs_a_spot_price(bed: Bed) -> None:
    with pytest.raises(ProvisionError, match="has no spot price"):
        await bed.provider.provision(bed.offers[1], spot=True, join=bed.join)
    assert await bed.provider.instances() == []


async def test_quota(bed: Bed) -> None:
    provider = bed.provider
    first = await provider.provision(bed.offers[0], spot=False, join=bed.join)
    second = await provider.provision(bed.offers[1], spot=False, join=bed.join)
    assert provider.offers() == []
    with pytest.raises(ProvisionError, match="at its quota of 2 instances") as refused:
        await provider.provision(bed.offers[0], spot=False, join=bed.join)
    assert refused.value.code == "quota_exceeded"
    assert {p.instance_id for p in await provider.instances()} == {
        first.instance_id,
        second.instance_id,
    }
    await provider.release(first.instance_id)
    assert provider.offers() == bed.offers
    await provider.release(second.instance_id)


async def test_releasing_what_is_not_there_is_fine(bed: Bed) -> None:
    await bed.provider.release("i-0123456789abcdef0")
    await bed.provider.release("local-00000000")


async def test_an_offer_of_another_provider_is_refused(bed: Bed) -> None:
    stranger = Offer(
        provider="elsewhere",
        instance_type="m6i.xlarge",
        region=REGION,
        cpu_millicores=1000,
        memory_mib=1024,
        price_per_hour=0.1,
    )
    with pytest.raises(ProvisionError, match="is not an offer of provider"):
        await bed.provider.provision(stranger, spot=False, join=bed.join)


# -- local only


def fake_python(tmp_path: Path, body: str) -> str:
    """A stand-in for the interpreter, to see what the provider does with odd Shuttles."""
    path = tmp_path / "python"
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


async def test_local_kills_a_shuttle_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = fake_python(tmp_path, "trap '' TERM\nsleep 60 &\nwait\nsleep 60")
    provider = LocalProvider(
        "local", local_offers(), home_root=tmp_path / "nodes", python=stubborn, grace_s=0.3
    )
    join = JoinInfo(("http://127.0.0.1:9",), TOKEN)
    provisioned = await provider.provision(local_offers()[0], spot=False, join=join)
    pid = provider.pid(provisioned.instance_id)
    assert pid is not None
    await poll(lambda: len(session_members(pid)) == 2, lambda: "the helper to start")
    await provider.release(provisioned.instance_id)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    await poll(lambda: session_members(pid) == [], lambda: "the helper to die")


async def test_local_forgets_a_shuttle_that_exited(tmp_path: Path) -> None:
    provider = LocalProvider(
        "local",
        local_offers(),
        home_root=tmp_path / "nodes",
        python=fake_python(tmp_path, "echo cannot start >&2; exit 3"),
        max_instances=1,
    )
    join = JoinInfo(("http://127.0.0.1:9",), TOKEN)
    provisioned = await provider.provision(local_offers()[0], spot=False, join=join)
    assert provider.offers() == []
    deadline = asyncio.get_running_loop().time() + 10
    while await provider.instances():
        assert asyncio.get_running_loop().time() < deadline, "the exit was never noticed"
        await asyncio.sleep(0.02)
    assert provider.offers() == local_offers()  # its place in the quota is free again
    log = await asyncio.to_thread(provider.log_path(provisioned.instance_id).read_text)
    assert "cannot start" in log
    await provider.release(provisioned.instance_id)


# -- AWS only


async def test_aws_offers_default_to_the_catalog(ec2: Any) -> None:
    provider = AwsProvider(REGION, ami_id=some_ami(ec2))
    catalog = [o for o in load_catalog(provider="aws") if o.region == REGION]
    assert provider.offers() == catalog
    assert catalog and all(o.runtimes == CLOUD_RUNTIMES for o in catalog)
    # catalog zones are AWS zone ids, which name the same data centre in every account
    offer = next(o for o in catalog if o.zone == "use1-az1")
    join = JoinInfo(("https://weaver.example",), TOKEN)
    request = provider.run_request(offer, spot=True, join=join, node_name="aws-0")
    assert request["Placement"] == {"AvailabilityZoneId": "use1-az1"}
    assert request["InstanceMarketOptions"]["MarketType"] == "spot"
    assert request["ClientToken"] == "aws-0"


async def test_aws_restart_finds_running_instances_and_counts_them(ec2: Any) -> None:
    def make() -> AwsProvider:
        return AwsProvider(REGION, ami_id=some_ami(ec2), offers=aws_offers(), max_instances=2)

    join = JoinInfo(("https://weaver.example",), TOKEN)
    before = make()
    started = {
        (await before.provision(offer, spot=False, join=join)).instance_id for offer in aws_offers()
    }
    after = make()  # a Weaver restart: a new provider knows nothing yet
    assert after.offers() == aws_offers()
    found = await after.instances()
    assert {p.instance_id for p in found} == started
    assert {p.offer for p in found} == {o.name for o in aws_offers()}
    assert all(p.node_name.startswith("aws-") for p in found)
    assert after.offers() == []
    # another provider name in the same account and region sees none of them
    other = AwsProvider(REGION, ami_id=some_ami(ec2), offers=aws_offers(), name="aws-2")
    assert await other.instances() == []
    for instance_id in started:
        await after.release(instance_id)
    assert await after.instances() == []


async def test_aws_never_terminates_what_it_did_not_start(ec2: Any) -> None:
    ami = some_ami(ec2)
    foreign = ec2.run_instances(ImageId=ami, InstanceType="t3.micro", MinCount=1, MaxCount=1)
    instance_id = foreign["Instances"][0]["InstanceId"]
    provider = AwsProvider(REGION, ami_id=ami, offers=aws_offers())
    with pytest.raises(ProvisionError, match="not managed by provider 'aws'"):
        await provider.release(instance_id)
    assert describe(ec2, instance_id)["State"]["Name"] in {"pending", "running"}


async def test_aws_errors_are_translated_without_the_token() -> None:
    class Refusing:
        def run_instances(self, **kwargs: Any) -> Any:
            error = Exception("refused")
            error.response = {  # type: ignore[attr-defined]
                "Error": {"Code": "Unsupported", "Message": f"no; user data {kwargs['UserData']}"}
            }
            raise error

        def terminate_instances(self, **kwargs: Any) -> Any:
            raise AssertionError("not called")

        def describe_instances(self, **kwargs: Any) -> Any:
            return {"Reservations": []}

    provider = AwsProvider(
        REGION,
        ami_id="ami-12345678",
        offers=aws_offers(),
        max_instances=1,
        client_factory=lambda region: Refusing(),
    )
    join = JoinInfo(("https://weaver.example",), TOKEN)
    with pytest.raises(ProvisionError) as caught:
        await provider.provision(aws_offers()[0], spot=False, join=join)
    assert "Unsupported" in caught.value.message
    assert TOKEN not in str(caught.value)
    assert provider.offers() == aws_offers()  # a failed start holds no quota


def test_aws_user_data_refuses_odd_tokens() -> None:
    provider = AwsProvider(REGION, ami_id="ami-1", offers=aws_offers())
    join = JoinInfo(("https://weaver.example",), "a token\nwith lines")
    with pytest.raises(ProvisionError, match="join token"):
        provider.run_request(aws_offers()[0], spot=False, join=join, node_name="n")


# -- static hosts


async def test_static_hosts_join_on_their_own() -> None:
    provider = StaticProvider()
    assert isinstance(provider, Provider)
    assert provider.offers() == []
    assert await provider.instances() == []
    await provider.release("anything")
    with pytest.raises(ProvisionError, match="static hosts join on their own"):
        await provider.provision(local_offers()[0], spot=False, join=JoinInfo(("http://w",), TOKEN))


def test_static_join_command() -> None:
    command = static_join_command(
        "https://weaver.example:8700",
        "tj_s3cret",
        price=0.042,
        region="eu-north",
        zone="basement",
        country="SE",
        labels={"owner": "Ada Lovelace", "gpu": "none"},
    )
    words = shlex.split(command)
    assert words[:3] == ["TREADLE_SHUTTLE_TOKEN=tj_s3cret", "treadle", "shuttle"]
    assert "--token" not in words
    assert option(words, "--weaver") == "https://weaver.example:8700"
    assert option(words, "--price") == "0.042"
    assert option(words, "--region") == "eu-north"
    assert option(words, "--zone") == "basement"
    assert option(words, "--country") == "SE"
    assert option(words, "--provider") == "static"
    assert "owner=Ada Lovelace" in words and "gpu=none" in words


# -- every option a provider renders is one `treadle shuttle` has


def shuttle_options_known() -> set[str]:
    command: Any = typer.main.get_command(app)
    return {name for param in command.commands["shuttle"].params for name in param.opts}


def test_rendered_options_exist() -> None:
    command: Any = typer.main.get_command(app)
    known = {name for param in command.commands["shuttle"].params for name in param.opts}
    join = JoinInfo(("http://w",), TOKEN)
    local = LocalProvider("local", local_offers(), home_root=Path("/nowhere"))
    aws = AwsProvider(REGION, ami_id="ami-1", offers=aws_offers(), shuttle_args=["--allow-network"])
    script = aws.run_request(aws_offers()[0], spot=True, join=join, node_name="n")["UserData"]
    exec_start = next(line for line in script.splitlines() if line.startswith("ExecStart="))
    static = static_join_command(
        "http://w", TOKEN, price=1.0, region="r", zone="z", country="DE", labels={"a": "b"}
    )
    rendered = [
        *local.command(local_offers()[0], spot=True, join=join, node_name="n"),
        *shlex.split(exec_start.removeprefix("ExecStart=")),
        *shlex.split(static),
    ]
    used = {word for word in rendered if word.startswith("--")}
    assert {"--spot", "--spot-price", "--country", "--zone", "--label"} <= used
    assert used - known == set()
