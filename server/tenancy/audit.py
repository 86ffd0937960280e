"""The audit log: every change to adapters, aliases, experiments, tenants and keys, who made it and when.
Append-only rows in the one database (server/db)."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import JSON, String, func, select
from sqlalchemy.orm import Mapped, mapped_column

from server.db import Base, Database, UtcDateTime, utc_now


class _EventRow(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))  # e.g. adapter.upload, alias.set, key.revoke
    target: Mapped[str] = mapped_column(String(160))
    detail: Mapped[dict] = mapped_column(JSON)


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: datetime
    key_id: str
    tenant: str | None
    action: str
    target: str
    detail: dict


class AuditLog:
    def __init__(self, db: Database):
        self._db = db

    def record(self, key_id: str, tenant: str | None, action: str, target: str, detail: dict) -> None:
        self._db.write(lambda session: session.add(_EventRow(
            at=utc_now(), key_id=key_id, tenant=tenant, action=action, target=target, detail=detail)))

    def events(self, limit: int = 100, offset: int = 0, tenant: str | None = None) -> tuple[list[AuditEvent], int]:
        """Newest first, one page, and how many there are in all."""
        query = select(_EventRow)
        if tenant is not None:
            query = query.where(_EventRow.tenant == tenant)
        with self._db.read() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery()))
            rows = session.scalars(query.order_by(_EventRow.id.desc()).limit(limit).offset(offset))
            return [_event(r) for r in rows], total


def _event(row: _EventRow) -> AuditEvent:
    return AuditEvent(row.id, row.at, row.key_id, row.tenant, row.action, row.target, dict(row.detail))
