"""Queue names, in one import-light module.

The claimer publishes to these names and operators type them after ``-Q``; keeping the rule in
one function means the docs, the claimer and the worker can never disagree.
"""

from __future__ import annotations

from kombu import Exchange, Queue

MODEL_QUEUE_PREFIX = "model."

#: Claimer and maintenance tasks. Every worker consumes it in addition to its ``-Q`` queues
#: (see ``app.py``), so ``beat`` plus one ``worker -Q model.x`` is a complete deployment.
CONTROL_QUEUE = "fusillade.control"


def queue_for_model(model: str) -> str:
    """The Celery queue that carries execute messages for ``model``: ``model.<name>``."""
    if not model:
        raise ValueError("model name must not be empty")
    return MODEL_QUEUE_PREFIX + model


def model_for_queue(queue: str) -> str | None:
    """Inverse of :func:`queue_for_model`; None for queues that are not model queues."""
    if queue.startswith(MODEL_QUEUE_PREFIX) and len(queue) > len(MODEL_QUEUE_PREFIX):
        return queue[len(MODEL_QUEUE_PREFIX) :]
    return None


def direct_queue(name: str) -> Queue:
    """A queue published to through the broker's default (anonymous) exchange.

    Publishing by queue name, not through a named exchange, means a message reaches its
    queue even when the broker lost the exchange bindings (a Redis FLUSHDB or a restart without
    persistence): kombu's Redis transport resolves the anonymous exchange without them."""
    return Queue(name, Exchange("", type="direct"), routing_key=name)
