"""Operator overrides of Celery's own options, applied after fusillade's defaults.

fusillade-celery builds its Celery configuration from the ``FUSILLADE_*`` settings (see
``fusillade_celery/app.py``: acks_late, reject_on_worker_lost, JSON only, task events for
Flower, the beat schedule). A ``celeryconfig`` module importable from the working directory (or
the module named by ``FUSILLADE_CELERY_CONFIG``) is loaded on top: lower-case names only.
This file ships with no active override; uncomment what your deployment needs.
"""

# More messages reserved per worker process (throughput on very fast upstreams):
# worker_prefetch_multiplier = 8

# Redis redelivers an unacknowledged message after this long; keep it above the longest
# upstream timeout plus the longest retry countdown:
# broker_transport_options = {"visibility_timeout": 3600, "max_connections": 2000}

# Flower / monitoring behind a proxy:
# worker_send_task_events = True
