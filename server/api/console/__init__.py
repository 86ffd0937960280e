"""The web console at /ui: adapters, a side-by-side playground, live A/B results, the engine at a glance.

**Stack, and why.** The pages are server-rendered Jinja2 shells (layout, navigation, forms, empty tables)
filled by a few hundred lines of plain JavaScript that call the public HTTP API (`/v1/...`) with the key
the user pasted, kept in the browser's sessionStorage and sent as `Authorization: Bearer`. Charts are
drawn by uPlot (MIT, 51 KB minified, pinned and vendored under `static/vendor/` with its licence).

- **The console is only a client of the API.** What a key may see and do is decided in one place
  (`server/api/access.py`) and the listings already filter by it; a console that renders data on the
  server would have to apply those rules a second time. Calling the API makes "a tenant's console shows
  exactly what its key may see" true by construction, and every console action is an API call a user
  could make with curl.
- **No htmx.** htmx swaps HTML fragments the server renders; our API answers JSON and authenticates
  with a header the browser holds, so htmx would need a parallel HTML API (the second description the
  house style warns against) or its JSON templating extensions. `fetch` and a small DOM helper do the
  same in less code, and `fetch` + `ReadableStream` is what streaming SSE through POST needs anyway
  (`EventSource` cannot POST or send a header).
- **uPlot over Chart.js**: a quarter of the size, canvas-based, made for series refreshed every few
  seconds; the confidence-interval whiskers are a ten-line draw hook.
- **No build chain**: the JavaScript is written as the browser runs it, so the package ships exactly
  the files in `static/` (package data in pyproject.toml) and works offline.

The pages carry no data and need no key; only the `/v1` calls they make do. The one endpoint added for
the console, `GET /v1/server/state` (server/api/routes_ops.py), reads only the engine's snapshot.
"""

from server.api.console.routes import router

__all__ = ["router"]
