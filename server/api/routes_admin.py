"""Admin endpoints: tenants, API keys, public adapters, the audit log. Mounted behind `require_admin`."""

import asyncio
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, model_validator

from server.api.audit import audit
from server.api.state import app_state
from server.registry.errors import AdapterNotFoundError
from server.tenancy.audit import AuditEvent
from server.tenancy.keys import KeyRecord

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class TenantBody(BaseModel):
    name: str = Field(min_length=1, max_length=64)


class KeyBody(BaseModel):
    role: Literal["admin", "tenant"] = "tenant"
    tenant: str | None = Field(None, max_length=64, description="required for a tenant key")
    label: str = Field("", max_length=128)

    @model_validator(mode="after")
    def _tenant_matches_role(self):
        if (self.role == "tenant") != (self.tenant is not None):
            raise ValueError("a tenant key names its tenant; an admin key names none")
        return self


class PublicBody(BaseModel):
    public: bool


def _timestamp(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def _key_json(key: KeyRecord) -> dict:
    return {"id": key.id, "role": key.role, "tenant": key.tenant, "label": key.label,
            "created": _timestamp(key.created_at), "revoked": _timestamp(key.revoked_at)}


def _event_json(event: AuditEvent) -> dict:
    return {"id": event.id, "at": event.at.isoformat(), "key_id": event.key_id, "tenant": event.tenant,
            "action": event.action, "target": event.target, "detail": event.detail}


@router.post("/tenants", status_code=201)
async def create_tenant(request: Request, body: TenantBody) -> dict:
    tenant = await asyncio.to_thread(app_state(request).keys.create_tenant, body.name)
    await audit(request, "tenant.create", tenant.name)
    return {"name": tenant.name, "created": _timestamp(tenant.created_at)}


@router.get("/tenants")
async def list_tenants(request: Request) -> dict:
    tenants = await asyncio.to_thread(app_state(request).keys.tenants)
    return {"object": "list", "data": [{"name": t.name, "created": _timestamp(t.created_at)} for t in tenants]}


@router.post("/keys", status_code=201)
async def create_key(request: Request, body: KeyBody) -> dict:
    """A new key; its secret is in this answer only."""
    key, secret = await asyncio.to_thread(app_state(request).keys.create_key, body.role, body.tenant, body.label)
    await audit(request, "key.create", key.id, role=key.role, tenant=key.tenant)
    return {**_key_json(key), "key": secret}


@router.get("/keys")
async def list_keys(request: Request) -> dict:
    keys = await asyncio.to_thread(app_state(request).keys.keys)
    return {"object": "list", "data": [_key_json(k) for k in keys]}


@router.delete("/keys/{key_id}")
async def revoke_key(request: Request, key_id: str) -> dict:
    key = await asyncio.to_thread(app_state(request).keys.revoke, key_id)
    await audit(request, "key.revoke", key.id)
    return _key_json(key)


@router.put("/adapters/{name}/public")
async def set_public(request: Request, name: str, body: PublicBody) -> dict:
    """Make an adapter visible (and usable, not changeable) to every tenant, or private again."""
    state = app_state(request)
    if not await asyncio.to_thread(state.registry.catalogue.versions, name):
        raise AdapterNotFoundError(f"adapter {name!r} not found")
    entry = await asyncio.to_thread(state.access.names.set_public, name, body.public)
    await audit(request, "adapter.public", name, public=body.public)
    return {"name": entry.name, "owner": entry.tenant, "public": entry.public}


@router.get("/audit")
async def audit_log(request: Request, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**31 - 1),
                    tenant: str | None = None) -> dict:
    events, total = await asyncio.to_thread(app_state(request).audit.events, limit, offset, tenant)
    return {"object": "list", "data": [_event_json(e) for e in events], "total": total,
            "has_more": offset + len(events) < total}
