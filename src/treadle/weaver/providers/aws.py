"""Nodes as EC2 instances: one instance per provision, its Shuttle started by cloud-init.

The instance boots an image with Python 3.11+ (and, for isolation, bubblewrap, crun, runsc),
installs treadle from `install` (a pip requirement or a wheel URL), and runs
`treadle shuttle` as a systemd unit that dials Weaver with a one-time join token. Instances are
tagged `treadle:managed=true`, `treadle:provider=<name>` and `treadle:node=<node name>`, which
is how `instances()` finds them after a Weaver restart and how Weaver matches the node when it
joins.

boto3 is optional (`pip install treadle[aws]`) and blocking: it is imported when the first
client is made, and every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from treadle.scheduler.offers import Offer
from treadle.weaver.providers.base import (
    JoinInfo,
    Provisioned,
    ProvisionError,
    Quota,
    QuotaLedger,
    check_startable,
    new_node_name,
)
from treadle.weaver.providers.catalog import load_catalog
from treadle.weaver.providers.command import offer_options

__all__ = ["MANAGED_TAG", "NODE_TAG", "AwsProvider", "Ec2Client", "user_data"]

log = logging.getLogger(__name__)

MANAGED_TAG = "treadle:managed"
PROVIDER_TAG = "treadle:provider"
NODE_TAG = "treadle:node"
OFFER_TAG = "treadle:offer"
SPOT_TAG = "treadle:spot"
_LIVE_STATES = ["pending", "running"]
_GONE_CODES = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"}
# An AWS zone id (use1-az1) names the same data centre in every account, a zone name
# (us-east-1a) does not; the catalog holds ids, so both are accepted.
_ZONE_ID = re.compile(r"^[a-z]{2,4}\d+-az\d+$")
# What may appear in the unit file and environment file without quoting surprises.
_TOKEN = re.compile(r"^[A-Za-z0-9_.~+/=-]+$")
SHUTTLE_HOME = "/var/lib/treadle/shuttle"


class Ec2Client(Protocol):
    """The EC2 calls this provider makes (a boto3 EC2 client has them)."""

    def run_instances(self, **kwargs: Any) -> Any: ...
    def terminate_instances(self, **kwargs: Any) -> Any: ...
    def describe_instances(self, **kwargs: Any) -> Any: ...


def _boto3_client(region: str) -> Ec2Client:
    boto3 = importlib.import_module("boto3")  # optional: only this provider needs it
    client: Ec2Client = boto3.client("ec2", region_name=region)
    return client


class AwsProvider:
    def __init__(
        self,
        region: str,
        *,
        ami_id: str,
        offers: Sequence[Offer] | None = None,
        subnet_id: str | None = None,
        security_group_ids: Sequence[str] = (),
        key_name: str | None = None,
        instance_profile: str | None = None,
        max_instances: int | None = None,
        max_vcpus: float | None = None,
        tags: Mapping[str, str] | None = None,
        install: str = "treadle",
        shuttle_args: Sequence[str] = (),
        client_factory: Callable[[str], Ec2Client] = _boto3_client,
        name: str = "aws",
    ) -> None:
        """`offers` None: the shipped catalog's aws rows in `region`. `instance_profile` is an
        IAM instance profile name or ARN. `tags` are added to every instance. `shuttle_args`
        are more `treadle shuttle` options for every node (e.g. `--allow-network`)."""
        if offers is None:
            offers = [o for o in load_catalog(provider="aws") if o.region == region]
        foreign = [o.name for o in offers if o.region != region]
        if foreign:
            raise ValueError(f"offers outside region {region}: {', '.join(foreign)}")
        reserved = [key for key in (tags or {}) if key.startswith("treadle:")]
        if reserved:
            raise ValueError(f"tags starting with 'treadle:' are the provider's: {reserved}")
        self.name = name
        self.region = region
        self._offers = list(offers)
        self._ami_id = ami_id
        self._subnet_id = subnet_id
        self._security_group_ids = list(security_group_ids)
        self._key_name = key_name
        self._instance_profile = instance_profile
        self._tags = dict(tags or {})
        self._install = install
        self._shuttle_args = list(shuttle_args)
        self._client_factory = client_factory
        self._client: Ec2Client | None = None
        self._ledger = QuotaLedger(name, Quota(max_instances, max_vcpus))

    # -- the Provider interface

    def catalog(self) -> list[Offer]:
        """Every offer, quota or not: what running machines are matched against."""
        return list(self._offers)

    def offers(self) -> list[Offer]:
        """Within the quota as last seen: `instances()` refreshes what is running."""
        return self._ledger.within(self._offers)

    async def provision(self, offer: Offer, *, spot: bool, join: JoinInfo) -> Provisioned:
        check_startable(self.name, self._offers, offer, spot=spot)
        node = new_node_name(self.name)
        self._ledger.hold(node, offer)
        try:
            request = self.run_request(offer, spot=spot, join=join, node_name=node)
            try:
                reply = await self._call("run_instances", **request)
            except ProvisionError as exc:
                raise ProvisionError(
                    f"cannot start {offer.name}: {_scrub(exc.message, join.token)}",
                    code=exc.code,
                    details=exc.details,
                ) from None
            instance = reply["Instances"][0]
        except BaseException:
            self._ledger.drop_pending(node)
            raise
        instance_id: str = instance["InstanceId"]
        self._ledger.settle(node, instance_id)
        log.info(
            "started %s %s (node %s) for %s%s",
            self.name,
            instance_id,
            node,
            offer.name,
            " as spot" if spot else "",
        )
        return Provisioned(
            provider=self.name,
            instance_id=instance_id,
            node_name=node,
            offer=offer.name,
            spot=spot,
            started_at=_aware(instance.get("LaunchTime")),
        )

    async def release(self, instance_id: str) -> None:
        found = await self._describe(InstanceIds=[instance_id])
        if not found:
            self._ledger.drop(instance_id)
            return  # gone already, or never existed
        tags = _tags(found[0])
        # Terminating is forever: never on the word of an id alone, only on our own tag.
        if tags.get(MANAGED_TAG) != "true" or tags.get(PROVIDER_TAG) != self.name:
            raise ProvisionError(
                f"instance {instance_id} is not managed by provider {self.name!r}; "
                "not terminating it",
                code="not_managed",
            )
        with contextlib.suppress(_Gone):
            await self._call("terminate_instances", InstanceIds=[instance_id])
        self._ledger.drop(instance_id)
        log.info("terminated %s %s (node %s)", self.name, instance_id, tags.get(NODE_TAG))

    async def instances(self) -> list[Provisioned]:
        found = await self._describe(
            Filters=[
                {"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]},
                {"Name": f"tag:{PROVIDER_TAG}", "Values": [self.name]},
                {"Name": "instance-state-name", "Values": _LIVE_STATES},
            ]
        )
        by_name = {offer.name: offer for offer in self._offers}
        result: list[Provisioned] = []
        running: dict[str, int] = {}
        for instance in found:
            tags = _tags(instance)
            offer_name = tags.get(OFFER_TAG, "")
            offer = by_name.get(offer_name)
            running[instance["InstanceId"]] = offer.cpu_millicores if offer else _cpus(instance)
            result.append(
                Provisioned(
                    provider=self.name,
                    instance_id=instance["InstanceId"],
                    node_name=tags.get(NODE_TAG, ""),
                    offer=offer_name,
                    spot=instance.get("InstanceLifecycle") == "spot"
                    or tags.get(SPOT_TAG) == "true",
                    started_at=_aware(instance.get("LaunchTime")),
                )
            )
        # What AWS says runs is what counts against the quota from now on (another Weaver, or
        # this one before a restart, may have started some).
        self._ledger.replace_running(running)
        return result

    # -- the request

    def run_request(
        self, offer: Offer, *, spot: bool, join: JoinInfo, node_name: str
    ) -> dict[str, Any]:
        """The `run_instances` arguments for one node (separate so it can be checked)."""
        tags = [
            {"Key": "Name", "Value": node_name},
            *({"Key": k, "Value": v} for k, v in sorted(self._tags.items())),
            {"Key": MANAGED_TAG, "Value": "true"},
            {"Key": PROVIDER_TAG, "Value": self.name},
            {"Key": NODE_TAG, "Value": node_name},
            {"Key": OFFER_TAG, "Value": offer.name},
            {"Key": SPOT_TAG, "Value": "true" if spot else "false"},
        ]
        request: dict[str, Any] = {
            "ImageId": self._ami_id,
            "InstanceType": offer.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": user_data(
                offer,
                spot=spot,
                join=join,
                node_name=node_name,
                install=self._install,
                extra=self._shuttle_args,
            ),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
            # A retried call with the same token starts no second instance.
            "ClientToken": node_name,
            # IMDSv2 only, one hop: the user data (and its token) cannot be fetched through
            # the metadata service from inside a sandbox's network namespace, one hop further.
            "MetadataOptions": {
                "HttpEndpoint": "enabled",
                "HttpTokens": "required",
                "HttpPutResponseHopLimit": 1,
            },
            "InstanceInitiatedShutdownBehavior": "terminate",
        }
        if offer.zone is not None:
            key = "AvailabilityZoneId" if _ZONE_ID.match(offer.zone) else "AvailabilityZone"
            request["Placement"] = {key: offer.zone}
        if spot:
            request["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        if self._subnet_id is not None:
            request["SubnetId"] = self._subnet_id
        if self._security_group_ids:
            request["SecurityGroupIds"] = list(self._security_group_ids)
        if self._key_name is not None:
            request["KeyName"] = self._key_name
        if self._instance_profile is not None:
            kind = "Arn" if self._instance_profile.startswith("arn:") else "Name"
            request["IamInstanceProfile"] = {kind: self._instance_profile}
        return request

    # -- the seam: boto3 in a thread, its errors translated once, here

    async def _describe(self, **kwargs: Any) -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page_args = dict(kwargs, **({"NextToken": token} if token else {}))
            try:
                page = await self._call("describe_instances", **page_args)
            except _Gone:
                return []
            for reservation in page.get("Reservations", []):
                instances.extend(reservation.get("Instances", []))
            token = page.get("NextToken")
            if not token:
                return instances

    async def _call(self, operation: str, **kwargs: Any) -> Any:
        if self._client is None:
            self._client = self._client_factory(self.region)
        method = getattr(self._client, operation)
        try:
            return await asyncio.to_thread(method, **kwargs)
        except Exception as exc:
            code, message = _error(exc)
            if code in _GONE_CODES:
                raise _Gone(message) from None
            raise ProvisionError(
                f"aws {operation} in {self.region} failed: {code}: {message}",
                code="provider_error",
                details={"aws_code": code},
            ) from None


class _Gone(ProvisionError):
    """The instance does not exist (any more)."""


def _error(exc: Exception) -> tuple[str, str]:
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, Mapping):
        error = response.get("Error", {})
        return str(error.get("Code", type(exc).__name__)), str(error.get("Message", exc))
    return type(exc).__name__, str(exc)


def user_data(
    offer: Offer,
    *,
    spot: bool,
    join: JoinInfo,
    node_name: str,
    install: str = "treadle",
    extra: Sequence[str] = (),
) -> str:
    """The cloud-init shell script that installs treadle and runs the node's Shuttle.

    The join token is in here, and user data is not secret: any process on the instance can
    read it from the metadata service for as long as the instance lives (and the console shows
    it to anyone allowed to describe the instance). So the token must be good for one join
    only and expire soon; once the node has joined it holds its own credential and the token
    is worth nothing. It is written to a root-only environment file, not the unit's command
    line, so it never shows in `ps`.
    """
    if not _TOKEN.match(join.token):
        raise ProvisionError("the join token has characters that cannot go in user data")
    options = offer_options(offer, spot=spot, node_name=node_name, weaver_url=join.weaver_url)
    argv = ["/opt/treadle/bin/treadle", "shuttle", *options, "--home", SHUTTLE_HOME, *extra]
    for arg in argv:
        if any(ch in arg for ch in "\n\r\0"):
            raise ProvisionError(f"a Shuttle option has a line break in it: {arg!r}")
    exec_start = " ".join(_systemd_quote(arg) for arg in argv)
    return "\n".join(
        [
            "#!/bin/bash",
            f"# treadle node {node_name}: {offer.name}{' (spot)' if spot else ''}",
            "set -euo pipefail",
            "umask 077",
            "install -d -m 0700 /etc/treadle",
            "cat > /etc/treadle/shuttle.env <<'TREADLE_EOF'",
            f"TREADLE_SHUTTLE_TOKEN={join.token}",
            "TREADLE_EOF",
            "umask 022",
            "if ! python3 -m venv /opt/treadle; then",
            "  apt-get update -q && apt-get install -y -q python3-venv",
            "  python3 -m venv /opt/treadle",
            "fi",
            f"/opt/treadle/bin/pip install --quiet {shlex.quote(install)}",
            "cat > /etc/systemd/system/treadle-shuttle.service <<'TREADLE_EOF'",
            "[Unit]",
            "Description=treadle Shuttle (node agent)",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "EnvironmentFile=/etc/treadle/shuttle.env",
            f"ExecStart={exec_start}",
            "Restart=always",
            "RestartSec=2",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "TREADLE_EOF",
            "systemctl daemon-reload",
            "systemctl enable --now treadle-shuttle.service",
            "",
        ]
    )


def _systemd_quote(arg: str) -> str:
    # systemd expands %specifiers and $VARIABLES in ExecStart even inside quotes.
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _scrub(message: str, token: str) -> str:
    return message.replace(token, "<join token>")


def _tags(instance: Mapping[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags") or []}


def _cpus(instance: Mapping[str, Any]) -> int:
    options = instance.get("CpuOptions") or {}
    cores, threads = options.get("CoreCount"), options.get("ThreadsPerCore")
    return int(cores) * int(threads) * 1000 if cores and threads else 0


def _aware(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)
