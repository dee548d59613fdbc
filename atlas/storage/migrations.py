"""Schema versions of the Neo4j store: stamping a new store and upgrading an older one, one version at a time.

`ensure_schema` creates every constraint and index (`graph_schema`), then brings the store from the version it records
to `graph_schema.SCHEMA_VERSION` through `MIGRATIONS`. Each migration runs in one write transaction that also bumps
the version node, so a failed migration leaves the store at its old version.

This module sits above `graph_schema` (names, constraints), `aggregate` (the aggregate layer's maintenance) and
`identities` (transcoder identities), which the migrations use; none of those imports it. It must not write prompt
graphs itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from neo4j import Driver, ManagedTransaction

from atlas.storage.aggregate import hash_and_slim, rebuild_in_transaction, set_pair_keys
from atlas.storage.graph_schema import (
    SCHEMA_VERSION,
    STORE_NAME,
    create_constraints_and_indexes,
    read_schema_version,
)
from atlas.storage.identities import label_legacy_transcoders

logger = logging.getLogger(__name__)

# A migration upgrades the store from version k (its key) to k + 1 inside one write transaction; the version node
# is bumped in that same transaction, so a failed migration leaves the store at version k.
Migration = Callable[[ManagedTransaction], None]


def _migrate_1_to_2(tx: ManagedTransaction) -> None:
    """Version 2: the aggregate layer (the new indexes come from `create_constraints_and_indexes`)."""
    rebuild_in_transaction(tx)


def _migrate_2_to_3(tx: ManagedTransaction) -> None:
    """Version 3: every AGG_EDGE keyed by `pair` (the index comes from `create_constraints_and_indexes`)."""
    set_pair_keys(tx)


def _migrate_3_to_4(tx: ManagedTransaction) -> None:
    """Version 4: node hashes `h`, integer `pair` keys, no stored float sums on AGG_EDGE."""
    hash_and_slim(tx)


def _migrate_4_to_5(tx: ManagedTransaction) -> None:
    """Version 5: Transcoders keyed by their weights. The store has no weights, so this only marks the existing,
    path-keyed Transcoders `identity: "legacy"` and records the name in their id; `atlas db migrate --transcoders
    DIR...` (`identities.merge_transcoders`) re-keys them and merges the copies of one dictionary."""
    label_legacy_transcoders(tx)


MIGRATIONS: dict[int, Migration] = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4, 4: _migrate_4_to_5}


class SchemaVersionError(RuntimeError):
    """The store's schema version cannot be brought to the version this code expects."""


def _set_version(tx: ManagedTransaction, version: int) -> None:
    tx.run(
        "MERGE (v:SchemaVersion {name: $name}) SET v.version = $version, v.updated_at = $now",
        name=STORE_NAME,
        version=version,
        now=datetime.now(UTC),
    ).consume()


def _migrate_step(tx: ManagedTransaction, migration: Migration, expected: int, new_version: int) -> None:
    # Re-read inside the transaction: a concurrent ensure_schema may have migrated already (then do nothing).
    record = tx.run("MATCH (v:SchemaVersion {name: $name}) RETURN properties(v) AS props", name=STORE_NAME).single()
    current = None if record is None else int(record["props"]["version"])
    if current != expected:
        return
    migration(tx)
    _set_version(tx, new_version)


def ensure_schema(
    driver: Driver,
    database: str = "neo4j",
    *,
    target_version: int = SCHEMA_VERSION,
    migrations: Mapping[int, Migration] | None = None,
) -> int:
    """Create constraints and indexes, record or upgrade the schema version; return the store's version.

    A store without a version node is new (or predates versioning, which only version 1 did) and is stamped with
    `target_version`. An older store is upgraded through `migrations` (default `MIGRATIONS`), one version per
    transaction; a store newer than this code raises `SchemaVersionError` rather than being written to.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    create_constraints_and_indexes(driver, database)
    with driver.session(database=database) as session:
        current = read_schema_version(driver, database)
        if current is None:
            session.execute_write(_stamp_if_absent, target_version)
            current = read_schema_version(driver, database)
            assert current is not None
        if current > target_version:
            raise SchemaVersionError(
                f"the Neo4j store is at schema version {current}, newer than this code's {target_version}; "
                "upgrade circuit-atlas"
            )
        while current < target_version:
            migration = migrations.get(current)
            if migration is None:
                raise SchemaVersionError(f"no migration from schema version {current} to {current + 1}")
            logger.info("migrating the Neo4j store from schema version %d to %d", current, current + 1)
            session.execute_write(_migrate_step, migration, current, current + 1)
            new = read_schema_version(driver, database)
            assert new is not None
            current = new
    return current


def _stamp_if_absent(tx: ManagedTransaction, version: int) -> None:
    tx.run(
        "MERGE (v:SchemaVersion {name: $name}) ON CREATE SET v.version = $version, v.updated_at = $now",
        name=STORE_NAME,
        version=version,
        now=datetime.now(UTC),
    ).consume()
