"""How long the store keeps what has ended: each execution that ended, with its output, each
sandbox that stopped or failed, each batch none of whose executions is left, and each event,
`keep_s` after it ended (an event: after it was emitted). Without it those tables only grow,
by several rows an execution. The usage ledger is kept whole: tenants are billed from it.

One replica sweeps, the one that reconciles the fleet (`Reconciler`), at most `chunk` rows of
each kind a pass, through the writer, so that a backlog (retention switched on, or
shortened) is worked off pass after pass without holding the writer long. Ids sort by when
they were made (`ids`), and what was made after the cutoff cannot have ended before it: a
pass reads the primary key from its oldest end up to the cutoff's id, never the whole table.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import delete, exists, func, select

from treadle.domain.execution import TERMINAL_STATES
from treadle.domain.sandbox import TERMINAL_STATUSES
from treadle.weaver.ids import BATCH, EVENT, EXECUTION, SANDBOX, first_id_at
from treadle.weaver.store import tables
from treadle.weaver.store.writer import Tx, Writer

__all__ = ["Retention"]

log = logging.getLogger(__name__)
_E = tables.executions
_O = tables.output_chunks
_B = tables.batches
_SB = tables.sandboxes
_EV = tables.events
_ENDED = sorted(state.value for state in TERMINAL_STATES)
_STOPPED = sorted(status.value for status in TERMINAL_STATUSES)
# Rows of each kind one pass removes at most.
CHUNK = 500
# How often a pass runs once nothing is left over.
EVERY_S = 60.0


class Retention:
    def __init__(
        self, writer: Writer, keep_s: float, every_s: float = EVERY_S, chunk: int = CHUNK
    ) -> None:
        self._writer = writer
        self._keep_s = keep_s
        self._every_s = every_s
        self._chunk = chunk
        self._next = 0.0

    async def tick(self) -> None:
        """Sweep when due (`keep_s` 0: never); due again at once while a pass leaves
        something over."""
        now = time.monotonic()
        if self._keep_s <= 0 or now < self._next:
            return
        removed = await self.sweep(time.time() - self._keep_s)
        if any(removed.values()):
            log.info("removed what ended more than %.0f s ago: %s", self._keep_s, removed)
        full = any(count >= self._chunk for count in removed.values())
        self._next = now if full else now + self._every_s

    async def sweep(self, cutoff: float) -> dict[str, int]:
        """One pass: what ended before `cutoff` (Unix seconds), up to `chunk` rows of each
        kind, oldest first; how many of each it removed."""
        chunk = self._chunk

        async def write(tx: Tx) -> dict[str, int]:
            async def remove(prefix: str, key: Any, ended: list[Any], dependent: Any = None) -> int:
                made = key.table.c.id < first_id_at(prefix, cutoff)
                return await _remove(tx, key, [made, *ended], chunk, dependent)

            # Executions before batches: a batch goes once none of its executions is left.
            ended_executions = [_E.c.state.in_(_ENDED), _ended_at(_E) < cutoff]
            return {
                "executions": await remove(EXECUTION, _E.c.id, ended_executions, _O.c.execution_id),
                "batches": await remove(
                    BATCH,
                    _B.c.id,
                    [_B.c.created_at < cutoff, ~exists().where(_E.c.batch_id == _B.c.id)],
                ),
                "sandboxes": await remove(
                    SANDBOX, _SB.c.id, [_SB.c.status.in_(_STOPPED), _ended_at(_SB) < cutoff]
                ),
                "events": await remove(EVENT, _EV.c.seq, []),
            }

        return await self._writer.run(write)


def _ended_at(table: Any) -> Any:
    """When a row ended; where none was recorded, its last change (or its creation)."""
    last = table.c.updated_at if "updated_at" in table.c else table.c.created_at
    return func.coalesce(table.c.ended_at, last)


async def _remove(tx: Tx, key: Any, conditions: list[Any], chunk: int, dependent: Any) -> int:
    """Remove up to `chunk` rows that meet `conditions`, oldest first (the table's `id` is
    made in time order), with the rows of `dependent` (a column holding their `key`)."""
    query = select(key).where(*conditions).order_by(key.table.c.id).limit(chunk)
    keys = list((await tx.conn.execute(query)).scalars())
    if keys:
        if dependent is not None:
            await tx.conn.execute(delete(dependent.table).where(dependent.in_(keys)))
        await tx.conn.execute(delete(key.table).where(key.in_(keys)))
    return len(keys)
