"""Request processors: what runs one started request, chosen by its path (``base.py``)."""

from .base import (
    NEVER,
    BatchCancellation,
    Cancellation,
    RequestProcessor,
    dispatcher,
    load,
    processor_paths,
    register_processor,
    table,
    unregister_processor,
)
from .default import DEFAULT, DefaultProcessor

__all__ = [
    "DEFAULT",
    "NEVER",
    "BatchCancellation",
    "Cancellation",
    "DefaultProcessor",
    "RequestProcessor",
    "dispatcher",
    "load",
    "processor_paths",
    "register_processor",
    "table",
    "unregister_processor",
]
