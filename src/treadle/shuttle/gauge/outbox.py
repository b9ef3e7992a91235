"""Usage records on their way to Weaver: kept, on disk, until Weaver acknowledges them.

Each record is appended to a journal (one JSON line) before it is sent, so neither a lost
link nor a Shuttle that dies loses one: the records not yet acknowledged are sent again on
every new link (`attach`), and a Shuttle that starts reads them back from the journal. Weaver
stores a record once whatever the number of times it comes (its key), so sending again is
safe. An acknowledgement is journalled too (`{"acked": [key, ...]}`); the journal is
rewritten with only what is pending once most of it is acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from treadle.protocol import UsageAck, UsageRecord, UsageReport, encode
from treadle.protocol.messages import MAX_USAGE_RECORDS

__all__ = ["UsageOutbox"]

log = logging.getLogger(__name__)

Send = Callable[[str], None]
Key = tuple[str, str, int, int]


class UsageOutbox:
    def __init__(self, journal: Path) -> None:
        self._journal = journal
        self._pending: dict[Key, UsageRecord] = {}
        self._send: Send | None = None
        self._dropped = 0  # acknowledged records still in the journal
        self._load()
        self._file = open(journal, "a", encoding="utf-8")  # noqa: SIM115 - for its whole life

    @property
    def pending(self) -> list[UsageRecord]:
        return list(self._pending.values())

    def add(self, record: UsageRecord) -> None:
        """Keep `record` (on disk first), and send it if the link is up."""
        if record.key in self._pending:
            return
        self._file.write(record.model_dump_json() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._pending[record.key] = record
        if self._send is not None:
            self._send(encode(UsageReport(records=[record])))

    def attach(self, send: Send) -> None:
        """A new link: every record not yet acknowledged goes again."""
        self._send = send
        records = self.pending
        for start in range(0, len(records), MAX_USAGE_RECORDS):
            send(encode(UsageReport(records=records[start : start + MAX_USAGE_RECORDS])))

    def detach(self) -> None:
        self._send = None

    def ack(self, ack: UsageAck) -> None:
        done = []
        for key in ack.keys:
            found = (key.kind, key.id, key.generation, key.seq)
            if self._pending.pop(found, None) is not None:
                done.append(found)
        if not done:
            return
        self._dropped += len(done)
        if self._dropped > max(64, len(self._pending)):
            self._compact()
        else:
            self._file.write(json.dumps({"acked": done}) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _load(self) -> None:
        with contextlib.suppress(FileNotFoundError), open(self._journal, encoding="utf-8") as f:
            for line in f:
                if line.startswith('{"acked"'):
                    with contextlib.suppress(ValueError, TypeError):
                        for key in json.loads(line)["acked"]:
                            self._pending.pop(tuple(key), None)
                    continue
                try:
                    record = UsageRecord.model_validate_json(line)
                except ValidationError:
                    continue  # a line the last Shuttle did not finish writing
                self._pending[record.key] = record
        if self._pending:
            log.info("usage: %d records from before the last stop to send", len(self._pending))

    def _compact(self) -> None:
        """Rewrite the journal with the records still pending (atomically)."""
        tmp = self._journal.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in self._pending.values():
                f.write(record.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._journal)
        self._file.close()
        self._file = open(self._journal, "a", encoding="utf-8")  # noqa: SIM115
        self._dropped = 0
