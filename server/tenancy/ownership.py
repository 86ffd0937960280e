"""Who owns each name of the one global namespace of `model` strings (adapters, aliases, experiments).

A row says which tenant owns a name and whether an admin made it public. A name without a row belongs
to the admins (hand-placed and CLI adapters, and whatever an admin created): tenants see it only once
an admin marks it public. A row outlives the deletion of what it named, so a tenant's deleted adapter
name stays that tenant's (it can upload it again; nobody else can take it).
"""

import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import DateTime, Engine, String, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class _Base(DeclarativeBase):
    pass


class _OwnerRow(_Base):
    __tablename__ = "name_owners"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    public: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Owner:
    name: str
    tenant: str | None  # None: the admins'
    public: bool


class OwnershipStore:
    def __init__(self, engine: Engine):
        _Base.metadata.create_all(engine)
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_lock = threading.Lock()

    def owner(self, name: str) -> Owner | None:
        with self._sessions() as session:
            row = session.get(_OwnerRow, name)
            return Owner(row.name, row.tenant, row.public) if row is not None else None

    def claim(self, name: str, tenant: str) -> bool:
        """Record `tenant` as the owner of an unowned name; True if this call did, False if it already
        was the owner. Whoever else owns it, the answer is False too: the caller checks `owner` first."""
        try:
            with self._write_lock, self._sessions.begin() as session:
                session.add(_OwnerRow(name=name, tenant=tenant, public=False, created_at=_now()))
            return True
        except IntegrityError:
            return False

    def release(self, name: str, tenant: str) -> None:
        """Undo a claim whose creation failed (nothing of it was stored)."""
        with self._write_lock, self._sessions.begin() as session:
            row = session.get(_OwnerRow, name)
            if row is not None and row.tenant == tenant:
                session.delete(row)

    def set_public(self, name: str, public: bool) -> Owner:
        with self._write_lock, self._sessions.begin() as session:
            row = session.get(_OwnerRow, name)
            if row is None:
                row = _OwnerRow(name=name, tenant=None, created_at=_now())
                session.add(row)
            row.public = public
            session.flush()
            return Owner(row.name, row.tenant, row.public)

    def visible_names(self, tenant: str) -> set[str]:
        """Names the tenant owns or that are public."""
        query = select(_OwnerRow.name).where(or_(_OwnerRow.tenant == tenant, _OwnerRow.public.is_(True)))
        with self._sessions() as session:
            return set(session.scalars(query))

    def owned_names(self, tenant: str) -> set[str]:
        with self._sessions() as session:
            return set(session.scalars(select(_OwnerRow.name).where(_OwnerRow.tenant == tenant)))


def _now() -> datetime:
    return datetime.now(UTC)
