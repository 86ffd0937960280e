"""Recording a change in the audit log under the calling key."""

import asyncio

from fastapi import Request

from server.api.auth import caller


async def audit(request: Request, action: str, subject: str, **detail) -> None:
    """Record that the caller did `action` to `subject` (a name, `name@version`, a key id), on a worker
    thread (a database write never runs on the event loop)."""
    who = caller(request)
    log = request.app.state.loraserve.audit
    await asyncio.to_thread(log.record, who.key_id, who.tenant, action, subject, detail)
