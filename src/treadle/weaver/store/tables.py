"""The schema, as SQLAlchemy Core tables. Migrations create it; nothing calls create_all.

Times are Unix seconds (REAL/DOUBLE): one representation on every backend, cheap to compare.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

from treadle.domain.execution import ACTIVE_STATES
from treadle.weaver.store.database import JSONValue

__all__ = [
    "ACTIVE_STATE_VALUES",
    "api_keys",
    "batches",
    "events",
    "executions",
    "functions",
    "join_tokens",
    "metadata",
    "nodes",
    "output_chunks",
    "sandboxes",
    "tenants",
]

# The states of executions a node can hold, as stored (for `state IN (...)`).
ACTIVE_STATE_VALUES = sorted(state.value for state in ACTIVE_STATES)

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    # the unisolated process tier is for tenants the operator trusts with the node itself
    Column("allow_process_tier", Boolean, nullable=False, default=False, server_default=false()),
    # its quotas and budget (`treadle.domain.quotas.TenantLimits`); None: none
    Column("limits", JSON),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id"), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("admin", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

join_tokens = Table(
    "join_tokens",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    # When it stops being accepted: set ahead of time for tokens that expire.
    Column("revoked_at", Float),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(253), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("region", String(64)),
    Column("zone", String(64)),
    Column("labels", JSON, nullable=False),
    Column("capacity", JSON, nullable=False),
    Column("runtimes", JSON, nullable=False),
    Column("price_per_hour", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_heartbeat", Float),
    Column("country", String(2)),
    Column("spot", Boolean),
    Column("spot_price_per_hour", Float),
    Column("perf_score", Float),
    # EWMA of how this node's attempts ended (1: reported an exit, 0: lost with the node).
    Column("reliability", Float),
    Column("taints", JSON),
    Column("network_tiers", JSON),
)

functions = Table(
    "functions",
    metadata,
    Column("tenant_id", String(40), ForeignKey("tenants.id"), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("spec", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("deleted_at", Float),
)

executions = Table(
    "executions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id"), nullable=False),
    Column("function", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("node_id", String(40)),
    Column("placement", JSON),
    Column("resources", JSON, nullable=False),
    Column("isolation", String(16)),
    Column("pending_reason", Text),
    Column("args", JSON, nullable=False),
    Column("stdin", Text),
    Column("idempotency_key", String(255)),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("exit_code", Integer),
    Column("result", JSONValue),
    Column("error", String(255)),
    Column("output_chunks", Integer),
    # output characters stored; past the cap the rest is dropped and `output_truncated` set
    Column("output_bytes", BigInteger),
    Column("output_truncated", Boolean, nullable=False, default=False, server_default=false()),
    Column("created_at", Float, nullable=False),
    # when it last became open (created, or requeued): the unschedulable deadline counts
    # from here
    Column("queued_at", Float),
    Column("running_at", Float),
    Column("ended_at", Float),
    Column("duration_ms", Float),
    Column("cost", Float),
    # the batch that made it (`batches`), and its place there
    Column("batch_id", String(40)),
    Column("batch_index", Integer),
    UniqueConstraint("tenant_id", "idempotency_key", name="uq_executions_idempotency"),
)
Index("ix_executions_tenant_id", executions.c.tenant_id, executions.c.id)
# On PostgreSQL, active executions alone (migration 0012 says why).
Index(
    "ix_executions_state",
    executions.c.state,
    executions.c.node_id,
    postgresql_where=executions.c.state.in_(ACTIVE_STATE_VALUES),
)
Index("ix_executions_batch", executions.c.batch_id, executions.c.batch_index)

# One batch invoke (map): its items are the executions that name it, except those refused or
# answered by an execution that already existed, which `refused` and `reused` hold by index.
batches = Table(
    "batches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id"), nullable=False),
    Column("function", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("idempotency_key", String(255)),
    Column("refused", JSON, nullable=False),
    Column("reused", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("tenant_id", "idempotency_key", name="uq_batches_idempotency"),
)

# The usage ledger (DESIGN §13): one row per usage record a node sent, stored once (its key
# is the record's), never updated, priced by Weaver when stored.
usage_records = Table(
    "usage_records",
    metadata,
    Column("kind", String(16), primary_key=True),
    Column("workload_id", String(40), primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("tenant_id", String(40), nullable=False),
    Column("node_id", String(40), nullable=False),
    # what it is of: a function's name (executions) or the sandbox's id again (sandboxes)
    Column("subject", String(64), nullable=False),
    Column("start", Float, nullable=False),
    Column("end", Float, nullable=False),
    Column("final", Boolean, nullable=False),
    Column("wall_s", Float, nullable=False),
    Column("paused_s", Float, nullable=False),
    Column("cpu_s", Float, nullable=False),
    Column("memory_peak_mib", Float, nullable=False),
    Column("memory_gib_s", Float, nullable=False),
    Column("disk_read_bytes", BigInteger, nullable=False),
    Column("disk_write_bytes", BigInteger, nullable=False),
    Column("net_in_bytes", BigInteger, nullable=False),
    Column("net_out_bytes", BigInteger, nullable=False),
    Column("gpu_s", Float, nullable=False),
    Column("gpu_memory_peak_mib", Float, nullable=False),
    # the price: the node's per hour as billed then, the share reserved, and what it came to
    Column("price_per_hour", Float, nullable=False),
    Column("share", Float, nullable=False),
    Column("cost", Float, nullable=False),
    Column("recorded_at", Float, nullable=False),
)
Index("ix_usage_records_tenant", usage_records.c.tenant_id, usage_records.c.end)
Index(
    "ix_usage_records_export",
    usage_records.c.recorded_at,
    usage_records.c.kind,
    usage_records.c.workload_id,
    usage_records.c.generation,
    usage_records.c.seq,
)

# How far each export of the ledger got: the last record it delivered, in the ledger's
# export order (recorded_at, then the record's key).
export_cursors = Table(
    "export_cursors",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("recorded_at", Float, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("workload_id", String(40), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)

output_chunks = Table(
    "output_chunks",
    metadata,
    Column("execution_id", String(40), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("stream", String(8), nullable=False),
    Column("data", Text, nullable=False),
)

sandboxes = Table(
    "sandboxes",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id"), nullable=False),
    # observed (domain.sandbox.SandboxStatus) and desired (Desired) status
    Column("status", String(16), nullable=False),
    Column("desired", String(16), nullable=False),
    # each start on a node is an incarnation; reports for others are fenced off
    Column("incarnation", Integer, nullable=False),
    Column("node_id", String(40)),
    Column("isolation", String(16)),
    # what it was created with (image, resources, env, network, policies, placement)
    Column("spec", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("pending_reason", Text),
    Column("end_reason", Text),
    Column("restarts", Integer, nullable=False, default=0, server_default="0"),
    Column("created_at", Float, nullable=False),
    # when the current incarnation started running
    Column("started_at", Float),
    Column("ended_at", Float),
    # the TTL's deadline; None: no TTL
    Column("expires_at", Float),
    Column("updated_at", Float, nullable=False),
    # what opens its ports without an API key (and signs their URLs)
    Column("access_token", String(64)),
    # when its idle timeout runs out, while it is idle; None while it is awake
    Column("idle_at", Float),
    # why it is awake, as its node last said: {"reasons": [...], "idle_since"}
    Column("awake", JSON),
)
Index("ix_sandboxes_tenant_id", sandboxes.c.tenant_id, sandboxes.c.id)
Index("ix_sandboxes_status", sandboxes.c.status, sandboxes.c.node_id)

events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("tenant_id", String(40)),
    Column("subject_id", String(128), nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)
Index("ix_events_subject", events.c.subject_id)
