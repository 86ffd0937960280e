"""The one database and its migrations, on real SQLite files and a real PostgreSQL: a catalogue written
by release 0.1.0 (tests/data/catalogue-v0.1.db, made by tests/data/make_catalogue_v0_1.py) upgrades with
every row and serves; the baseline is exactly 0.1.0's schema; the head is exactly the tables the code
declares; the write discipline holds with two writers on one database."""

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect, select, text

from server.db import Base, Database
from server.db import sqlite as db_sqlite
from server.db.migrate import alembic_config, upgrade
from server.experiments.store import ExperimentStore
from server.registry.catalogue import Catalogue
from server.registry.errors import AdapterNotFoundError, NameConflictError
from server.registry.namespace import Name, Namespace
from server.registry.records import AdapterMetadata
from server.tenancy.audit import AuditLog
from server.tenancy.keys import KeyStore
from server.tenancy import shared_limits  # noqa: F401  (its tables are part of the schema)
from tests.postgres_server import postgres  # noqa: F401  (a fixture)

DATA = Path(__file__).parent / "data"
V0_1 = DATA / "catalogue-v0.1.db"
SECRETS = json.loads((DATA / "catalogue-v0.1.secrets.json").read_text())
HEAD = "0003"


BACKENDS = ["sqlite", "postgresql"]
TABLES_0_1 = {"adapter_versions", "aliases", "experiments", "experiment_requests", "tenants", "api_keys",
              "name_owners", "audit_events"}


@pytest.fixture(params=BACKENDS)
def empty_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalogue.db'}"
    return request.getfixturevalue("postgres")()


@pytest.fixture(params=BACKENDS)
def v0_1(request, tmp_path) -> str:
    """The URL of a catalogue as 0.1.0 left it (no alembic_version): a copy of the fixture file (opening
    one converts it to WAL and migrates it: never the original), or its rows in PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{shutil.copy(V0_1, tmp_path / 'catalogue.db')}"
    url = request.getfixturevalue("postgres")()
    _load_0_1(url)
    return url


def _load_0_1(url: str) -> None:
    """The 0.1.0 tables (the baseline's, which are 0.1.0's DDL) holding the fixture file's rows."""
    source, engine = create_engine(f"sqlite:///{V0_1}"), create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0001")
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(text("SET TIME ZONE 'UTC'"))  # 0.1.0's SQLite moments are naive UTC
        tables, target = MetaData(), MetaData()
        tables.reflect(source)
        target.reflect(connection)
        with source.connect() as reading:
            for table in tables.sorted_tables:
                rows = [dict(row._mapping) for row in reading.execute(select(table))]
                connection.execute(target.tables[table.name].insert(), rows)
        for table in ("adapter_versions", "experiments", "audit_events"):  # as if the rows were inserted
            connection.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"))
    source.dispose()
    engine.dispose()


def _rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _schema(path: Path) -> dict[str, str]:
    """Every table's and index's DDL as SQLite keeps it, but Alembic's own table."""
    with sqlite3.connect(path) as connection:
        return dict(connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name != 'alembic_version'"))


def _metadata(blob: str = "f") -> AdapterMetadata:
    return AdapterMetadata(blob_key=blob * 64, weights_sha256=blob * 64, description="", rank=4, alpha=8.0,
                           target_modules=("q_proj",), use_dora=False, use_rslora=False, trainable_params=1,
                           adapted_base_params=2, size_bytes=3, source="upload")


def test_a_0_1_catalogue_upgrades_with_every_row_and_serves(v0_1):
    before = {table: _rows(v0_1, f"SELECT count(*) FROM {table}")[0][0] for table in (
        "adapter_versions", "aliases", "experiments", "experiment_requests", "tenants", "api_keys", "audit_events")}
    assert _tables(v0_1) == TABLES_0_1 and all(before.values())

    database = Database(v0_1)
    try:
        assert _rows(v0_1, "SELECT version_num FROM alembic_version") == [(HEAD,)]
        assert {t: _rows(v0_1, f"SELECT count(*) FROM {t}")[0][0] for t in before} == before
        versions = _rows(v0_1, "SELECT name, version, deleted_at IS NOT NULL, blob_key FROM adapter_versions ORDER BY id")
        assert [(n, v, d, b[0]) for n, v, d, b in versions] == [
            ("support-bot", 1, 0, "a"), ("support-bot", 2, 1, "b"), ("old-bot", 1, 1, "c"), ("acme-bot", 1, 0, "d"),
            ("shared", 1, 0, "e")]
        assert _rows(v0_1, "SELECT alias, name, version FROM aliases ORDER BY alias") == [
            ("acme-prod", "acme-bot", 1), ("prod", "support-bot", 1)]
        assert _rows(v0_1, "SELECT name FROM tenants ORDER BY name") == [("acme",), ("globex",)]
        assert _rows(v0_1, "SELECT action, target FROM audit_events ORDER BY id") == [
            ("adapter.upload", "support-bot@1"), ("adapter.upload", "acme-bot@1"),
            ("experiment.create", "acme-exp"), ("key.revoke", SECRETS["globex_revoked"][0])]

        names = Namespace(database)
        catalogue, keys = Catalogue(database, names), KeyStore(database)
        experiments, audit = ExperimentStore(database, names), AuditLog(database)
        # name_owners became `names`: every adapter (deleted ones too), alias and experiment, with its owner
        assert _tables(v0_1) == TABLES_0_1 - {"name_owners"} | {"names", "tenant_buckets", "tenant_in_flight", "alembic_version"}
        assert {n: names.get(n) for n in ("support-bot", "old-bot", "acme-bot", "shared", "prod", "acme-prod",
                                          "acme-exp")} == {
            "support-bot": Name("support-bot", "adapter", None, False),
            "old-bot": Name("old-bot", "adapter", None, False),
            "acme-bot": Name("acme-bot", "adapter", "acme", False),
            "shared": Name("shared", "adapter", None, True),
            "prod": Name("prod", "alias", None, False),
            "acme-prod": Name("acme-prod", "alias", "acme", False),
            "acme-exp": Name("acme-exp", "experiment", "acme", False),
        }
        assert names.visible_to("globex") == {"shared"} and names.owned_by("acme") == {"acme-bot", "acme-prod", "acme-exp"}

        # the app's operations on it
        assert catalogue.resolve("prod").key == "support-bot@1"
        assert catalogue.resolve("support-bot").key == "support-bot@1"  # @2 was deleted
        assert catalogue.resolve("acme-prod").created_at.tzinfo is not None
        with pytest.raises(AdapterNotFoundError):
            catalogue.resolve("old-bot")
        admin, acme, revoked = (SECRETS[k] for k in ("admin", "acme", "globex_revoked"))
        assert keys.authenticate(acme[1]).key_id == acme[0] and keys.authenticate(acme[1]).tenant == "acme"
        assert keys.authenticate(admin[1]).role == "admin" and keys.authenticate(revoked[1]) is None
        assert [(k.id, k.revoked_at is not None) for k in keys.keys()] == [
            (admin[0], False), (acme[0], False), (revoked[0], True)]
        [experiment] = experiments.all()
        assert (experiment.name, experiment.status.value, [v.adapter for v in experiment.variants]) == (
            "acme-exp", "running", ["acme-bot@1", None])
        records = experiments.records("acme-exp")
        assert [(r.variant, r.finished, r.error, r.score) for r in records] == [
            ("a", True, None, 1.0), ("b", True, "server_busy", None), ("a", False, None, None)]
        assert audit.events(limit=1)[1] == 4

        # ...and it keeps working: numbers go on, names stay owned, deleted names stay claimed
        assert catalogue.add_version("support-bot", _metadata()).version == 3
        with pytest.raises(NameConflictError, match="not available"):
            catalogue.add_version("acme-bot", _metadata(), tenant="globex")
        with pytest.raises(NameConflictError):
            catalogue.set_alias("old-bot", "support-bot")
    finally:
        database.close()
    assert _rows(f"sqlite:///{V0_1}", "SELECT count(*) FROM adapter_versions") == [(5,)], "the fixture is never changed"


def test_the_baseline_is_exactly_the_0_1_schema(tmp_path):
    path = tmp_path / "baseline.db"
    engine = create_engine(f"sqlite:///{path}")
    db_sqlite.configure(engine)
    upgrade(engine.execution_options(**{db_sqlite.WRITE_OPTION: True}), "0001")
    engine.dispose()
    assert _schema(path) == _schema(V0_1)


def _assert_head_matches_the_code(url: str) -> None:
    database = Database(url)
    try:
        with database.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        database.close()


def test_a_fresh_database_is_exactly_the_tables_the_code_declares(empty_url):
    _assert_head_matches_the_code(empty_url)


def test_an_upgraded_0_1_catalogue_is_exactly_the_tables_the_code_declares(v0_1):
    _assert_head_matches_the_code(v0_1)


def test_a_partial_0_1_catalogue_gets_the_tables_it_lacked(v0_1):
    """`loraserve keys` of 0.1.0 opened only the adapters' and the keys' stores, so made only their tables."""
    engine = create_engine(v0_1)
    with engine.begin() as connection:
        for table in ("experiment_requests", "experiments", "audit_events", "name_owners"):
            connection.execute(text(f"DROP TABLE {table}"))
    engine.dispose()
    database = Database(v0_1)
    try:
        names = Namespace(database)
        assert ExperimentStore(database, names).all() == [] and AuditLog(database).events()[1] == 0
        assert KeyStore(database).authenticate(SECRETS["acme"][1]).tenant == "acme"
        assert names.get("acme-bot") == Name("acme-bot", "adapter", None, False)  # no owner was recorded
    finally:
        database.close()


def test_downgrading_the_namespace_gives_name_owners_back(v0_1):
    owners = _rows(v0_1, "SELECT name, tenant, public FROM name_owners ORDER BY name")
    database = Database(v0_1)
    with database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    database.close()
    assert _rows(v0_1, "SELECT name, tenant, public FROM name_owners ORDER BY name") == owners
    assert _tables(v0_1) == TABLES_0_1 | {"alembic_version"}
    if v0_1.startswith("sqlite"):
        assert _schema(Path(v0_1.removeprefix("sqlite:///"))) == _schema(V0_1)


def test_two_writers_on_one_database_wait_for_each_other(empty_url):
    """Two Database objects stand for two processes (each has its own lock). On SQLite (in WAL mode) every
    write transaction takes the file's write lock before it reads, so none fails with 'database is
    locked'; on PostgreSQL a writer that lost a race for a version number runs again. No number is
    taken twice."""
    url = empty_url
    databases = [Database(url), Database(url)]
    try:
        if url.startswith("sqlite"):
            assert _rows(url, "PRAGMA journal_mode") == [("wal",)]
        catalogues = [Catalogue(d, Namespace(d)) for d in databases]
        errors, versions = [], []

        def add(catalogue: Catalogue) -> None:
            try:
                for _ in range(15):
                    versions.append(catalogue.add_version("bot", _metadata()).version)
            except Exception as exc:  # noqa: BLE001 - the assertion below shows it
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(catalogues[i % 2],)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and sorted(versions) == list(range(1, 91))
    finally:
        for database in databases:
            database.close()
