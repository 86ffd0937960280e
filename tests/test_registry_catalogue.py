"""The catalogue on a real SQLite file: versions, soft deletes, aliases, resolution, pages, restarts."""

from datetime import UTC, datetime, timedelta

import pytest

from server.db import Database
from server.registry.catalogue import Catalogue
from server.registry.errors import AdapterNotFoundError, InvalidNameError, NameConflictError
from server.registry.namespace import Namespace
from server.registry.records import AdapterMetadata


def _metadata(key_char: str = "a", rank: int = 8) -> AdapterMetadata:
    return AdapterMetadata(
        blob_key=key_char * 64, weights_sha256="f" * 64, description="test", rank=rank, alpha=16.0,
        target_modules=("q_proj", "v_proj"), use_dora=False, use_rslora=True, trainable_params=3584,
        adapted_base_params=12288, size_bytes=20_000, source="upload",
    )


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'catalogue.db'}"


def _open(url: str) -> tuple[Database, Catalogue]:
    database = Database(url)
    return database, Catalogue(database, Namespace(database))


@pytest.fixture
def catalogue(url):
    database, catalogue = _open(url)
    yield catalogue
    database.close()


def test_versions_count_up_and_keep_their_metadata(catalogue):
    before = datetime.now(UTC)
    first = catalogue.add_version("bot", _metadata("a"))
    second = catalogue.add_version("bot", _metadata("b", rank=16))
    assert (first.version, second.version, second.key) == (1, 2, "bot@2")
    assert catalogue.add_version("other", _metadata("a")).version == 1  # counters are per name
    assert catalogue.latest("bot") == second
    assert catalogue.get_version("bot", 1) == first
    assert first.target_modules == ("q_proj", "v_proj") and first.use_rslora and second.rank == 16
    assert first.created_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= first.created_at <= datetime.now(UTC)
    assert [r.version for r in catalogue.versions("bot")] == [1, 2]


def test_deleted_version_numbers_are_never_reused(catalogue):
    for key in "abc":
        catalogue.add_version("bot", _metadata(key))
    [deleted] = catalogue.delete("bot", 3)
    assert deleted.deleted and deleted.deleted_at is not None
    assert catalogue.add_version("bot", _metadata("d")).version == 4
    assert len(catalogue.delete("bot")) == 3  # 1, 2 and 4: every live version
    assert catalogue.latest("bot") is None and catalogue.versions("bot") == []
    assert catalogue.latest("bot", include_deleted=True).version == 4  # rows are kept
    assert catalogue.add_version("bot", _metadata("e")).version == 5
    with pytest.raises(AdapterNotFoundError, match="bot@3.*deleted"):
        catalogue.get_version("bot", 3)
    with pytest.raises(AdapterNotFoundError):
        catalogue.delete("bot", 3)  # already deleted


def test_resolution_of_names_versions_and_aliases(catalogue):
    catalogue.add_version("bot", _metadata("a"))
    catalogue.add_version("bot", _metadata("b"))
    assert catalogue.resolve("bot").version == 2
    assert catalogue.resolve("bot@1").blob_key == "a" * 64
    alias = catalogue.set_alias("prod", "bot", 1)
    assert alias.target == "bot@1" and catalogue.resolve("prod").key == "bot@1"
    assert catalogue.set_alias("latest", "bot").target == "bot@2"  # bare name: pinned to the newest now
    catalogue.add_version("bot", _metadata("c"))
    assert catalogue.resolve("latest").key == "bot@2"  # pinned: a later version does not move it

    moved = catalogue.set_alias("prod", "bot", 3)
    assert moved.created_at == alias.created_at and moved.updated_at >= alias.updated_at
    assert catalogue.resolve("prod").key == "bot@3"

    catalogue.delete("bot", 2)
    with pytest.raises(AdapterNotFoundError, match="'latest' points to 'bot@2', which was deleted"):
        catalogue.resolve("latest")
    for missing in ("nobody", "bot@2", "bot@9"):
        with pytest.raises(AdapterNotFoundError):
            catalogue.resolve(missing)
    with pytest.raises(InvalidNameError):
        catalogue.resolve("../bot")


def test_aliases_and_adapter_names_never_shadow_each_other(catalogue):
    catalogue.add_version("bot", _metadata())
    catalogue.set_alias("prod", "bot", 1)
    with pytest.raises(NameConflictError):
        catalogue.set_alias("bot", "bot", 1)
    with pytest.raises(NameConflictError):
        catalogue.add_version("prod", _metadata())
    catalogue.delete("bot")
    with pytest.raises(NameConflictError):  # a deleted name still owns its version numbers
        catalogue.set_alias("bot", "prod", 1)
    with pytest.raises(AdapterNotFoundError):
        catalogue.set_alias("staging", "bot")  # no live version to point at
    with pytest.raises(InvalidNameError):
        catalogue.set_alias("a/b", "bot", 1)


def test_alias_listing_and_removal(catalogue):
    catalogue.add_version("bot", _metadata())
    catalogue.set_alias("b", "bot", 1)
    catalogue.set_alias("a", "bot", 1)
    assert [a.alias for a in catalogue.list_aliases()] == ["a", "b"]
    assert catalogue.delete_alias("a").target == "bot@1"
    assert [a.alias for a in catalogue.list_aliases()] == ["b"]
    with pytest.raises(AdapterNotFoundError):
        catalogue.get_alias("a")
    with pytest.raises(AdapterNotFoundError):
        catalogue.resolve("a")


def test_list_pages_through_live_names(catalogue):
    for name in ("e", "a", "d", "c", "b"):
        catalogue.add_version(name, _metadata())
    catalogue.add_version("c", _metadata("b"))
    catalogue.delete("d")
    first = catalogue.list_adapters(limit=2, offset=0)
    second = catalogue.list_adapters(limit=2, offset=2)
    assert first.total == second.total == 4
    assert [s.name for s in first.items] == ["a", "b"]
    summaries = [(s.name, s.versions, s.latest.version) for s in second.items]
    assert summaries == [("c", (1, 2), 2), ("e", (1,), 1)]
    assert catalogue.list_adapters(limit=2, offset=4).items == ()


def test_everything_survives_reopening(url):
    database, first = _open(url)
    record = first.add_version("bot", _metadata())
    first.set_alias("prod", "bot", 1)
    database.close()
    database, again = _open(url)
    try:
        assert again.resolve("prod") == record
        assert again.add_version("bot", _metadata("b")).version == 2
    finally:
        database.close()


def test_remembered_resolutions_follow_every_write(catalogue):
    """resolve() answers from memory after the first time: each write must drop what it changed."""
    catalogue.add_version("tone", _metadata("a"))
    assert catalogue.resolve("tone").version == 1
    catalogue.add_version("tone", _metadata("b"))
    assert catalogue.resolve("tone").version == 2
    catalogue.set_alias("prod", "tone", 1)
    assert catalogue.resolve("prod").version == 1
    catalogue.set_alias("prod", "tone", 2)
    assert catalogue.resolve("prod").version == 2
    catalogue.delete("tone", 2)
    assert catalogue.resolve("tone").version == 1
    with pytest.raises(AdapterNotFoundError):
        catalogue.resolve("prod")
    catalogue.delete_alias("prod")
    catalogue.add_version("prod", _metadata("c"))  # the name is free again: now an adapter
    assert catalogue.resolve("prod").name == "prod"
