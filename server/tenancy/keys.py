"""Tenants and API keys in SQL (their own tables on the catalogue's engine).

A key is `lsk_` + 43 url-safe characters (256 random bits); only its sha256 is stored, with a public id
(`key_...`) that lists, audits and revokes it. A high-entropy secret needs no slow hash: nobody can
guess a preimage, and looking it up by its digest costs one index probe.
"""

import hashlib
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import DateTime, Engine, String, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from server.registry.names import check_name
from server.tenancy.errors import KeyNotFoundError, TenantConflictError, TenantNotFoundError

Role = Literal["admin", "tenant"]
SECRET_PREFIX = "lsk_"


class _Base(DeclarativeBase):
    pass


class _TenantRow(_Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _KeyRow(_Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's id, its role, and its tenant (None for an admin)."""

    key_id: str
    role: Role
    tenant: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class KeyRecord:
    """An API key as listed: never its secret."""

    id: str
    role: Role
    tenant: str | None
    label: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Tenant:
    name: str
    created_at: datetime


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """Tenants and keys. Thread-safe; every method is one transaction and returns frozen records."""

    def __init__(self, engine: Engine):
        _Base.metadata.create_all(engine)
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_lock = threading.Lock()  # SQLite refuses concurrent writers instead of queueing them

    # ---- tenants --------------------------------------------------------------------------------

    def create_tenant(self, name: str) -> Tenant:
        check_name(name, "tenant name")
        try:
            with self._write_lock, self._sessions.begin() as session:
                row = _TenantRow(name=name, created_at=_now())
                session.add(row)
                session.flush()
                return Tenant(row.name, _utc(row.created_at))
        except IntegrityError:
            raise TenantConflictError(f"tenant {name!r} exists already") from None

    def tenants(self) -> list[Tenant]:
        with self._sessions() as session:
            rows = session.scalars(select(_TenantRow).order_by(_TenantRow.name))
            return [Tenant(r.name, _utc(r.created_at)) for r in rows]

    def tenant_exists(self, name: str) -> bool:
        with self._sessions() as session:
            return session.get(_TenantRow, name) is not None

    # ---- keys -----------------------------------------------------------------------------------

    def create_key(self, role: Role, tenant: str | None = None, label: str = "") -> tuple[KeyRecord, str]:
        """A new key and its secret (shown this once). A tenant key names an existing tenant; an admin
        key none."""
        if (role == "tenant") != (tenant is not None):
            raise ValueError("a tenant key names its tenant; an admin key names none")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        with self._write_lock, self._sessions.begin() as session:
            if tenant is not None and session.get(_TenantRow, tenant) is None:
                raise TenantNotFoundError(f"tenant {tenant!r} not found")
            row = _KeyRow(id="key_" + secrets.token_hex(8), digest=digest(secret), role=role, tenant=tenant,
                          label=label, created_at=_now())
            session.add(row)
            session.flush()
            return _key_record(row), secret

    def keys(self) -> list[KeyRecord]:
        with self._sessions() as session:
            return [_key_record(r) for r in session.scalars(select(_KeyRow).order_by(_KeyRow.created_at, _KeyRow.id))]

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key (at once, for every later request). Revoking twice keeps the first time."""
        with self._write_lock, self._sessions.begin() as session:
            row = session.get(_KeyRow, key_id)
            if row is None:
                raise KeyNotFoundError(f"key {key_id!r} not found")
            row.revoked_at = row.revoked_at or _now()
            session.flush()
            return _key_record(row)

    def authenticate(self, secret: str) -> Principal | None:
        """The principal of a live key with this secret, or None."""
        with self._sessions() as session:
            row = session.scalar(select(_KeyRow).where(_KeyRow.digest == digest(secret)))
        if row is None or row.revoked_at is not None:
            return None
        return Principal(row.id, row.role, row.tenant)  # type: ignore[arg-type]

    def active_keys(self) -> int:
        with self._sessions() as session:
            return session.scalar(select(func.count()).select_from(_KeyRow).where(_KeyRow.revoked_at.is_(None)))


def _key_record(row: _KeyRow) -> KeyRecord:
    return KeyRecord(row.id, row.role, row.tenant, row.label,  # type: ignore[arg-type]
                     _utc(row.created_at), _utc(row.revoked_at))


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment
