"""All SQL of the engine, one method per statement group, named for what it does.

Tasks, the CLI and the submit helper call these methods and never hold a cursor. Every write
that belongs to an execution is fenced: ``WHERE id = :id AND claim_token = :token AND state =
:expected``, so a stale, duplicate or late message changes nothing (docs/architecture.md
invariant 2).
"""

from __future__ import annotations

from ..states import TERMINAL
from .base import (
    Claimed,
    Finish,
    HandOff,
    NotFound,
    StoreBase,
    WorkItem,
    Written,
    new_token,
    retry_while_unreachable,
    unreachable,
)
from .batches import BatchStore
from .claims import ClaimStore
from .config import ConfigStore, StoredConfig
from .errors import ModelError
from .files import FileStore
from .keys import KeyStore
from .maintenance import MaintenanceStore
from .metrics import ClusterGauges, MetricsStore
from .overview import BatchProgress, ModelOverview, OverviewStore
from .steps import NewStep, Step, StepStore
from .submit import SubmitStore
from .workers import WorkerStore


class Store(
    SubmitStore,
    ClaimStore,
    BatchStore,
    MaintenanceStore,
    WorkerStore,
    ConfigStore,
    MetricsStore,
    OverviewStore,
    StepStore,
    FileStore,
    KeyStore,
):
    """The state of record, behind one interface. Works on PostgreSQL and on SQLite. Its
    methods live in one module per concern (``claims``, ``batches``, ``maintenance``,
    ``workers``, ``submit``, ``config``, ``metrics``, ``errors``, ``overview``, ``steps``,
    ``files`` and ``keys``); the hot statements in ``statements``."""


__all__ = [
    "BatchProgress",
    "Claimed",
    "ClusterGauges",
    "Finish",
    "HandOff",
    "ModelError",
    "ModelOverview",
    "NewStep",
    "NotFound",
    "Step",
    "Store",
    "StoreBase",
    "StoredConfig",
    "TERMINAL",
    "WorkItem",
    "Written",
    "new_token",
    "retry_while_unreachable",
    "unreachable",
]
