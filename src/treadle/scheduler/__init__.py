"""Pure scheduler: no I/O, no clock, no randomness it is not given (DESIGN §5).

`place(request, nodes, offers)` answers where a piece of work should run: a `Placement` on a
node, a `Provision` of a provider offer when no node fits, or `Unschedulable` with the reasons
counted. Build a `Fleet` once to place many requests against the same nodes.
"""

from treadle.scheduler.fleet import Fleet
from treadle.scheduler.nodes import NodeView, failure_domain
from treadle.scheduler.offers import Offer
from treadle.scheduler.place import SupportsRandom, default_sample_size, place
from treadle.scheduler.policy import CRITERIA, PRESETS, PolicyError, Strategy, validate_policy
from treadle.scheduler.request import Request, Spread
from treadle.scheduler.results import Alternative, Placement, Provision, Unschedulable

__all__ = [
    "CRITERIA",
    "PRESETS",
    "Alternative",
    "Fleet",
    "NodeView",
    "Offer",
    "Placement",
    "PolicyError",
    "Provision",
    "Request",
    "Spread",
    "Strategy",
    "SupportsRandom",
    "Unschedulable",
    "default_sample_size",
    "failure_domain",
    "place",
    "validate_policy",
]
