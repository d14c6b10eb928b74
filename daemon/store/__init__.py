"""The store: the single source of truth for tasks. `open_store(url)` picks the backend by
URL scheme and imports its driver lazily; nothing outside this package imports a driver."""

from daemon.store.base import ClaimBatch, Store, open_store

__all__ = ["ClaimBatch", "Store", "open_store"]
