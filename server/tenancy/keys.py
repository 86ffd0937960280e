"""Tenants and API keys: their tables in the one database (server/db).

A key is `lsk_` + 43 url-safe characters (256 random bits); only its sha256 is stored, with a public id
(`key_...`) that lists, audits and revokes it. A high-entropy secret needs no slow hash: nobody can
guess a preimage, and looking it up by its digest costs one index probe. Every authenticated request
asks for its key: the answers are kept in memory, dropped at once by this process's key writes (a
revoked key stops working at the next request) and after a second for other processes' writes.
"""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import String, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.db import Base, Database, UtcDateTime, utc_now
from server.read_cache import ReadCache
from server.registry.names import check_name
from server.tenancy.errors import KeyNotFoundError, TenantConflictError, TenantNotFoundError

Role = Literal["admin", "tenant"]
SECRET_PREFIX = "lsk_"


class _TenantRow(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class _KeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


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

    def __init__(self, db: Database):
        self._db = db
        self._principals: ReadCache[str, Principal | None] = db.read_cache(["api_keys"])  # by digest

    # ---- tenants --------------------------------------------------------------------------------

    def create_tenant(self, name: str) -> Tenant:
        check_name(name, "tenant name")

        def work(session: Session) -> Tenant:
            if session.get(_TenantRow, name) is not None:
                raise TenantConflictError(f"tenant {name!r} exists already")
            row = _TenantRow(name=name, created_at=utc_now())
            session.add(row)
            return Tenant(row.name, row.created_at)

        return self._db.write(work)

    def tenants(self) -> list[Tenant]:
        with self._db.read() as session:
            rows = session.scalars(select(_TenantRow).order_by(_TenantRow.name))
            return [Tenant(r.name, r.created_at) for r in rows]

    def tenant_exists(self, name: str) -> bool:
        with self._db.read() as session:
            return session.get(_TenantRow, name) is not None

    # ---- keys -----------------------------------------------------------------------------------

    def create_key(self, role: Role, tenant: str | None = None, label: str = "") -> tuple[KeyRecord, str]:
        """A new key and its secret (shown this once). A tenant key names an existing tenant; an admin
        key none."""
        if (role == "tenant") != (tenant is not None):
            raise ValueError("a tenant key names its tenant; an admin key names none")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)

        def work(session: Session) -> KeyRecord:
            if tenant is not None and session.get(_TenantRow, tenant) is None:
                raise TenantNotFoundError(f"tenant {tenant!r} not found")
            row = _KeyRow(id="key_" + secrets.token_hex(8), digest=digest(secret), role=role, tenant=tenant,
                          label=label, created_at=utc_now())
            session.add(row)
            return _key_record(row)

        return self._db.write(work), secret

    def keys(self) -> list[KeyRecord]:
        with self._db.read() as session:
            rows = session.scalars(select(_KeyRow).order_by(_KeyRow.created_at, _KeyRow.id))
            return [_key_record(r) for r in rows]

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key (at once, for every later request). Revoking twice keeps the first time."""

        def work(session: Session) -> KeyRecord:
            row = session.get(_KeyRow, key_id)
            if row is None:
                raise KeyNotFoundError(f"key {key_id!r} not found")
            row.revoked_at = row.revoked_at or utc_now()
            return _key_record(row)

        return self._db.write(work)

    def authenticate(self, secret: str) -> Principal | None:
        """The principal of a live key with this secret, or None. Answered from memory."""
        key = digest(secret)
        return self._principals.get(key, lambda: self._principal(key))

    def active_keys(self) -> int:
        with self._db.read() as session:
            return session.scalar(select(func.count()).select_from(_KeyRow).where(_KeyRow.revoked_at.is_(None)))

    def _principal(self, key_digest: str) -> Principal | None:
        with self._db.read() as session:
            row = session.scalar(select(_KeyRow).where(_KeyRow.digest == key_digest))
        if row is None or row.revoked_at is not None:
            return None
        return Principal(row.id, row.role, row.tenant)  # type: ignore[arg-type]


def _key_record(row: _KeyRow) -> KeyRecord:
    return KeyRecord(row.id, row.role, row.tenant, row.label,  # type: ignore[arg-type]
                     row.created_at, row.revoked_at)
