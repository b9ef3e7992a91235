"""The isolation tier policy (DESIGN §4): which tiers a piece of work may run in, and the one
it runs in on the node placement chose. Function creation, placement and assignment all ask
here.

- A function that names a tier (`isolation`) runs in exactly that tier.
- One that names a minimum (`min_isolation`) runs in the weakest tier the node offers that is
  at least that strong. One that names neither runs in the weakest offered tier at least the
  fleet default (`DEFAULT`, `namespace`, unless the operator raises it). An `image` raises
  either floor to `oci`, and keeps the work to the tiers that run images (`IMAGE_TIERS`).
- `process` isolates nothing, so it is used only for a tenant the operator allows and only
  when the function, or the operator's default, names it. For any other tenant a floor of
  `process` counts as `namespace`, and an exact `process` is refused.

The weakest acceptable tier rather than the strongest offered: every tier from `namespace` up
separates tenants from each other and from the host (new user, pid, mount, network, ipc, uts
and cgroup namespaces, no capabilities, seccomp, cgroup limits, a read-only host), and a start
costs ~10 ms in `namespace` against ~250 ms in `gvisor` (docs/benchmarks.md). Which kernel
attack surface is acceptable is the operator's call, made once for the fleet with the default
or per function with `min_isolation`, not an accident of which tools a node has installed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from treadle.domain.function import IMAGE_TIERS, WorkloadSpec
from treadle.domain.resources import Tier

__all__ = [
    "DEFAULT",
    "ISOLATING",
    "PROCESS_NOT_ALLOWED",
    "TierRule",
    "choose",
    "default_tier",
    "names_process",
    "rule_for",
]

# The weakest tier that isolates anything.
ISOLATING = Tier.NAMESPACE
DEFAULT = ISOLATING
PROCESS_NOT_ALLOWED = (
    "the process tier isolates nothing and this tenant is not allowed it "
    "(an admin allows it with `treadle tenant allow-process TENANT`)"
)


def names_process(spec: WorkloadSpec) -> bool:
    """Whether the workload asks for the process tier by name: only allowed tenants may."""
    return Tier.PROCESS in (spec.isolation, spec.min_isolation)


@dataclass(frozen=True, slots=True)
class TierRule:
    """Where one piece of work may run: exactly `isolation`, else any tier at least `floor`;
    nowhere when `refused` says why."""

    isolation: Tier | None = None
    floor: Tier = ISOLATING
    refused: str | None = None
    only: frozenset[Tier] | None = None  # where the work can run at all (an image's tiers)

    @property
    def admits_process(self) -> bool:
        return self.refused is None and Tier.PROCESS in (self.isolation, self.floor)


def rule_for(spec: WorkloadSpec, *, allow_process: bool, default: Tier = DEFAULT) -> TierRule:
    """The rule for `spec` of a tenant that is (`allow_process`) or is not allowed the process
    tier, with `default` the floor of functions that name no tier."""
    if spec.isolation is not None:
        if spec.isolation is Tier.PROCESS and not allow_process:
            return TierRule(isolation=spec.isolation, refused=PROCESS_NOT_ALLOWED)
        return TierRule(isolation=spec.isolation)
    floor = spec.min_isolation or default
    required = spec.tier_floor
    if required is not None and required.strength > floor.strength:
        floor = required
    only = frozenset(IMAGE_TIERS) if spec.image is not None else None
    return TierRule(floor=_permitted(floor, allow_process), only=only)


def default_tier(runtimes: Collection[Tier], default: Tier = DEFAULT) -> Tier | None:
    """The tier a function that names none runs in on a node offering `runtimes`, for a
    tenant not allowed the process tier; None: such functions cannot run there."""
    return choose(TierRule(floor=_permitted(default, False)), runtimes)


def _permitted(floor: Tier, allow_process: bool) -> Tier:
    return ISOLATING if floor is Tier.PROCESS and not allow_process else floor


def choose(
    rule: TierRule,
    runtimes: Collection[Tier],
    network_tiers: Collection[Tier] = (),
    *,
    network: bool = False,
) -> Tier | None:
    """The tier to run in on a node offering `runtimes`: the weakest one the rule admits (of
    those giving network, for work that asks for it), or None when the rule admits none."""
    if rule.refused is not None:
        return None
    if rule.isolation is not None:
        return rule.isolation if rule.isolation in runtimes else None
    usable = sorted(
        (
            t
            for t in runtimes
            if t.strength >= rule.floor.strength and (rule.only is None or t in rule.only)
        ),
        key=_strength,
    )
    if network:
        # Placement chose this node because one of these gives network; without one the
        # work still runs, as it would have on a node without network anywhere.
        usable = [t for t in usable if t in network_tiers] or usable
    return usable[0] if usable else None


def _strength(tier: Tier) -> int:
    return tier.strength
