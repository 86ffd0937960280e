"""The request path answers from memory: with auth on and a tenant's key, a warm completion on a known
adapter runs no SQL statement at all (key, owner, experiment and resolution lookups are all in memory),
and the copies follow this process's writes at once (a revoked key is refused at its next request)."""

import time

import httpx
import pytest
from sqlalchemy import event

from server.config import Settings
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from tests.server_harness import RunningServer

ADMIN_KEY = "request-path-admin"
# The copies expire after a second (other replicas' writes): the warm-up and the measured request must
# both fall inside one, or the measured one rightly refreshes. A slower pair is tried again.
FRESH_S = 0.8


@pytest.fixture(scope="module")
def adapter(llama_adapters):
    return llama_adapters("path_a", seed=901, r=4, lora_alpha=8)


class Statements:
    """Every SQL statement the server's database engine runs, from any thread."""

    def __init__(self, engine):
        self.seen: list[str] = []
        self._engine = engine
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.seen.append(statement)

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._record)


def test_a_warm_tenant_request_runs_no_sql_and_a_revoked_key_stops_at_once(llama_dir, adapter, tmp_path):
    settings = Settings(model=llama_dir, adapters_dir=tmp_path / "store", dtype="float32", device="cpu",
                        kv_cache_memory=16 * 1024**2, served_model_name="base", admin_key=ADMIN_KEY)
    with RunningServer(settings) as server:
        url = server.url
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert httpx.post(url + "/v1/admin/tenants", json={"name": "acme"}, headers=admin).status_code == 201
        created = httpx.post(url + "/v1/admin/keys", json={"role": "tenant", "tenant": "acme"}, headers=admin).json()
        tenant = {"Authorization": f"Bearer {created['key']}"}
        files = {f: (f, (adapter / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        uploaded = httpx.post(url + "/v1/adapters", data={"name": "acme-bot"}, files=files, headers=tenant, timeout=60)
        assert uploaded.status_code == 201, uploaded.text

        def complete(model: str = "acme-bot") -> httpx.Response:
            return httpx.post(url + "/v1/completions", headers=tenant, timeout=60,
                              json={"model": model, "prompt": "quiet!", "max_tokens": 2, "temperature": 0})

        statements = Statements(server.state.database.engine)
        try:
            for _ in range(5):
                started = time.monotonic()
                assert complete().status_code == 200  # warm: key, owner, experiment? and version remembered
                statements.seen.clear()
                measured = complete()
                if time.monotonic() - started < FRESH_S:
                    break
            assert measured.status_code == 200 and measured.json()["model"] == "acme-bot"
            assert statements.seen == [], "the request path ran SQL"

            revoked = httpx.delete(f"{url}/v1/admin/keys/{created['id']}", headers=admin)
            assert revoked.status_code == 200
            assert complete().status_code == 401  # this process's write dropped the remembered key
        finally:
            statements.close()
