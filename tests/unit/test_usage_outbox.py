"""A node's usage records on their way to Weaver (`treadle.shuttle.gauge.outbox`): each kept
on disk until acknowledged, sent again on every new link, read back by the next Shuttle, and
the journal rewritten without what was acknowledged."""

from __future__ import annotations

import json
from pathlib import Path

from treadle.protocol import UsageAck, UsageKey, UsageRecord, decode_from_shuttle
from treadle.shuttle.gauge.outbox import UsageOutbox


def record(seq: int, workload: str = "ex_1") -> UsageRecord:
    return UsageRecord(
        kind="execution", id=workload, generation=1, seq=seq, start=100.0, end=110.0, wall_s=10.0
    )


def ack(*records: UsageRecord) -> UsageAck:
    return UsageAck(
        keys=[UsageKey(kind=r.kind, id=r.id, generation=r.generation, seq=r.seq) for r in records]
    )


def sent_keys(frames: list[str]) -> list[int]:
    return [r.seq for frame in frames for r in decode_from_shuttle(frame).records]  # type: ignore[union-attr]


def test_records_go_at_once_and_again_on_every_new_link(tmp_path: Path) -> None:
    outbox = UsageOutbox(tmp_path / "usage.journal")
    outbox.add(record(1))  # no link yet: kept
    frames: list[str] = []
    outbox.attach(frames.append)
    outbox.add(record(2))
    outbox.add(record(2))  # the same record: once
    assert sent_keys(frames) == [1, 2]
    outbox.ack(ack(record(1)))
    outbox.detach()
    again: list[str] = []
    outbox.attach(again.append)
    assert sent_keys(again) == [2]
    outbox.close()


def test_the_next_shuttle_reads_back_what_was_not_acknowledged(tmp_path: Path) -> None:
    journal = tmp_path / "usage.journal"
    outbox = UsageOutbox(journal)
    for seq in (1, 2, 3):
        outbox.add(record(seq))
    outbox.ack(ack(record(2)))
    outbox.close()  # or killed: every record was on disk before it was sent
    with open(journal, "a") as f:
        f.write('{"kind": "execution", "id": "ex_1", "gen')  # a line cut by a crash
    later = UsageOutbox(journal)
    assert sorted(r.seq for r in later.pending) == [1, 3]
    later.close()


def test_the_journal_is_rewritten_without_what_was_acknowledged(tmp_path: Path) -> None:
    journal = tmp_path / "usage.journal"
    outbox = UsageOutbox(journal)
    records = [record(seq) for seq in range(1, 201)]
    for one in records:
        outbox.add(one)
    outbox.ack(ack(*records[:150]))
    lines = journal.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(151, 201))
    outbox.add(record(201))
    assert json.loads(journal.read_text().splitlines()[-1])["seq"] == 201
    outbox.close()
