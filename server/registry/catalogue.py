"""Adapter metadata in SQL through SQLAlchemy 2.0: versions, soft deletes, aliases, `model` resolution.

Rules the catalogue keeps:
- A version is immutable. A new one gets max(version of that name, deleted ones included) + 1, so a
  number is never reused, even after every version of the name was deleted.
- Deleting is soft: the row stays (history, audit) with `deleted_at` set, and stops resolving.
- Adapter names and aliases share one namespace: an alias may not take a name that has ever had a
  version (deleted ones included: the name can come back), and an adapter name may not take an alias.
- An alias is pinned to one version. If that version is deleted the alias stays and fails to resolve,
  saying so, until it is pointed elsewhere.
Any SQLAlchemy URL works (SQLite for one server, PostgreSQL when replicas share a catalogue).
"""

import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from datetime import UTC, datetime

from sqlalchemy import JSON, Engine, BigInteger, DateTime, String, Text, UniqueConstraint, create_engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from server.read_cache import ReadCache
from server.registry.errors import AdapterNotFoundError, NameConflictError
from server.registry.names import adapter_key, check_name, parse_model_ref
from server.registry.records import AdapterMetadata, AdapterRecord, AdapterSummary, AliasRecord, Page

# Two replicas may pick the same next version at once; the unique constraint refuses one, which retries.
_VERSION_RETRIES = 5


class _Base(DeclarativeBase):
    pass


class _VersionRow(_Base):
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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class _AliasRow(_Base):
    __tablename__ = "aliases"

    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Catalogue:
    """The metadata store. Thread-safe; every method is one transaction and returns frozen records."""

    def __init__(self, url: str):
        self._engine = create_engine(url)
        _Base.metadata.create_all(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        # SQLite refuses a second concurrent writer instead of queueing it: serialise this process's writes.
        self._write_lock = threading.Lock()
        self._resolved: ReadCache[str, AdapterRecord] = ReadCache()

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """One write transaction; the remembered resolutions are dropped once it has committed."""
        with self._resolved.invalidated_after(), self._write_lock, self._sessions.begin() as session:
            yield session

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for other stores that keep their tables in the same database."""
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    # ---- versions -------------------------------------------------------------------------------

    def add_version(self, name: str, metadata: AdapterMetadata) -> AdapterRecord:
        """Store `metadata` as the next version of `name`; NameConflictError if an alias has that name."""
        check_name(name)
        attempts = 0
        while True:
            try:
                with self._writing() as session:
                    _refuse_alias(session, name)
                    newest = select(func.max(_VersionRow.version)).where(_VersionRow.name == name)
                    last = session.scalar(newest)
                    values = asdict(metadata) | {"target_modules": list(metadata.target_modules)}
                    row = _VersionRow(name=name, version=(last or 0) + 1, created_at=_now(), **values)
                    session.add(row)
                    session.flush()
                    return _record(row)
            except IntegrityError:
                attempts += 1
                if attempts == _VERSION_RETRIES:
                    raise

    def check_adapter_name(self, name: str) -> None:
        """Raise InvalidNameError or NameConflictError (an alias has it) unless `name` can take a version."""
        check_name(name)
        with self._sessions() as session:
            _refuse_alias(session, name)

    def latest(self, name: str, *, include_deleted: bool = False) -> AdapterRecord | None:
        """The newest version of `name` (the newest live one unless `include_deleted`), or None."""
        with self._sessions() as session:
            row = _latest_row(session, name, include_deleted)
            return _record(row) if row is not None else None

    def get_version(self, name: str, version: int) -> AdapterRecord:
        """One live version; AdapterNotFoundError if it never existed or was deleted."""
        with self._sessions() as session:
            return _record(_live_version_row(session, name, version))

    def versions(self, name: str) -> list[AdapterRecord]:
        """The live versions of `name`, oldest first (empty if none)."""
        with self._sessions() as session:
            rows = session.scalars(_live().where(_VersionRow.name == name).order_by(_VersionRow.version))
            return [_record(r) for r in rows]

    def list_adapters(self, limit: int = 50, offset: int = 0, only: Collection[str] | None = None) -> Page:
        """Names with at least one live version (among `only`, if given), ordered by name, `limit` of
        them from `offset`."""
        live_names = select(_VersionRow.name).where(_VersionRow.deleted_at.is_(None)).distinct()
        if only is not None:
            live_names = live_names.where(_VersionRow.name.in_(list(only)))
        with self._sessions() as session:
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
        AdapterNotFoundError if nothing live matched."""
        with self._writing() as session:
            query = _live().where(_VersionRow.name == name)
            if version is not None:
                query = query.where(_VersionRow.version == version)
            rows = list(session.scalars(query.order_by(_VersionRow.version)))
            if not rows:
                what = name if version is None else adapter_key(name, version)
                raise AdapterNotFoundError(f"adapter {what!r} not found")
            now = _now()
            for row in rows:
                row.deleted_at = now
            session.flush()
            return [_record(r) for r in rows]

    # ---- aliases --------------------------------------------------------------------------------

    def set_alias(self, alias: str, name: str, version: int | None = None) -> AliasRecord:
        """Point `alias` at `name@version` (the newest live version when None), creating or moving it.
        NameConflictError if `alias` is an adapter name; AdapterNotFoundError if the target is not live."""
        check_name(alias, "alias")
        with self._writing() as session:
            if session.scalar(select(_VersionRow.id).where(_VersionRow.name == alias).limit(1)) is not None:
                raise NameConflictError(f"{alias!r} is an adapter name; an alias may not shadow it")
            if version is None:
                target = _latest_row(session, name, include_deleted=False)
                if target is None:
                    raise AdapterNotFoundError(f"adapter {name!r} not found")
            else:
                target = _live_version_row(session, name, version)
            now = _now()
            row = session.get(_AliasRow, alias)
            if row is None:
                row = _AliasRow(alias=alias, created_at=now)
                session.add(row)
            row.name, row.version, row.updated_at = target.name, target.version, now
            session.flush()
            return _alias_record(row)

    def get_alias(self, alias: str) -> AliasRecord:
        with self._sessions() as session:
            return _alias_record(_alias_row(session, alias))

    def delete_alias(self, alias: str) -> AliasRecord:
        """Remove an alias (aliases are pointers: no history is kept); return what it was."""
        with self._writing() as session:
            row = _alias_row(session, alias)
            record = _alias_record(row)
            session.delete(row)
            return record

    def list_aliases(self) -> list[AliasRecord]:
        with self._sessions() as session:
            return [_alias_record(r) for r in session.scalars(select(_AliasRow).order_by(_AliasRow.alias))]

    # ---- resolution -----------------------------------------------------------------------------

    def resolve(self, model: str) -> AdapterRecord:
        """`alias` -> its pinned version; `name@version` -> that version; `name` -> the newest live one.
        InvalidNameError for a malformed string; AdapterNotFoundError when nothing live answers.
        Answered from memory until this process writes or for a second (replicas may write too)."""
        return self._resolved.get(model, lambda: self._resolve(model))

    def _resolve(self, model: str) -> AdapterRecord:
        ref = parse_model_ref(model)
        with self._sessions() as session:
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


def _refuse_alias(session: Session, name: str) -> None:
    if session.get(_AliasRow, name) is not None:
        raise NameConflictError(f"{name!r} is an alias; an adapter name may not shadow it")


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
    values.update(target_modules=tuple(row.target_modules), created_at=_utc(row.created_at),
                  deleted_at=_utc(row.deleted_at))
    return AdapterRecord(**values)


def _alias_record(row: _AliasRow) -> AliasRecord:
    return AliasRecord(row.alias, row.name, row.version, _utc(row.created_at), _utc(row.updated_at))


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime | None) -> datetime | None:
    # SQLite keeps no time zone: every stored moment is UTC, so put the zone back on the way out.
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment
