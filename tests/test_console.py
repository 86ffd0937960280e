"""The web console (/ui) in a real headless Chromium, driven by Playwright, against a real server on
loopback serving the demo (demo/base and a copy of adapters/), with auth on and two tenants.

Each test checks what a person sees: signing in, an upload by the form and a refused one with its
reasons, two adapters streamed side by side, an experiment whose results update as traffic arrives and
whose winner is promoted, and a tenant's console showing nothing of another tenant. Every request the
pages make goes to the server under test (nothing from the network) and no page raises a script error.

The browser is Debian's Chromium (`/usr/bin/chromium`, or LORASERVE_CHROMIUM): Playwright cannot
download its own here. Without it, or without playwright, the browser tests skip, except in CI
(CI=true), where .ci/run installs it and a missing browser fails; the last four tests need no browser. Screenshots go to LORASERVE_SCREENSHOTS when set
(`LORASERVE_SCREENSHOTS=docs/screenshots` refreshes the ones the README shows), else to a temporary
folder, so a test run leaves the work tree as it was.
"""

import base64
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from tests.server_harness import RunningServer

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("LORASERVE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ADMIN_KEY = "console-admin-secret"
UPPER = REPO / "adapters" / "upper"
REVERSE = REPO / "adapters" / "reverse"
FILES = ("adapter_config.json", "adapter_model.safetensors")
WAIT_MS = 15_000


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None, "playwright is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return None, f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return sync_playwright, None


@pytest.fixture(scope="module")
def browser():
    sync_playwright, missing = _playwright()
    if missing and os.environ.get("CI") == "true":  # .ci/run installs them: a skip there would hide a failure
        pytest.fail(missing + " (.ci/run should have installed it)")
    if missing:
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LORASERVE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _demo_store(root: Path) -> Path:
    store = root / "adapters"
    shutil.copytree(REPO / "adapters", store, ignore=shutil.ignore_patterns(".*"))
    return store


def _settings(store: Path, **overrides) -> Settings:
    return Settings(model=REPO / "demo" / "base", adapters_dir=store, dtype="float32", device="cpu",
                    kv_cache_memory=32 * 1024**2, cpu_kernel=False, served_model_name="base", **overrides)


class Api:
    """The HTTP API with one key: what the tests do behind the browser's back."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key

    def __call__(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {self.key}"},
                                 timeout=60, **kwargs)
        assert response.status_code < 400, response.text
        return response

    def upload(self, name: str, directory: Path) -> None:
        self("POST", "/v1/adapters", data={"name": name},
             files={f: (f, (directory / f).read_bytes()) for f in FILES})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server with auth on; tenants acme and globex, each with a key and an adapter; globex also has
    a running experiment and has sent traffic, so its adapter sits in a device slot."""
    store = _demo_store(tmp_path_factory.mktemp("console"))
    with RunningServer(_settings(store, admin_key=ADMIN_KEY)) as server:
        admin = Api(server.url, ADMIN_KEY)
        keys = {}
        for tenant in ("acme", "globex"):
            admin("POST", "/v1/admin/tenants", json={"name": tenant})
            keys[tenant] = admin("POST", "/v1/admin/keys", json={"role": "tenant", "tenant": tenant,
                                                                  "label": "console"}).json()["key"]
        acme, globex = Api(server.url, keys["acme"]), Api(server.url, keys["globex"])
        acme.upload("acme-loud", UPPER)
        globex.upload("globex-backwards", REVERSE)
        globex("POST", "/v1/experiments", json={"name": "globex-trial", "status": "running", "variants": [
            {"name": "A", "adapter": "globex-backwards"}, {"name": "B", "adapter": "base"}]})
        globex("POST", "/v1/completions", json={"model": "globex-backwards", "prompt": "hi\n", "max_tokens": 4})
        yield {"server": server, "admin": admin, "keys": keys}


class Console:
    """One browser tab on the console, recording every request it makes and every script error."""

    def __init__(self, browser, url: str):
        self.url = url
        self.context = browser.new_context(viewport={"width": 1280, "height": 860})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: self.errors.append(message.text)
                     if "Content Security Policy" in message.text else None)

    def open(self, page: str):
        self.page.goto(f"{self.url}/ui/{page}")
        return self.page

    def sign_in(self, key: str, page: str = "adapters"):
        self.open(page)
        self.page.fill("#api-key", key)
        self.page.click("#sign-in-form button")
        self.page.wait_for_selector("#main", state="visible")
        return self.page

    def close(self) -> None:
        self.context.close()
        outside = [u for u in self.requests if not (u.startswith(self.url + "/") or u.startswith("data:"))]
        assert not outside, f"requests outside the server: {outside}"
        assert not self.errors, f"script errors: {self.errors}"


@pytest.fixture
def console(browser, world):
    tabs = []

    def open_console() -> Console:
        tabs.append(Console(browser, world["server"].url))
        return tabs[-1]

    yield open_console
    for tab in tabs:
        tab.close()


def test_sign_in_keeps_the_key_in_the_tab_and_refuses_a_bad_one(console, world, screenshots):
    tab = console()
    page = tab.page
    page.goto(tab.url + "/")
    assert page.url == tab.url + "/ui/adapters"
    assert page.is_visible("#sign-in") and not page.is_visible("#main")
    page.fill("#api-key", "lsk_not-a-key")
    page.click("#sign-in-form button")
    page.wait_for_selector("#sign-in-error:not([hidden])")
    assert "refused" in page.text_content("#sign-in-error") and not page.is_visible("#main")

    tab.sign_in(ADMIN_KEY)
    assert page.text_content("#who-name") == "admin"
    for name in ("reverse", "upper", "rot13"):
        page.wait_for_selector(f'tr[data-adapter="{name}"]')
    assert page.evaluate("sessionStorage.getItem('loraserve.key')") == ADMIN_KEY
    assert page.evaluate("localStorage.length") == 0 and not tab.context.cookies()
    page.reload()  # the tab keeps its key
    page.wait_for_selector('tr[data-adapter="upper"]')
    row = page.text_content('tr[data-adapter="upper"]')
    assert "16 / 32" in row and "q_proj" in row and "KiB" in row
    page.screenshot(path=screenshots / "console-adapters.png")

    page.click("#sign-out")
    page.wait_for_selector("#sign-in", state="visible")
    assert page.evaluate("sessionStorage.getItem('loraserve.key')") is None


def test_with_auth_off_a_banner_says_so(browser, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with RunningServer(_settings(_demo_store(tmp_path), auth="off")) as server:
        assert any(f"console: {server.url}/ui" in r.getMessage() for r in caplog.records)  # the start-up line
        tab = Console(browser, server.url)
        page = tab.open("adapters")
        page.wait_for_selector("#main", state="visible")  # no key asked for
        assert "Auth is off" in page.text_content("#auth-off")
        assert "auth off" in page.text_content("#who-name")
        page.wait_for_selector('tr[data-adapter="rot13"]')
        tab.close()


def test_upload_by_the_form_then_warm_pin_and_delete(console, world):
    page = console().sign_in(ADMIN_KEY)
    page.on("dialog", lambda dialog: dialog.accept())
    page.fill("#upload-name", "shout")
    page.fill("#upload-description", "upper-cases the copy")
    page.set_input_files("#file-config", UPPER / FILES[0])
    page.set_input_files("#file-weights", UPPER / FILES[1])
    page.click("#upload-submit")
    page.wait_for_selector('tr[data-adapter="shout"]')
    assert "uploaded shout@1" in page.text_content("#upload-status")
    assert "upper-cases the copy" in page.text_content('tr[data-adapter="shout"]')
    assert page.is_hidden("#upload-errors")
    assert world["admin"]("GET", "/v1/adapters/shout").json()["id"] == "shout@1"

    row = 'tr[data-adapter="shout"]'
    page.click(f"{row} button:has-text('warm')")
    page.wait_for_selector(f"{row} .tier-device, {row} .tier-merged")
    page.click(f"{row} button:has-text('pin merged')")
    page.wait_for_selector(f"{row} .pill:text-is('pinned')")
    assert world["admin"]("GET", "/v1/adapters/shout").json()["merge"]["pinned"]
    page.click(f"{row} button:has-text('delete')")  # confirmed by the dialog handler
    page.wait_for_selector(row, state="detached")
    assert httpx.get(world["server"].url + "/v1/adapters/shout",
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 404


def test_a_refused_upload_shows_every_reason_in_place(console, world):
    """Dropped files (a drag-and-drop), whose config claims rank 8 for rank-16 weights: 422 lists each
    module's problem, and nothing is stored."""
    page = console().sign_in(ADMIN_KEY)
    config = json.loads((UPPER / FILES[0]).read_text())
    config["r"] = 8
    weights = base64.b64encode((UPPER / FILES[1]).read_bytes()).decode()
    transfer = page.evaluate_handle("""([config, weights]) => {
        const transfer = new DataTransfer();
        const bytes = Uint8Array.from(atob(weights), (c) => c.charCodeAt(0));
        transfer.items.add(new File([config], "adapter_config.json", {type: "application/json"}));
        transfer.items.add(new File([bytes], "adapter_model.safetensors"));
        return transfer;
    }""", [json.dumps(config), weights])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    assert "adapter_config.json" in page.text_content("#drop-files")
    page.fill("#upload-name", "wrong-rank")
    page.click("#upload-submit")
    page.wait_for_selector("#upload-errors:not([hidden])")
    assert "Refused (422)" in page.text_content("#upload-error-title")
    problems = page.locator("#upload-problems li").all_text_contents()
    assert len(problems) >= 2 and all("proj" in p for p in problems), problems
    assert page.locator('tr[data-adapter="wrong-rank"]').count() == 0
    names = [a["name"] for a in world["admin"]("GET", "/v1/adapters").json()["data"]]
    assert "wrong-rank" not in names


def test_the_playground_streams_two_adapters_side_by_side(console, screenshots):
    page = console().sign_in(ADMIN_KEY, "playground")
    page.wait_for_selector('#model-0 option[value="reverse"]', state="attached")
    page.fill("#prompt", "hello world\n")
    page.select_option("#model-0", "reverse")
    page.select_option("#model-1", "upper")
    page.select_option("#model-2", "base")
    page.fill("#max-tokens", "20")
    page.click("#run")
    page.wait_for_selector('.answer[data-model="upper"][data-done="true"]')
    page.wait_for_selector('.answer[data-model="reverse"][data-done="true"]')
    page.wait_for_selector('.answer[data-model="base"][data-done="true"]')
    text = {m: page.text_content(f'.answer[data-model="{m}"] .answer-text') for m in ("reverse", "upper", "base")}
    assert text == {"reverse": "dlrow olleh", "upper": "HELLO WORLD", "base": "hello world"}
    for model in text:
        panel = f'.answer[data-model="{model}"]'
        assert int(page.get_attribute(panel, "data-chunks")) > 1  # streamed, not one answer
        stats = page.text_content(f"{panel} .answer-stats")
        assert "TTFT" in stats and "finish: stop" in stats and "tokens" in stats
    page.screenshot(path=screenshots / "console-playground.png")


def test_an_experiment_updates_live_and_its_winner_is_promoted(console, world, screenshots):
    """Created by the form; callers hit it through the API and score B higher; the page's results and
    chart follow within a refresh, the verdict names B, and the promote button points an alias at it."""
    page = console().sign_in(ADMIN_KEY, "experiments")
    page.on("dialog", lambda dialog: dialog.accept())
    page.wait_for_selector('#variant-rows .variant select option[value="upper"]', state="attached")
    page.fill("#exp-name", "loud-or-backwards")
    page.fill("#exp-min-samples", "3")
    selects = page.locator("#variant-rows .v-adapter")
    selects.nth(0).select_option("upper")
    selects.nth(1).select_option("reverse")
    page.click("#exp-create")
    page.wait_for_selector("#results-name:text-is('loud-or-backwards')")
    assert "not enough data" in page.text_content("#verdict").lower()

    admin = world["admin"]
    for i in range(20):
        response = admin("POST", "/v1/completions", json={
            "model": "loud-or-backwards", "prompt": "hello world\n", "max_tokens": 20, "temperature": 0,
            "user": f"caller-{i}"})
        score = 1 if response.headers["x-experiment-variant"] == "B" else 0
        admin("POST", "/v1/feedback", json={"request_id": response.json()["id"], "score": score})
    page.wait_for_function("""() => [...document.querySelectorAll('#results-table td.requests')]
        .reduce((sum, td) => sum + Number(td.textContent), 0) === 20""")
    page.wait_for_selector('#verdict[data-winner="B"]')
    points = json.loads(page.get_attribute("#ci-chart", "data-points"))
    assert [p["name"] for p in points] == ["A", "B"] and points[1]["mean"] == 1 and points[0]["mean"] == 0
    assert all(p["ci"][0] - 1e-9 <= p["mean"] <= p["ci"][1] + 1e-9 and p["ci"][1] - p["ci"][0] > 0.1 for p in points)
    assert page.locator("#ci-chart canvas").count() == 1
    page.locator("#results").screenshot(path=screenshots / "console-experiment.png")

    page.fill("#promote-alias", "house-style")
    page.click("#promote")
    page.wait_for_selector("#promote-status:has-text('house-style')")
    assert {"alias": "house-style", "target": "reverse@1"}.items() <= \
        next(a for a in admin("GET", "/v1/aliases").json()["data"] if a["alias"] == "house-style").items()

    row = 'tr[data-experiment="loud-or-backwards"]'
    page.click(f"{row} button:has-text('pause')")
    page.wait_for_selector(f"{row} .status-paused")
    page.click(f"{row} button:has-text('stop')")  # confirmed by the dialog handler
    page.wait_for_selector(f"{row} .status-stopped")
    assert admin("GET", "/v1/experiments/loud-or-backwards").json()["status"] == "stopped"


def test_a_tenant_sees_only_its_own(console, world, screenshots):
    """acme's console: its adapter, none of globex's adapters or experiments, not even in the engine's
    state; globex's key, in another tab, does see them."""
    tab = console()
    page = tab.sign_in(world["keys"]["acme"])
    assert page.text_content("#who-name") == "tenant acme"
    page.wait_for_selector('tr[data-adapter="acme-loud"]')
    assert page.locator("#adapters tbody tr").count() == 1
    assert page.is_hidden('nav a[href="/ui/keys"]')
    for name in ("experiments", "playground", "server", "keys"):
        tab.open(name).wait_for_selector("#main", state="visible")
        page.wait_for_load_state("networkidle")
        if name == "server":
            page.wait_for_function("document.getElementById('s-slots').textContent.includes('/')")
            assert page.is_hidden("#admin")
        if name == "keys":
            assert page.is_visible("#not-admin") and page.is_hidden("#admin-only")
        assert "globex" not in page.content()
    assert not [u for u in tab.requests if "/v1/admin/" in u]  # not even a refused call

    other = console().sign_in(world["keys"]["globex"], "experiments")
    other.wait_for_selector('tr[data-experiment="globex-trial"]')
    other.goto(world["server"].url + "/ui/server")
    other.wait_for_selector('#engine-adapters tr[data-adapter="globex-backwards@1"]')
    assert "acme" not in other.content()

    # The admin's Server page while traffic runs: tenants and keys, every adapter, tokens/s charted.
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            for model in ("reverse", "upper", "rot13"):
                world["admin"]("POST", "/v1/completions", json={"model": model, "prompt": "hello world\n",
                                                                "max_tokens": 20, "temperature": 0})

    driver = threading.Thread(target=traffic)
    driver.start()
    try:
        admin = console().sign_in(ADMIN_KEY, "server")
        admin.wait_for_selector("#admin", state="visible")
        assert int(admin.text_content("#tenant-count")) >= 2 and int(admin.text_content("#key-count")) >= 2
        assert admin.is_visible('nav a[href="/ui/keys"]')
        admin.wait_for_selector('#engine-adapters tr[data-adapter="globex-backwards@1"]')
        admin.wait_for_selector("#tps-chart canvas")
        assert float(admin.text_content("#s-tps")) > 0
        admin.screenshot(path=screenshots / "console-server.png")
    finally:
        stop.set()
        driver.join()


def test_the_adapters_page_names_owners_as_far_as_the_key_may_know(console, world, screenshots):
    """The admin sees every owner; acme sees "you" on its own and, on globex's adapter made public, that it is
    shared, never whose it is."""
    world["admin"]("PUT", "/v1/admin/adapters/globex-backwards/public", json={"public": True})
    try:
        page = console().sign_in(ADMIN_KEY)
        owner = 'tr[data-adapter="{}"] td.owner'
        page.wait_for_selector(owner.format("globex-backwards") + " .pill")
        cells = {n: page.text_content(owner.format(n)).split() for n in ("acme-loud", "globex-backwards", "upper")}
        assert cells == {"acme-loud": ["acme"], "globex-backwards": ["globex", "public"], "upper": ["admins"]}

        tenant = console().sign_in(world["keys"]["acme"])
        tenant.wait_for_selector('tr[data-adapter="globex-backwards"]')
        assert tenant.locator("#adapters tbody tr").count() == 2
        assert tenant.text_content(owner.format("acme-loud")).split() == ["you"]
        assert tenant.text_content(owner.format("globex-backwards")).split() == ["shared", "with", "you", "public"]
    finally:
        world["admin"]("PUT", "/v1/admin/adapters/globex-backwards/public", json={"public": False})


def test_an_admin_creates_and_revokes_keys_on_the_keys_page(console, world, screenshots):
    url = world["server"].url
    page = console().sign_in(ADMIN_KEY, "keys")
    page.on("dialog", lambda dialog: dialog.accept())
    page.wait_for_selector('#tenants tr[data-tenant="acme"]')
    page.fill("#tenant-name", "initech")
    page.click("#tenant-form button")
    page.wait_for_selector('#tenants tr[data-tenant="initech"]')
    assert page.input_value("#key-tenant") == "initech"  # the new tenant is chosen for its first key
    page.fill("#key-label", "ci runner")
    page.click("#key-create")
    page.wait_for_selector("#new-key:not([hidden])")
    key_id, secret = page.text_content("#new-key-id"), page.text_content("#new-key-secret")
    row = f'#keys tr[data-key="{key_id}"]'
    page.wait_for_selector(row)
    assert page.text_content(row).count("initech") == 1 and "ci runner" in page.text_content(row)
    assert page.text_content('#tenants tr[data-tenant="initech"] td:last-child') == "1"

    def status(key: str) -> int:
        return httpx.get(url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"}).status_code

    assert status(secret) == 200 and secret not in world["admin"]("GET", "/v1/admin/keys").text
    page.screenshot(path=screenshots / "console-keys.png")

    page.click(f"{row} button:has-text('revoke')")  # confirmed by the dialog handler
    page.wait_for_selector(f"{row}.revoked")
    assert page.locator(f"{row} button").count() == 0
    assert status(secret) == 401
    assert next(k for k in world["admin"]("GET", "/v1/admin/keys").json()["data"] if k["id"] == key_id)["revoked"]


# ---- without a browser: the pages carry no data, the files are a fixed set, the state endpoint filters ----

def test_the_traffic_share_is_charted_as_it_changes(console, world):
    """Each refresh adds a point to an adapter's sparkline; traffic to it shows as a rise above the baseline."""
    page = console().sign_in(world["keys"]["globex"])
    spark = 'tr[data-adapter="globex-backwards"] svg.spark polyline'
    page.wait_for_selector(spark, state="attached")
    Api(world["server"].url, world["keys"]["globex"])(
        "POST", "/v1/completions", json={"model": "globex-backwards", "prompt": "hello\n", "max_tokens": 8})
    # Two refreshes at least (every 5 s), the newest after the traffic: a point above the baseline (y = 15).
    page.wait_for_function("""(selector) => {
        const points = document.querySelector(selector).getAttribute("points").trim().split(" ");
        return points.length >= 2 && Number(points[points.length - 1].split(",")[1]) < 15;
    }""", arg=spark)
    points = page.get_attribute(spark, "points").split()
    assert len(points) >= 2 and all(0 <= float(p.split(",")[1]) <= 15 for p in points)


def test_pages_need_no_key_and_carry_no_data(world):
    url = world["server"].url
    assert httpx.get(url + "/", follow_redirects=False).headers["location"] == "/ui"
    for page in ("adapters", "playground", "experiments", "server", "keys"):
        response = httpx.get(f"{url}/ui/{page}")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert "acme" not in response.text and "globex" not in response.text and 'data-auth="on"' in response.text
        assert "connect-src 'self'" in response.headers["content-security-policy"]
    assert httpx.get(url + "/ui/nosuch").status_code == 404


def test_static_files_are_a_fixed_set(world):
    url = world["server"].url
    script = httpx.get(url + "/ui/static/vendor/uplot/uPlot.iife.min.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "v1.6.32" in script.text[:100]
    assert httpx.get(url + "/ui/static/vendor/uplot/LICENSE").status_code == 200
    for path in ("../routes.py", "..%2Froutes.py", "%2e%2e/__init__.py", "templates/base.html", "nosuch.js"):
        assert httpx.get(f"{url}/ui/static/{path}").status_code == 404, path


def test_server_state_names_only_what_the_key_may_see(world):
    url, keys = world["server"].url, world["keys"]

    def state(key: str | None) -> httpx.Response:
        return httpx.get(url + "/v1/server/state", headers={"Authorization": f"Bearer {key}"} if key else {})

    assert state(None).status_code == 401 and state("lsk_wrong").status_code == 401
    admin, acme, globex = (state(k).json() for k in (ADMIN_KEY, keys["acme"], keys["globex"]))
    assert admin["caller"] == {"role": "admin", "tenant": None, "auth": True}
    assert acme["caller"] == {"role": "tenant", "tenant": "acme", "auth": True}
    assert "globex-backwards@1" in admin["device_adapters"] and "globex-backwards@1" in globex["device_adapters"]
    assert not any("globex" in json.dumps(acme[k]) for k in ("device_adapters", "merged", "traffic_shares", "retiring"))
    assert acme["slots"] == admin["slots"] and acme["slots"]["used"] >= 1  # the engine's counts, not names
    assert admin["counters"]["tokens_generated"] > 0 and 0 <= admin["kv_cache"]["usage"] <= 1


def test_the_adapter_list_names_owners_as_far_as_the_key_may_know(world):
    admin, keys = world["admin"], world["keys"]
    acme = Api(world["server"].url, keys["acme"])

    def owners(api: Api) -> dict[str, tuple]:
        return {a["name"]: (a["owner"], a["public"]) for a in api("GET", "/v1/adapters").json()["data"]}

    assert owners(admin)["globex-backwards"] == ("globex", False) and owners(admin)["upper"] == (None, False)
    assert owners(acme) == {"acme-loud": ("acme", False)}
    admin("PUT", "/v1/admin/adapters/globex-backwards/public", json={"public": True})
    try:
        assert owners(acme) == {"acme-loud": ("acme", False), "globex-backwards": (None, True)}
        assert acme("GET", "/v1/adapters/globex-backwards").json()["owner"] is None  # never told whose
        assert admin("GET", "/v1/adapters/globex-backwards").json()["owner"] == "globex"
    finally:
        admin("PUT", "/v1/admin/adapters/globex-backwards/public", json={"public": False})

