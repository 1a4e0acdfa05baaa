"""The declared schema (SQLAlchemy Core). Alembic migrations must produce exactly this.

Times are epoch seconds (double precision) taken from the writer's clock: the arithmetic the
engine needs (deadline minus now, backoff due times) is then the same on PostgreSQL and SQLite,
and the OpenAI Batch object wants unix timestamps anyway.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
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
    text,
)

from .states import IN_FLIGHT, RequestState

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(512), nullable=False),
    Column("purpose", String(32), nullable=False),  # batch | batch_output | batch_error
    Column("bytes", BigInteger, nullable=False, server_default="0"),
    Column("sha256", String(64)),
    Column("batch_id", String(64)),  # for batch_output / batch_error files
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("deleted_at", Float),
    Column("owner", String(256)),
    # What a batch made from the file needs, known once the whole file is read: its lines'
    # url, their models (JSON list) and how many there are (NULL for result files).
    Column("endpoint", String(128)),
    Column("models", Text),
    Column("request_count", Integer),
    Index("ix_files_sha256", "sha256"),
    # A key's files, newest first (``GET /v1/files``).
    Index("ix_files_owner_created", "owner", "created_at"),
)

request_templates = Table(
    "request_templates",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("file_id", String(64), ForeignKey("files.id"), nullable=False),
    Column("line_number", Integer, nullable=False),
    Column("custom_id", String(64), nullable=False),
    Column("method", String(8), nullable=False),
    Column("url", String(128), nullable=False),
    Column("body", Text, nullable=False),
    Column("model", String(256), nullable=False),
    Column("body_bytes", Integer, nullable=False),
    UniqueConstraint("file_id", "custom_id", name="uq_request_templates_file_custom_id"),
    Index("ix_request_templates_file_line", "file_id", "line_number"),
)

_ACTIVE_BATCH = text(
    "completed_at IS NULL AND failed_at IS NULL AND expired_at IS NULL "
    "AND cancelled_at IS NULL AND deleted_at IS NULL"
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("file_id", String(64), ForeignKey("files.id"), nullable=False),
    Column("endpoint", String(128), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("metadata", Text),  # JSON object
    Column("owner", String(256)),
    # Upstream chosen by the submit call (else the model's route in settings). The key is needed
    # by workers on other machines, so it lives here; it never enters a message or a log line.
    Column("upstream_url", String(2048)),
    Column("upstream_api_key", Text),
    Column("models", Text, nullable=False),  # JSON list: lets the claimer skip a DISTINCT scan
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("total_requests", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("in_progress_at", Float),
    Column("finalizing_at", Float),
    Column("completed_at", Float),
    Column("failed_at", Float),
    Column("expired_at", Float),
    Column("cancelling_at", Float),
    Column("cancelled_at", Float),
    Column("deleted_at", Float),
    Column("errors", Text),  # JSON
    Index("ix_batches_file_id", "file_id"),  # a file's batches (Store.purge_chunk)
    # A key's batches, newest first (``GET /v1/batches``, the page).
    Index("ix_batches_owner_created", "owner", "created_at"),
    Index(
        "ix_batches_active",
        "expires_at",
        postgresql_where=_ACTIVE_BATCH,
        sqlite_where=_ACTIVE_BATCH,
    ),
)

_PENDING = text(f"state = '{RequestState.PENDING.value}'")
_IN_FLIGHT = text("state IN (" + ", ".join(f"'{s.value}'" for s in sorted(IN_FLIGHT)) + ")")

requests = Table(
    "requests",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("batch_id", String(64), ForeignKey("batches.id"), nullable=False),
    # No foreign key: no index serves one (an index would be one more to update on every
    # state change), so deleting a template had PostgreSQL scan all requests, 8 s a chunk of
    # 1,000 next to 100,000 live requests, and its check was a quarter of a submit's insert.
    # Requests are made from their batch's own file (Store.submit) and that file's templates
    # are purged only once none of its batches has a request left (Store.purge_chunk).
    Column("template_id", BigInteger, nullable=False),
    Column("custom_id", String(64), nullable=False),
    Column("model", String(256), nullable=False),
    Column("routed_model", String(256)),
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("claim_token", String(32)),
    Column("worker_id", String(256)),
    Column("deadline", Float, nullable=False),  # the batch's expires_at, for the claim order
    Column("not_before", Float),
    Column("claimed_at", Float),
    Column("started_at", Float),
    Column("completed_at", Float),
    Column("failed_at", Float),
    Column("canceled_at", Float),
    Column("response_status", Integer),
    Column("response_body", Text),
    Column("error", Text),  # JSON {"kind", "detail", "status"?}
    # Claim: pending rows of one model, earliest deadline then line order.
    Index(
        "ix_requests_pending",
        "model",
        "deadline",
        "id",
        postgresql_where=_PENDING,
        sqlite_where=_PENDING,
    ),
    # Capacity: in-flight rows per routed model (claimed + processing + retrying).
    Index(
        "ix_requests_in_flight",
        "routed_model",
        "state",
        postgresql_where=_IN_FLIGHT,
        sqlite_where=_IN_FLIGHT,
    ),
    # Counts, results streaming and finalize: everything of a batch by state, in line order.
    Index("ix_requests_batch_state", "batch_id", "state", "id"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(256), primary_key=True),
    Column("hostname", String(256), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("last_heartbeat", Float, nullable=False),
    Column("status", String(16), nullable=False),
    Column("counters", Text),
    # The worker's -c: the claimer sizes execute messages to fit the smallest consumer's.
    Column("concurrency", Integer),
)

# Live configuration (``fusillade-celery limits`` / ``escalations``): a row overrides the
# environment's value for its model; no row, the environment's value applies. Read by every
# claimer and hand-off through ``live.current`` (cached for a fraction of a claim interval).
model_limits = Table(
    "model_limits",
    metadata,
    Column("model", String(256), primary_key=True),
    # 0 pauses the model: nothing new is claimed or handed off, in-flight requests finish.
    Column("max_in_flight", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)

model_escalations = Table(
    "model_escalations",
    metadata,
    Column("model", String(256), primary_key=True),
    # NULL: escalation switched off for the model, whatever the environment says.
    Column("escalation_model", String(256)),
    Column("threshold_s", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# The last upstream failure per model (``fusillade-celery status`` / ``top``): written by the
# workers at most once per model every few seconds per process (``failures.FailureLog``), so
# an unreachable upstream shows up without a query per request. One row per model, replaced.
model_errors = Table(
    "model_errors",
    metadata,
    Column("model", String(256), primary_key=True),  # the routed model
    Column("kind", String(32), nullable=False),  # ErrorKind
    Column("status_code", Integer),
    Column("message", String(512), nullable=False),  # short; never a key, a body snippet at most
    Column("host", String(512)),  # the upstream's host[:port], never its URL's credentials
    Column("last_at", Float, nullable=False),
    # Failures counted since the row was made (a rate-limited write adds the ones it stands for).
    Column("error_count", BigInteger, nullable=False, server_default="0"),
)

# The ``/v1/responses`` loop's steps (``processors/responses_loop.py``): each model call and
# tool call of a request is a row, so a retry or a reclaim resumes the chain where it stopped
# instead of repeating calls (a non-idempotent tool is never called twice). No foreign key,
# as for ``requests.template_id``: steps are deleted with their request (``purge_chunk``).
response_steps = Table(
    "response_steps",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("request_id", BigInteger, nullable=False),
    # The agent tool call whose nested loop the step belongs to; NULL at the top level.
    Column("parent_id", BigInteger),
    Column("seq", Integer, nullable=False),  # order within its loop (its parent)
    Column("kind", String(16), nullable=False),  # model_call | tool_call
    Column("name", String(256)),  # the model, or the tool
    Column("call_id", String(256)),  # a tool call's id, as the model gave it
    Column("state", String(16), nullable=False),  # started | completed | failed
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("request", Text),  # JSON: the chat body sent; the tool call (name, arguments)
    Column("response", Text),  # JSON: the model's reply; the tool call's output
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("completed_at", Float),
    Index("ix_response_steps_request", "request_id", "parent_id", "seq"),
)

# API keys (``fusillade-celery keys``): only a hash of each key is kept. A key acts for its
# ``name``: the files and batches whose ``owner`` is that name (keys of one name share them,
# so a key is rotated by creating a second one of the same name and revoking the first).
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("key_hash", String(64), nullable=False),  # sha256 hex of the whole key
    Column("prefix", String(16), nullable=False),  # the key's first characters, for `keys list`
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
)
