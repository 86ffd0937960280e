"""The adapter registry over HTTP: upload, list, inspect, delete, aliases, warm/cool, vLLM's endpoints."""

import asyncio

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from server.api.audit import audit
from server.api.auth import caller
from server.api.errors import ApiError
from server.api.state import AppState, app_state
from server.registry.records import AdapterRecord, AdapterSummary, AliasRecord
from server.registry.names import parse_model_ref
from server.registry.errors import UploadTooLargeError
from server.tenancy.errors import PermissionDeniedError, QuotaExceededError
from server.tenancy.keys import Principal

router = APIRouter(tags=["adapters"])
MAX_OFFSET = 2**31 - 1  # SQL integers: a larger offset would overflow the database's, not page further


class AliasBody(BaseModel):
    target: str = Field(description="name@version (or a name: its newest version now)")


class LoadLoraBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraBody(BaseModel):
    lora_name: str


def _residency(state: AppState, key: str) -> str:
    return state.engine.snapshot.residency(key) or state.registry.tier_of(key)


def _version_json(state: AppState, record: AdapterRecord) -> dict:
    return {
        "id": record.key,
        "name": record.name,
        "version": record.version,
        "description": record.description,
        "rank": record.rank,
        "alpha": record.alpha,
        "use_rslora": record.use_rslora,
        "use_dora": record.use_dora,
        "target_modules": record.target_modules,
        "trainable_parameters": record.trainable_params,
        "adapted_base_parameters": record.adapted_base_params,
        "trainable_ratio": record.trainable_params / record.adapted_base_params if record.adapted_base_params else None,
        "bytes": record.size_bytes,
        "sha256": record.weights_sha256,
        "source": record.source,
        "created": int(record.created_at.timestamp()),
        "resident": _residency(state, record.key),
        "merge": _merge_json(state, record.key),
        "parent": state.models.base_name,
    }


def _merge_json(state: AppState, key: str) -> dict:
    """Merged-copy state: pinned or not, the traffic share the policy sees, and its recent decisions."""
    snapshot = state.engine.snapshot
    return {
        "merged": key in snapshot.merged,
        "pinned": key in snapshot.pinned,
        "traffic_share": round(snapshot.traffic_shares.get(key, 0.0), 4),
        "events": [{"action": e.action, "reason": e.reason, "at": int(e.at)} for e in snapshot.events_of(key)],
    }


def _alias_json(alias: AliasRecord) -> dict:
    return {"alias": alias.alias, "target": alias.target, "updated": int(alias.updated_at.timestamp())}


def _summary_json(state: AppState, summary: AdapterSummary, ownership: dict) -> dict:
    return {**_version_json(state, summary.latest), "versions": list(summary.versions), **ownership}


def _ownership(state: AppState, who: Principal, name: str) -> dict:
    """`owner`: the owning tenant as far as the caller may know it (null: the admins', or, to a tenant, a
    public adapter of someone else: a tenant is never told whose a name is); `public`: shared with every
    tenant. Blocking (the namespace may read the database)."""
    entry = state.access.names.get(name)
    known = entry is not None and (who.is_admin or entry.tenant == who.tenant)
    return {"owner": entry.tenant if known else None, "public": bool(entry is not None and entry.public)}


async def _resolve_adapter(request: Request, state: AppState, ref: str):
    target = await state.models.resolve(ref, principal=caller(request))
    if target.adapter is None:
        raise ApiError(400, f"{ref!r} is the base model, not an adapter", param="ref", code="not_an_adapter")
    return target


@router.post("/v1/adapters", status_code=201)
async def upload_adapter(
    request: Request,
    name: str = Form(...),
    description: str = Form(""),
    adapter_config: UploadFile = File(..., alias="adapter_config.json"),
    adapter_model: UploadFile = File(..., alias="adapter_model.safetensors"),
) -> dict:
    """Validate a PEFT adapter fully against the base, store it, and make it a new version of `name`."""
    state, who = app_state(request), caller(request)
    room = await asyncio.to_thread(_quota_room, state, who, name)
    try:
        record = await asyncio.to_thread(
            state.registry.upload, name, description, adapter_config.file, adapter_model.file, max_bytes=room,
            tenant=who.tenant,
        )
    except UploadTooLargeError:
        if room is not None and room < state.registry.max_upload_bytes:
            raise QuotaExceededError(f"the upload would exceed your quota of "
                                     f"{int(state.settings.tenant_max_adapter_bytes)} stored bytes") from None
        raise
    await audit(request, "adapter.upload", record.key, bytes=record.size_bytes, sha256=record.weights_sha256)
    return _version_json(state, record)


def _quota_room(state: AppState, who: Principal, name: str) -> int | None:
    """Bytes a tenant may still store (None: no limit); QuotaExceededError if a new name would exceed
    its number of adapters or no byte is left."""
    settings = state.settings
    if who.is_admin:
        return None
    live = {n: state.registry.catalogue.versions(n) for n in state.access.owned_names(who)}
    live = {n: versions for n, versions in live.items() if versions}
    if settings.tenant_max_adapters and name not in live and len(live) >= settings.tenant_max_adapters:
        raise QuotaExceededError(f"you have {len(live)} adapters, the quota is {settings.tenant_max_adapters}")
    if not settings.tenant_max_adapter_bytes:
        return None
    room = int(settings.tenant_max_adapter_bytes) - sum(r.size_bytes for vs in live.values() for r in vs)
    if room <= 0:
        raise QuotaExceededError(f"your adapters fill your quota of {int(settings.tenant_max_adapter_bytes)} bytes")
    return room


@router.get("/v1/adapters")
async def list_adapters(request: Request, limit: int = Query(50, ge=1, le=500),
                        offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
    state = app_state(request)
    visible = await asyncio.to_thread(state.access.visible_names, caller(request))
    page = await asyncio.to_thread(state.registry.list, limit=limit, offset=offset, only=visible)
    who = caller(request)
    owners = await asyncio.to_thread(lambda: [_ownership(state, who, s.latest.name) for s in page.items])
    return {
        "object": "list",
        "data": [_summary_json(state, summary, owner) for summary, owner in zip(page.items, owners)],
        "total": page.total,
        "limit": limit,
        "offset": offset,
        "has_more": offset + len(page.items) < page.total,
    }


@router.get("/v1/adapters/{name}")
async def get_adapter(request: Request, name: str) -> dict:
    state = app_state(request)
    state.access.see_model(caller(request), name)
    versions = await asyncio.to_thread(state.registry.get, name)
    ownership = await asyncio.to_thread(_ownership, state, caller(request), name)
    newest = versions[-1]
    return {**_version_json(state, newest), "versions": [_version_json(state, v) for v in versions], **ownership}


@router.delete("/v1/adapters/{ref}")
async def delete_adapter(request: Request, ref: str) -> dict:
    """Delete `name` (every version) or `name@version`. Running requests on it finish first (drain)."""
    state = app_state(request)
    parsed = parse_model_ref(ref)
    state.access.change_model(caller(request), ref)
    deleted = await asyncio.to_thread(state.registry.delete, parsed.name, parsed.version)
    await audit(request, "adapter.delete", ref, deleted=[r.key for r in deleted])
    draining = [record.key for record in deleted if not await state.engine.retire(record.key)]
    return {"deleted": [r.key for r in deleted], "draining": draining}


@router.post("/v1/adapters/{ref}/warm")
async def warm_adapter(request: Request, ref: str) -> dict:
    """Load an adapter into host memory and a device slot now, so its first request pays nothing."""
    state = app_state(request)
    target = await _resolve_adapter(request, state, ref)
    if not await state.engine.warm(target.adapter):
        raise ApiError(503, "every device slot is in use by running requests", code="server_busy",
                       headers={"Retry-After": "1"})
    return {"id": target.label, "resident": _residency(state, target.label)}


@router.post("/v1/adapters/{ref}/cool")
async def cool_adapter(request: Request, ref: str) -> dict:
    """Release an adapter from its device slot and host memory (it stays on disk)."""
    state = app_state(request)
    state.access.change_model(caller(request), ref)
    record = state.registry.resolve(ref)
    await state.engine.cool(record.key)
    state.registry.cache.evict(record.key)
    return {"id": record.key, "resident": _residency(state, record.key)}


@router.post("/v1/adapters/{ref}/merge")
async def pin_merged(request: Request, ref: str) -> dict:
    """Pin a merged copy of this adapter (built in the background, kept whatever the traffic)."""
    state = app_state(request)
    state.access.change_model(caller(request), ref)
    target = await _resolve_adapter(request, state, ref)
    await state.engine.pin_merged(target.adapter)
    await audit(request, "adapter.merge_pin", target.label)
    return {"id": target.label, "merge": _merge_json(state, target.label)}


@router.delete("/v1/adapters/{ref}/merge")
async def unpin_merged(request: Request, ref: str) -> dict:
    """Unpin: the traffic policy decides again (the copy goes now unless the adapter is hot)."""
    state = app_state(request)
    state.access.change_model(caller(request), ref)
    record = state.registry.resolve(ref)
    await state.engine.unpin_merged(record.key)
    await audit(request, "adapter.merge_unpin", record.key)
    return {"id": record.key, "merge": _merge_json(state, record.key)}


@router.put("/v1/aliases/{alias}")
async def put_alias(request: Request, alias: str, body: AliasBody) -> dict:
    """Point an alias at an adapter version (rollout, rollback)."""
    state, who = app_state(request), caller(request)
    state.access.see_model(who, body.target)
    record = await asyncio.to_thread(state.registry.set_alias, alias, body.target, who.tenant)
    await audit(request, "alias.set", alias, to=record.target)
    return _alias_json(record)


@router.get("/v1/aliases")
async def list_aliases(request: Request) -> dict:
    state = app_state(request)
    owned = await asyncio.to_thread(state.access.owned_names, caller(request))
    aliases = await asyncio.to_thread(state.registry.list_aliases)
    aliases = [a for a in aliases if owned is None or a.alias in owned]
    return {"object": "list", "data": [_alias_json(a) for a in aliases]}


@router.delete("/v1/aliases/{alias}")
async def delete_alias(request: Request, alias: str) -> dict:
    state = app_state(request)
    state.access.see_alias(caller(request), alias)
    record = await asyncio.to_thread(state.registry.delete_alias, alias)
    await audit(request, "alias.delete", alias, was=record.target)
    return {"deleted": alias}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def vllm_load_lora_adapter(request: Request, body: LoadLoraBody) -> str:
    """vLLM-compatible: register a PEFT directory that lies inside the adapters directory."""
    state = app_state(request)
    if not caller(request).is_admin:
        raise PermissionDeniedError("loading from a server path is for admins; tenants upload with POST /v1/adapters")
    record = await asyncio.to_thread(state.registry.load_from_path, body.lora_name, body.lora_path)
    await audit(request, "adapter.load_path", record.key, path=body.lora_path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def vllm_unload_lora_adapter(request: Request, body: UnloadLoraBody) -> str:
    state = app_state(request)
    state.access.change_model(caller(request), body.lora_name)
    deleted = await asyncio.to_thread(state.registry.delete, body.lora_name, None)
    await audit(request, "adapter.delete", body.lora_name, deleted=[r.key for r in deleted])
    for record in deleted:
        await state.engine.retire(record.key)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
