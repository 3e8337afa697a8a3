"""Storage, the only package that speaks SQL: the store, its statements, its connections."""

from server.store.store import Store, migrate_database

__all__ = ["Store", "migrate_database"]
