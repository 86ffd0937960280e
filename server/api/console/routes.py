"""The console's pages and static files. Pages are shells: the data comes from the /v1 API, called by
the browser with the user's key (see the package docstring)."""

import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from server import __version__
from server.api.errors import ApiError

HERE = Path(__file__).parent
STATIC = HERE / "static"
PAGES = {"adapters": "Adapters", "playground": "Playground", "experiments": "Experiments", "server": "Server",
         "keys": "Keys"}
ADMIN_PAGES = {"keys"}  # linked in the navigation for admins only (the page itself tells a tenant who manages keys)
# Every file the console serves, fixed at import: a request names one of these or gets a 404, so no
# path from a URL ever reaches the file system.
FILES = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".md": "text/markdown"}
# A page holding an API key talks to this server only: scripts, styles, images and fetches from this
# origin (the browser refuses anything else), and no other site may frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
async def console_home() -> RedirectResponse:
    return RedirectResponse("/ui/adapters", status_code=307)


@router.get("/ui/static/{path:path}")
async def static_file(path: str) -> FileResponse:
    file = FILES.get(path)
    if file is None:
        raise ApiError(404, f"no console file {path!r}", code="not_found")
    media_type = _TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return FileResponse(file, media_type=media_type,
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


@router.get("/ui/{page}", response_class=HTMLResponse)
async def console_page(request: Request, page: str) -> HTMLResponse:
    if page not in PAGES:
        raise ApiError(404, f"no console page {page!r}", code="not_found")
    state = getattr(request.app.state, "loraserve", None)
    context = {
        "page": page,
        "pages": PAGES,
        "admin_pages": ADMIN_PAGES,
        "version": __version__,
        "auth": "starting" if state is None else ("on" if state.auth.enabled else "off"),
        "base_name": state.models.base_name if state is not None else "",
    }
    return templates.TemplateResponse(request, f"{page}.html", context, headers=PAGE_HEADERS)
