"""fusillade-celery: a self-hosted OpenAI Batch API engine on Celery and PostgreSQL.

``celery -A fusillade_celery worker -Q model.<name>`` finds :data:`app` here; applications
enqueue work with :func:`submit_batch`, wait for it with :func:`wait_batch` and read it back
with :func:`get_batch` and :func:`iter_results`; operators change limits and escalations
while it runs with :func:`set_limits` and :func:`set_escalations`; a path gets a request
processor of its own with :func:`register_processor` (``processors/``).
"""

from . import tasks as _tasks  # noqa: E402,F401  (registers the tasks on the app)
from .app import app
from .limits import (
    escalations_table,
    limits_table,
    set_escalations,
    set_limits,
    unset_escalations,
    unset_limits,
)
from .processors import RequestProcessor, register_processor
from .queues import queue_for_model
from .settings import Settings
from .store import NotFound
from .submit import (
    Client,
    cancel_batch,
    delete_batch,
    delete_file,
    get_batch,
    iter_file,
    iter_results,
    submit_batch,
    wait_batch,
)
from .validation import InputError

__all__ = [
    "Client",
    "InputError",
    "NotFound",
    "RequestProcessor",
    "Settings",
    "app",
    "cancel_batch",
    "delete_batch",
    "delete_file",
    "escalations_table",
    "get_batch",
    "iter_file",
    "iter_results",
    "limits_table",
    "queue_for_model",
    "register_processor",
    "set_escalations",
    "set_limits",
    "submit_batch",
    "unset_escalations",
    "unset_limits",
    "wait_batch",
]
