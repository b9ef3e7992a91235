"""Nodes as Shuttle processes on this machine, each pretending to be one offer.

Tests, demos and benchmarks need a fleet of nodes at different prices, regions and countries
without renting any: this provider starts a real `python -m treadle shuttle` per provision,
declaring the offer's price, place and capacity, and stops it on release. The Shuttles offer
the `namespace` tier (bubblewrap): every local node shares this machine, so this is for
development, tests and demos.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

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
from treadle.weaver.providers.command import offer_options

__all__ = ["LocalProvider"]

log = logging.getLogger(__name__)

# The Shuttle reads its join token from here (its --token option's variable): kept out of argv,
# which every local user can read in `ps`.
TOKEN_ENV = "TREADLE_SHUTTLE_TOKEN"


@dataclass(slots=True)
class _Child:
    process: asyncio.subprocess.Process
    provisioned: Provisioned


class LocalProvider:
    """Starts a Shuttle process per provision; `home_root/<node name>` is each one's home
    and holds its log (`shuttle.log`)."""

    def __init__(
        self,
        name: str,
        offers: Sequence[Offer],
        *,
        home_root: Path,
        python: str = sys.executable,
        max_instances: int | None = None,
        max_vcpus: float | None = None,
        grace_s: float = 10.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        foreign = [offer.name for offer in offers if offer.provider != name]
        if foreign:
            raise ValueError(f"offers of another provider than {name!r}: {', '.join(foreign)}")
        self.name = name
        self.home_root = Path(home_root)
        self._offers = list(offers)
        self._python = python
        self._grace_s = grace_s
        self._env = dict(env or {})
        self._ledger = QuotaLedger(name, Quota(max_instances, max_vcpus))
        self._children: dict[str, _Child] = {}

    def catalog(self) -> list[Offer]:
        """Every offer, quota or not: what running machines are matched against."""
        return list(self._offers)

    def offers(self) -> list[Offer]:
        self._forget_exited()
        return self._ledger.within(self._offers)

    async def provision(self, offer: Offer, *, spot: bool, join: JoinInfo) -> Provisioned:
        check_startable(self.name, self._offers, offer, spot=spot)
        self._forget_exited()
        node = new_node_name(self.name)
        self._ledger.hold(node, offer)
        try:
            child = await self._start(offer, spot, join, node)
        except BaseException:
            self._ledger.drop_pending(node)
            raise
        self._ledger.settle(node, node)
        self._children[node] = child
        log.info(
            "started local node %s (pid %d) for %s%s",
            node,
            child.process.pid,
            offer.name,
            " as spot" if spot else "",
        )
        return child.provisioned

    def command(self, offer: Offer, *, spot: bool, join: JoinInfo, node_name: str) -> list[str]:
        """The argv of the Shuttle for one node (the token is not in it: see TOKEN_ENV)."""
        argv = [self._python, "-m", "treadle", "shuttle"]
        argv += offer_options(offer, spot=spot, node_name=node_name, weaver_url=join.weaver_url)
        argv += ["--home", str(self.home_root / node_name)]
        argv += ["--runtime", "namespace"]
        # The offer's speed, not a measurement: every local node shares this machine's CPU, and
        # the point is to see the scheduler tell offers apart (it also skips the start-up run).
        argv += ["--perf-score", repr(offer.perf_score)]
        if offer.gpu_count:
            # This machine's GPUs are not the offer's: the node advertises made-up ones.
            argv += ["--simulate-gpus", f"{offer.gpu_count}:{offer.gpu_type or 'gpu'}"]
        return argv

    async def _start(self, offer: Offer, spot: bool, join: JoinInfo, node: str) -> _Child:
        home = self.home_root / node
        argv = self.command(offer, spot=spot, join=join, node_name=node)
        # Settings this process may carry (TREADLE_HOME, TREADLE_SHUTTLE_*) must not leak into
        # the child's configuration: it gets exactly what the offer says.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TREADLE_")}
        env.update(self._env)
        env["PYTHONUNBUFFERED"] = "1"
        env[TOKEN_ENV] = join.token
        try:
            logfile = await asyncio.to_thread(_open_log, home)
            try:
                # Its own session: a signal meant for Weaver's process group (Ctrl-C) must not
                # stop the fleet behind Weaver's back; release stops it on purpose.
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            finally:
                logfile.close()
        except OSError as exc:
            raise ProvisionError(f"cannot start a Shuttle for {offer.name}: {exc}") from None
        provisioned = Provisioned(
            provider=self.name,
            instance_id=node,
            node_name=node,
            offer=offer.name,
            spot=spot,
            started_at=datetime.now(UTC),
        )
        return _Child(process, provisioned)

    async def release(self, instance_id: str) -> None:
        child = self._children.pop(instance_id, None)
        self._ledger.drop(instance_id)
        if child is None:
            return  # never ours, or released already
        process = child.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)  # the Shuttle stops its work on its way out
            try:
                await asyncio.wait_for(process.wait(), self._grace_s)
            except TimeoutError:
                _kill(process)
                await process.wait()
            except BaseException:
                _kill(process)  # cancelled while waiting: forgotten already, so not left running
                raise
        log.info("stopped local node %s (exit %s)", instance_id, process.returncode)

    async def instances(self) -> list[Provisioned]:
        self._forget_exited()
        return [child.provisioned for child in self._children.values()]

    def pid(self, instance_id: str) -> int | None:
        """The Shuttle's process id while it runs (for tests and diagnostics)."""
        child = self._children.get(instance_id)
        return child.process.pid if child is not None else None

    def log_path(self, instance_id: str) -> Path:
        return self.home_root / instance_id / "shuttle.log"

    async def aclose(self) -> None:
        """Release every instance this provider started."""
        for instance_id in list(self._children):
            await self.release(instance_id)

    def _forget_exited(self) -> None:
        """A Shuttle that exited on its own (crashed, refused its token) is no instance any
        more and no longer counts against the quota; its log stays for a look."""
        for instance_id, child in list(self._children.items()):
            if child.process.returncode is not None:
                log.warning(
                    "local node %s exited (%s); see %s",
                    instance_id,
                    child.process.returncode,
                    self.log_path(instance_id),
                )
                del self._children[instance_id]
                self._ledger.drop(instance_id)


def _kill(process: asyncio.subprocess.Process) -> None:
    # The whole process group (its session's first group), in case it left helpers behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _open_log(home: Path) -> BinaryIO:
    home.mkdir(parents=True, exist_ok=True)
    return (home / "shuttle.log").open("ab")
