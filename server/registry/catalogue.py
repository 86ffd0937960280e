"""Adapter metadata in SQL through SQLAlchemy 2.0: versions, soft deletes, aliases, `model` resolution.

Rules the catalogue keeps:
- A version is immutable. A new one gets max(version of that name, deleted ones included) + 1, so a
  number is never reused, even after every version of the name was deleted.
- Deleting is soft: the row stays (history, audit) with `deleted_at` set, and stops resolving.
- Adapter names and aliases are names of the one namespace (server/registry/namespace.py): a version
  claims its adapter's name and an alias its own in the transaction that writes them, for the calling
  tenant (None: an admin). Deleting an alias frees its name; an adapter's name stays claimed.
- An alias is pinned to one version. If that version is deleted the alias stays and fails to resolve,
  saying so, until it is pointed elsewhere.
Two replicas adding versions of one name take turns: the claim locks the name's row first. Should two
still collide (the name's very first version, before its row exists), the unique constraint refuses
one, whose write runs again (server/db/database.py) and takes the next number.
"""

from collections.abc import Collection
from dataclasses import asdict, fields
from datetime import datetime

from sqlalchemy import JSON, BigInteger, String, Text, UniqueConstraint, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.db import Base, Database, UtcDateTime, utc_now
from server.read_cache import ReadCache
from server.registry.errors import AdapterNotFoundError
from server.registry.names import adapter_key, parse_model_ref
from server.registry.namespace import Namespace
from server.registry.records import AdapterMetadata, AdapterRecord, AdapterSummary, AliasRecord, Page


class _VersionRow(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int]
    blob_key: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text)
    rank: Mapped[int]
    alpha: Mapped[float]
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    use_dora: Mapped[bool]
    use_rslora: Mapped[bool]
    trainable_params: Mapped[int] = mapped_column(BigInteger)
    adapted_base_params: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class _AliasRow(Base):
    __tablename__ = "aliases"

    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Catalogue:
    """The metadata store. Thread-safe; every method is one transaction and returns frozen records."""

    def __init__(self, db: Database, names: Namespace):
        self._db = db
        self._names = names
        self._resolved: ReadCache[str, AdapterRecord] = db.read_cache(["adapter_versions", "aliases"])

    # ---- versions -------------------------------------------------------------------------------

    def add_version(self, name: str, metadata: AdapterMetadata, tenant: str | None = None) -> AdapterRecord:
        """Store `metadata` as the next version of `name`, claimed for `tenant` (None: an admin);
        InvalidNameError or NameConflictError if the name is not available to it."""

        def work(session: Session) -> AdapterRecord:
            self._names.claim(session, name, "adapter", tenant)
            last = session.scalar(select(func.max(_VersionRow.version)).where(_VersionRow.name == name))
            values = asdict(metadata) | {"target_modules": list(metadata.target_modules)}
            row = _VersionRow(name=name, version=(last or 0) + 1, created_at=utc_now(), **values)
            session.add(row)
            session.flush()
            return _record(row)

        return self._db.write(work)

    def check_adapter_name(self, name: str, tenant: str | None = None) -> None:
        """Raise what `add_version` would for the name, without writing anything."""
        self._names.check(name, "adapter", tenant)

    def latest(self, name: str, *, include_deleted: bool = False) -> AdapterRecord | None:
        """The newest version of `name` (the newest live one unless `include_deleted`), or None."""
        with self._db.read() as session:
            row = _latest_row(session, name, include_deleted)
            return _record(row) if row is not None else None

    def get_version(self, name: str, version: int) -> AdapterRecord:
        """One live version; AdapterNotFoundError if it never existed or was deleted."""
        with self._db.read() as session:
            return _record(_live_version_row(session, name, version))

    def versions(self, name: str) -> list[AdapterRecord]:
        """The live versions of `name`, oldest first (empty if none)."""
        with self._db.read() as session:
            rows = session.scalars(_live().where(_VersionRow.name == name).order_by(_VersionRow.version))
            return [_record(r) for r in rows]

    def live_blob_keys(self, among: Collection[str] | None = None) -> set[str]:
        """The blob keys that live versions use (only those in `among`, if given)."""
        query = select(_VersionRow.blob_key).where(_VersionRow.deleted_at.is_(None)).distinct()
        if among is not None:
            query = query.where(_VersionRow.blob_key.in_(list(among)))
        with self._db.read() as session:
            return set(session.scalars(query))

    def list_adapters(self, limit: int = 50, offset: int = 0, only: Collection[str] | None = None) -> Page:
        """Names with at least one live version (among `only`, if given), ordered by name, `limit` of
        them from `offset`."""
        live_names = select(_VersionRow.name).where(_VersionRow.deleted_at.is_(None)).distinct()
        if only is not None:
            live_names = live_names.where(_VersionRow.name.in_(list(only)))
        with self._db.read() as session:
            total = session.scalar(select(func.count()).select_from(live_names.subquery()))
            names = list(session.scalars(live_names.order_by(_VersionRow.name).limit(limit).offset(offset)))
            rows = session.scalars(
                _live().where(_VersionRow.name.in_(names)).order_by(_VersionRow.name, _VersionRow.version)
            )
            by_name: dict[str, list[AdapterRecord]] = {}
            for row in rows:
                by_name.setdefault(row.name, []).append(_record(row))
        items = tuple(AdapterSummary(n, tuple(r.version for r in by_name[n]), by_name[n][-1]) for n in names)
        return Page(items=items, total=total, limit=limit, offset=offset)

    def delete(self, name: str, version: int | None = None) -> list[AdapterRecord]:
        """Soft-delete one version, or every live version of `name`; return what was deleted.
        AdapterNotFoundError if nothing live matched. The name stays claimed."""

        def work(session: Session) -> list[AdapterRecord]:
            query = _live().where(_VersionRow.name == name)
            if version is not None:
                query = query.where(_VersionRow.version == version)
            rows = list(session.scalars(query.order_by(_VersionRow.version)))
            if not rows:
                what = name if version is None else adapter_key(name, version)
                raise AdapterNotFoundError(f"adapter {what!r} not found")
            now = utc_now()
            for row in rows:
                row.deleted_at = now
            session.flush()
            return [_record(r) for r in rows]

        return self._db.write(work)

    # ---- aliases --------------------------------------------------------------------------------

    def set_alias(self, alias: str, name: str, version: int | None = None,
                  tenant: str | None = None) -> AliasRecord:
        """Point `alias` at `name@version` (the newest live version when None), creating or moving it,
        the alias's name claimed for `tenant` (None: an admin). NameConflictError if the name is not
        available to it; AdapterNotFoundError if the target is not live."""

        def work(session: Session) -> AliasRecord:
            self._names.claim(session, alias, "alias", tenant)
            if version is None:
                target = _latest_row(session, name, include_deleted=False)
                if target is None:
                    raise AdapterNotFoundError(f"adapter {name!r} not found")
            else:
                target = _live_version_row(session, name, version)
            now = utc_now()
            row = session.get(_AliasRow, alias)
            if row is None:
                row = _AliasRow(alias=alias, created_at=now)
                session.add(row)
            row.name, row.version, row.updated_at = target.name, target.version, now
            session.flush()
            return _alias_record(row)

        return self._db.write(work)

    def get_alias(self, alias: str) -> AliasRecord:
        with self._db.read() as session:
            return _alias_record(_alias_row(session, alias))

    def delete_alias(self, alias: str) -> AliasRecord:
        """Remove an alias (aliases are pointers: no history is kept) and free its name; return what it was."""

        def work(session: Session) -> AliasRecord:
            row = _alias_row(session, alias)
            session.delete(row)
            self._names.free(session, alias, "alias")
            return _alias_record(row)

        return self._db.write(work)

    def list_aliases(self) -> list[AliasRecord]:
        with self._db.read() as session:
            return [_alias_record(r) for r in session.scalars(select(_AliasRow).order_by(_AliasRow.alias))]

    # ---- resolution -----------------------------------------------------------------------------

    def resolve(self, model: str) -> AdapterRecord:
        """`alias` -> its pinned version; `name@version` -> that version; `name` -> the newest live one.
        InvalidNameError for a malformed string; AdapterNotFoundError when nothing live answers.
        Answered from memory until this process writes or for a second (replicas may write too)."""
        return self._resolved.get(model, lambda: self._resolve(model))

    def _resolve(self, model: str) -> AdapterRecord:
        ref = parse_model_ref(model)
        with self._db.read() as session:
            if ref.version is not None:
                return _record(_live_version_row(session, ref.name, ref.version))
            alias = session.get(_AliasRow, ref.name)
            if alias is not None:
                try:
                    return _record(_live_version_row(session, alias.name, alias.version))
                except AdapterNotFoundError:
                    target = adapter_key(alias.name, alias.version)
                    message = f"alias {ref.name!r} points to {target!r}, which was deleted"
                    raise AdapterNotFoundError(message) from None
            row = _latest_row(session, ref.name, include_deleted=False)
            if row is None:
                raise AdapterNotFoundError(f"adapter {ref.name!r} not found")
            return _record(row)


def _live():
    return select(_VersionRow).where(_VersionRow.deleted_at.is_(None))


def _latest_row(session: Session, name: str, include_deleted: bool) -> _VersionRow | None:
    query = select(_VersionRow) if include_deleted else _live()
    return session.scalar(query.where(_VersionRow.name == name).order_by(_VersionRow.version.desc()).limit(1))


def _live_version_row(session: Session, name: str, version: int) -> _VersionRow:
    row = session.scalar(select(_VersionRow).where(_VersionRow.name == name, _VersionRow.version == version))
    if row is None:
        raise AdapterNotFoundError(f"adapter {adapter_key(name, version)!r} not found")
    if row.deleted_at is not None:
        raise AdapterNotFoundError(f"adapter {adapter_key(name, version)!r} was deleted")
    return row


def _alias_row(session: Session, alias: str) -> _AliasRow:
    row = session.get(_AliasRow, alias)
    if row is None:
        raise AdapterNotFoundError(f"alias {alias!r} not found")
    return row


def _record(row: _VersionRow) -> AdapterRecord:
    values = {f.name: getattr(row, f.name) for f in fields(AdapterRecord)}
    values.update(target_modules=tuple(row.target_modules))
    return AdapterRecord(**values)


def _alias_record(row: _AliasRow) -> AliasRecord:
    return AliasRecord(row.alias, row.name, row.version, row.created_at, row.updated_at)
