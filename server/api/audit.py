"""Recording a change in the audit log under the calling key."""

from fastapi import Request

from server.api.auth import caller


def audit(request: Request, action: str, subject: str, **detail) -> None:
    """Record that the caller did `action` to `subject` (a name, `name@version`, a key id)."""
    who = caller(request)
    request.app.state.loraserve.audit.record(who.key_id, who.tenant, action, subject, detail)
