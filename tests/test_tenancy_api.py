"""Tenants and API keys over HTTP on a real server: 401/403, key lifecycle, isolation of every endpoint
that takes a name (another tenant's name answers exactly like a missing one), public adapters, audit."""

import logging
import shutil

import httpx
import pytest

from server.config import Settings
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from tests.server_harness import RunningServer

ADMIN_KEY = "test-admin-secret"
MISSING = "nosuch-bot"


@pytest.fixture(scope="module")
def sources(llama_adapters):
    return {"a": llama_adapters("ten_a", seed=601, r=4, lora_alpha=8),
            "b": llama_adapters("ten_b", seed=602, r=4, lora_alpha=8, target_modules=["k_proj"])}


class Client:
    def __init__(self, url: str, key: str | None):
        self.url, self.key = url, key

    def __call__(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def upload(self, name: str, directory) -> httpx.Response:
        files = {f: (f, (directory / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        return self("POST", "/v1/adapters", data={"name": name}, files=files)

    def complete(self, model: str, path: str = "/v1/completions") -> httpx.Response:
        body = {"model": model, "max_tokens": 2, "temperature": 0}
        if path.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "tenancy!"
        return self("POST", path, json=body)


@pytest.fixture(scope="module")
def world(llama_dir, sources, tmp_path_factory):
    store = tmp_path_factory.mktemp("tenancy") / "store"
    shutil.copytree(sources["b"], store / "shared")  # hand-placed: the admins' adapter
    settings = Settings(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu",
                        kv_cache_memory=32 * 1024**2, served_model_name="base", admin_key=ADMIN_KEY)
    with RunningServer(settings) as server:
        admin = Client(server.url, ADMIN_KEY)
        keys = {}
        for tenant in ("acme", "globex"):
            assert admin("POST", "/v1/admin/tenants", json={"name": tenant}).status_code == 201
            created = admin("POST", "/v1/admin/keys", json={"role": "tenant", "tenant": tenant, "label": tenant})
            assert created.status_code == 201, created.text
            keys[tenant] = created.json()
        acme, globex = Client(server.url, keys["acme"]["key"]), Client(server.url, keys["globex"]["key"])
        assert acme.upload("acme-bot", sources["a"]).status_code == 201
        assert globex.upload("globex-bot", sources["b"]).status_code == 201
        assert acme("PUT", "/v1/aliases/acme-prod", json={"target": "acme-bot@1"}).status_code == 200
        experiment = {"name": "acme-exp", "status": "running", "variants": [
            {"name": "a", "adapter": "acme-bot"}, {"name": "b", "adapter": "base"}]}
        assert acme("POST", "/v1/experiments", json=experiment).status_code == 201
        served = acme.complete("acme-exp")
        assert served.status_code == 200, served.text
        yield {"server": server, "admin": admin, "acme": acme, "globex": globex, "keys": keys,
               "acme_request": served.json()["id"]}


def _same_as_missing(client: Client, method: str, hidden_path: str, missing_path: str, hidden: str,
                     missing: str = MISSING, **kwargs) -> httpx.Response:
    """The answer for another tenant's name equals the answer for a name nobody has (up to the name)."""
    seen = client(method, hidden_path, **kwargs)
    absent = client(method, missing_path, **_swap(kwargs, hidden, missing))
    assert seen.status_code == absent.status_code == 404, (seen.text, absent.text)
    assert seen.text.replace(hidden, missing) == absent.text
    return seen


def _swap(value, old: str, new: str):
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {k: _swap(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap(v, old, new) for v in value]
    return value


# ---- authentication and roles ------------------------------------------------------------------------

def test_missing_and_bad_keys_are_refused_in_openai_shape(world):
    url = world["server"].url
    for client in (Client(url, None), Client(url, "lsk_not-a-key")):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/adapters"), ("GET", "/v1/admin/keys"),
                             ("POST", "/v1/completions")):
            response = client(method, path, json={})
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"
    assert Client(url, None)("GET", "/health").status_code == 200  # probes need no key


def test_uploads_without_a_valid_key_are_refused_before_their_body_is_read(world, sources):
    url = world["server"].url
    for client in (Client(url, None), Client(url, "lsk_forged")):
        response = client.upload("sneaky", sources["a"])
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert world["admin"]("GET", "/v1/adapters/sneaky").status_code == 404


def test_tenant_is_forbidden_on_admin_endpoints(world):
    for method, path in (("GET", "/v1/admin/keys"), ("POST", "/v1/admin/tenants"), ("GET", "/v1/admin/audit"),
                         ("PUT", "/v1/admin/adapters/acme-bot/public")):
        response = world["acme"](method, path, json={})
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"]["code"] == "permission_denied"
    response = world["acme"]("POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "shared"})
    assert response.status_code == 403


def test_key_lifecycle_list_hides_secrets_and_revocation_is_immediate(world):
    admin, url = world["admin"], world["server"].url
    created = admin("POST", "/v1/admin/keys", json={"role": "tenant", "tenant": "acme", "label": "temp"}).json()
    assert created["key"].startswith("lsk_")
    temp = Client(url, created["key"])
    assert temp("GET", "/v1/adapters").status_code == 200
    listed = admin("GET", "/v1/admin/keys").json()["data"]
    assert created["id"] in [k["id"] for k in listed]
    assert all("key" not in k for k in listed) and created["key"] not in str(listed)
    assert admin("DELETE", f"/v1/admin/keys/{created['id']}").json()["revoked"] is not None
    assert temp("GET", "/v1/adapters").status_code == 401
    assert admin("DELETE", "/v1/admin/keys/key_nope").status_code == 404
    assert admin("POST", "/v1/admin/keys", json={"role": "tenant", "tenant": "nobody"}).status_code == 404
    assert admin("POST", "/v1/admin/keys", json={"role": "tenant"}).status_code == 400
    assert admin("POST", "/v1/admin/tenants", json={"name": "acme"}).status_code == 409
    assert {"acme", "globex"} <= {t["name"] for t in admin("GET", "/v1/admin/tenants").json()["data"]}


def test_keys_are_stored_only_as_digests(world):
    state = world["server"].state
    with state.database.engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT * FROM api_keys").fetchall()
    dump = repr(rows)
    assert rows and world["keys"]["acme"]["key"] not in dump and ADMIN_KEY not in dump


# ---- isolation ---------------------------------------------------------------------------------------

def test_tenant_sees_only_its_own_in_listings(world):
    globex = world["globex"]
    models = {m["id"] for m in globex("GET", "/v1/models").json()["data"]}
    assert models == {"base", "globex-bot"}
    assert [a["name"] for a in globex("GET", "/v1/adapters").json()["data"]] == ["globex-bot"]
    assert globex("GET", "/v1/aliases").json()["data"] == []
    assert globex("GET", "/v1/experiments").json()["data"] == []
    admin_models = {m["id"] for m in world["admin"]("GET", "/v1/models").json()["data"]}
    assert {"acme-bot", "globex-bot", "shared", "acme-prod"} <= admin_models


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/adapters/{}"), ("DELETE", "/v1/adapters/{}"), ("DELETE", "/v1/adapters/{}@1"),
    ("POST", "/v1/adapters/{}/warm"), ("POST", "/v1/adapters/{}/cool"), ("POST", "/v1/adapters/{}/merge"),
    ("DELETE", "/v1/adapters/{}/merge"),
])
def test_adapter_endpoints_hide_other_tenants_adapters(world, method, path):
    for hidden in ("acme-bot", "shared"):  # another tenant's, and the admins' private one
        _same_as_missing(world["globex"], method, path.format(hidden), path.format(MISSING), hidden)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("model", ["acme-bot", "acme-bot@1", "acme-prod", "acme-exp", "shared"])
def test_inference_hides_other_tenants_models(world, path, model):
    seen = world["globex"].complete(model, path)
    absent = world["globex"].complete(MISSING + model[len(model.split("@")[0]):], path)
    assert seen.status_code == absent.status_code == 404
    assert seen.json()["error"] == {**absent.json()["error"], "message": absent.json()["error"]["message"].replace(
        MISSING, model.split("@")[0])}


def test_aliases_hide_other_tenants_names(world):
    globex = world["globex"]
    _same_as_missing(globex, "PUT", "/v1/aliases/g-alias", "/v1/aliases/g-alias", "acme-bot",
                     json={"target": "acme-bot"})
    _same_as_missing(globex, "DELETE", "/v1/aliases/acme-prod", f"/v1/aliases/{MISSING}", "acme-prod")
    taken = globex("PUT", "/v1/aliases/acme-prod", json={"target": "globex-bot"})  # moving acme's alias
    assert taken.status_code == 409 and "acme" not in taken.json()["error"]["message"].replace("acme-prod", "")


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/experiments/{}", None), ("GET", "/v1/experiments/{}/results", None),
    ("PATCH", "/v1/experiments/{}", {"status": "paused"}), ("DELETE", "/v1/experiments/{}", None),
    ("POST", "/v1/experiments/{}/promote", {"alias": "g-promoted", "variant": "a"}),
])
def test_experiment_endpoints_hide_other_tenants_experiments(world, method, path, body):
    _same_as_missing(world["globex"], method, path.format("acme-exp"), path.format(MISSING), "acme-exp",
                     **({"json": body} if body else {}))


def test_experiments_cannot_use_or_score_other_tenants_things(world):
    globex = world["globex"]
    variants = [{"name": "a", "adapter": "acme-bot"}, {"name": "b", "adapter": "base"}]
    _same_as_missing(globex, "POST", "/v1/experiments", "/v1/experiments", "acme-bot",
                     json={"name": "g-exp", "variants": variants})
    request_id = world["acme_request"]
    seen = globex("POST", "/v1/feedback", json={"request_id": request_id, "score": 1})
    absent = globex("POST", "/v1/feedback", json={"request_id": "cmpl-nosuch", "score": 1})
    assert seen.status_code == absent.status_code == 404
    assert seen.text.replace(request_id, "cmpl-nosuch") == absent.text


def test_names_of_others_answer_as_conflict_without_saying_whose(world, sources):
    for name in ("acme-bot", "acme-prod", "acme-exp", "shared", "base"):
        response = world["globex"].upload(name, sources["b"])
        assert response.status_code == 409, (name, response.text)
        assert response.json()["error"]["message"] == f"name {name!r} is not available"
    # ...and nothing of them changed: acme's adapter still has one version and still serves acme.
    assert [v["version"] for v in world["acme"]("GET", "/v1/adapters/acme-bot").json()["versions"]] == [1]
    assert world["acme"].complete("acme-prod").status_code == 200


def test_public_adapters_are_usable_but_not_changeable(world, sources):
    admin, globex = world["admin"], world["globex"]
    assert admin("PUT", "/v1/admin/adapters/shared/public", json={"public": True}).json()["public"] is True
    try:
        assert "shared" in {m["id"] for m in globex("GET", "/v1/models").json()["data"]}
        assert globex.complete("shared").status_code == 200
        assert globex("GET", "/v1/adapters/shared").status_code == 200
        assert globex("DELETE", "/v1/adapters/shared").status_code == 403
        assert globex("POST", "/v1/adapters/shared/merge").status_code == 403
        assert globex.upload("shared", sources["b"]).status_code == 409
    finally:
        admin("PUT", "/v1/admin/adapters/shared/public", json={"public": False})
    assert admin("PUT", f"/v1/admin/adapters/{MISSING}/public", json={"public": True}).status_code == 404


def test_tenant_versions_and_deletes_its_own(world, sources):
    acme = world["acme"]
    assert acme.upload("acme-tmp", sources["a"]).status_code == 201
    assert acme.upload("acme-tmp", sources["b"]).json()["version"] == 2
    assert acme("DELETE", "/v1/adapters/acme-tmp").json()["deleted"] == ["acme-tmp@1", "acme-tmp@2"]
    assert world["globex"].upload("acme-tmp", sources["b"]).status_code == 409  # still acme's name
    assert acme.upload("acme-tmp", sources["a"]).json()["version"] == 3


def test_failed_upload_does_not_keep_the_name(world, sources):
    bad = world["globex"]("POST", "/v1/adapters", data={"name": "g-broken"},
                          files={CONFIG_FILE: (CONFIG_FILE, b"{"), WEIGHTS_FILE: (WEIGHTS_FILE, b"x")})
    assert bad.status_code == 422
    assert world["acme"].upload("g-broken", sources["a"]).status_code == 201


# ---- audit -------------------------------------------------------------------------------------------

def test_audit_log_records_who_did_what(world):
    events = world["admin"]("GET", "/v1/admin/audit", params={"limit": 1000}).json()["data"]
    acme_key = world["keys"]["acme"]["id"]
    seen = {(e["action"], e["target"], e["key_id"]) for e in events}
    assert ("adapter.upload", "acme-bot@1", acme_key) in seen
    assert ("alias.set", "acme-prod", acme_key) in seen
    assert ("experiment.create", "acme-exp", acme_key) in seen
    assert ("key.create", world["keys"]["globex"]["id"], "config-admin") in seen
    assert all(e["at"] for e in events)
    only_acme = world["admin"]("GET", "/v1/admin/audit", params={"tenant": "acme"}).json()["data"]
    assert only_acme and {e["tenant"] for e in only_acme} == {"acme"}


# ---- auth off ----------------------------------------------------------------------------------------

def test_auth_off_is_the_default_and_says_so_loudly(llama_dir, tmp_path, caplog):
    settings = Settings(model=llama_dir, adapters_dir=tmp_path, dtype="float32", device="cpu",
                        kv_cache_memory=16 * 1024**2, served_model_name="base")
    with caplog.at_level(logging.INFO), RunningServer(settings) as server:
        assert httpx.get(server.url + "/v1/models").status_code == 200
        assert httpx.get(server.url + "/v1/admin/keys").status_code == 200
    messages = [r.getMessage() for r in caplog.records]
    assert any("AUTH IS OFF" in m for m in messages) and any("(auth: OFF)" in m for m in messages)
