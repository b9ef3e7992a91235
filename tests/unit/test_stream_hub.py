"""Streams on a node's link (`StreamHub`): a request whose frame the node would not take is
refused before it counts against the tenant, and before anything reaches the link."""

from __future__ import annotations

import pytest

from treadle.domain.errors import InvalidRequest, LimitExceeded
from treadle.domain.resources import Resources, Tier
from treadle.protocol import ExecStart, Hello
from treadle.protocol.limits import MAX_FRAME_BYTES
from treadle.weaver.services.nodes import NodeSession
from treadle.weaver.services.streams import StreamHub


def _session() -> NodeSession:
    hello = Hello(protocol=2, name="n", capacity=Resources(), runtimes=[Tier.NAMESPACE])
    return NodeSession(node_id="nd_1", hello=hello)


async def test_a_frame_past_the_node_s_limit_is_refused_and_leaves_nothing_open() -> None:
    hub, session = StreamHub(max_per_tenant=2), _session()
    piece = "x" * (128 * 1024)
    fits = [piece] * (MAX_FRAME_BYTES // len(piece) - 8)  # a little under, with the framing
    too_big = [piece] * (MAX_FRAME_BYTES // len(piece) + 1)
    with pytest.raises(InvalidRequest) as refused:
        hub.start(session, "tn_a", ExecStart, "sbx_1", 1, argv=too_big)
    assert refused.value.details == {"limit": "frame_bytes", "value": MAX_FRAME_BYTES}
    with pytest.raises(InvalidRequest):  # one the frame's own rules refuse (a 257-char tag)
        hub.start(session, "tn_a", ExecStart, "sbx_1", 1, argv=["true"], tag="t" * 257)
    assert session.outbox.empty()
    # Neither counted: the tenant still has both its streams.
    hub.start(session, "tn_a", ExecStart, "sbx_1", 1, argv=fits)
    hub.start(session, "tn_a", ExecStart, "sbx_1", 1, argv=["true"])
    assert session.outbox.qsize() == 2
    with pytest.raises(LimitExceeded):
        hub.start(session, "tn_a", ExecStart, "sbx_1", 1, argv=["true"])
