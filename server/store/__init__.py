"""Storage, the only package that speaks SQL: the store, its statements, its connections."""

from server.store.store import MIGRATION_LOCK_KEY, SWITCH_WAIT_S, Store, migrate_database

__all__ = ["MIGRATION_LOCK_KEY", "SWITCH_WAIT_S", "Store", "migrate_database"]
