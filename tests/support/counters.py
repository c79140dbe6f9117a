"""The store worker's reconciliation identity (``ingestd/sink/worker.py`` docstring)::

    records_read == stored + duplicates + Σ deadlettered + Σ control + Σ skipped + pending

``resolved`` counts the records in a final bucket; ``accounted`` adds the ones still pending.
"""

from __future__ import annotations

from typing import Any


def resolved(store: dict[str, Any]) -> int:
    """Records the store worker put in a final bucket (not those still in an unflushed batch)."""
    return int(store["stored"] + store["duplicates"] + sum(store["deadlettered"].values())
               + sum(store["control"].values()) + sum(store["skipped"].values()))


def accounted(store: dict[str, Any]) -> int:
    """Every record the store worker read: resolved ones plus ``pending``."""
    return resolved(store) + int(store["pending"])
