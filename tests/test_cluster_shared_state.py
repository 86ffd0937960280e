"""What replicas share, without Ray: tenant limits counted in one PostgreSQL catalogue by several
processes (two `Database` objects stand for two processes), one blob store locked across processes,
and a server cut off from its catalogue (503 on /ready and on changes, serving what it holds)."""

import threading
import time

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from server.config import Settings
from server.db import Database
from server.errors import DatabaseUnavailableError
from server.read_cache import ReadCache
from server.registry.blob_store import BlobStore
from server.tenancy.errors import RateLimitedError
from server.tenancy.shared_limits import LEASE_S, SharedTenantLimiter
from tests.postgres_server import postgres  # noqa: F401  (a fixture)
from tests.server_harness import RunningServer


@pytest.fixture
def catalogue(postgres) -> str:  # noqa: F811
    return postgres()


class _Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_two_processes_share_one_rate_limit(catalogue):
    clock = _Clock()
    first, second = Database(catalogue), Database(catalogue)
    a = SharedTenantLimiter(first, requests_per_minute=4, tokens_per_minute=0, max_concurrent=0, clock=clock)
    b = SharedTenantLimiter(second, requests_per_minute=4, tokens_per_minute=0, max_concurrent=0, clock=clock)
    try:
        for limiter in (a, b, a, b):
            limiter.admit("acme", 10)()
        for limiter in (a, b):
            with pytest.raises(RateLimitedError) as refused:
                limiter.admit("acme", 10)
            assert refused.value.retry_after == 15  # one request a quarter of a minute
        b.admit("globex", 10)()  # another tenant's bucket is its own
        clock.now += 15  # one request's worth refilled, for both processes
        a.admit("acme", 10)()
        with pytest.raises(RateLimitedError):
            b.admit("acme", 10)
    finally:
        a.close(), b.close(), first.close(), second.close()


def test_requests_in_flight_count_across_processes_until_a_dead_ones_lease_runs_out(catalogue):
    clock = _Clock()
    first, second = Database(catalogue), Database(catalogue)
    a = SharedTenantLimiter(first, requests_per_minute=0, tokens_per_minute=0, max_concurrent=2, clock=clock)
    b = SharedTenantLimiter(second, requests_per_minute=0, tokens_per_minute=0, max_concurrent=2, clock=clock)
    try:
        release = a.admit("acme", 1)
        a.admit("acme", 1)  # never released: its process "dies" holding it
        with pytest.raises(RateLimitedError, match="in flight"):
            b.admit("acme", 1)
        release()
        release()  # a second call gives nothing back twice
        b.admit("acme", 1)  # a's leaked one and this one
        with pytest.raises(RateLimitedError, match="in flight"):
            b.admit("acme", 1)
        clock.now += LEASE_S + 1
        b.refresh_leases()  # b lives on (its thread does this every LEASE_S / 3); a's lease runs out
        b.admit("acme", 1)
        with pytest.raises(RateLimitedError, match="in flight"):
            b.admit("acme", 1)
    finally:
        a.close(), b.close(), first.close(), second.close()


def test_the_blob_lock_excludes_another_process_sharing_the_store(tmp_path):
    mine, theirs = BlobStore(tmp_path), BlobStore(tmp_path)  # two opens of the lock file: two flocks
    entered = threading.Event()

    def other() -> None:
        with theirs.lock():
            entered.set()

    with mine.lock():
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.3)  # waits while the lock is held elsewhere
    assert entered.wait(5)
    thread.join()


def test_start_up_keeps_the_temporaries_of_uploads_in_progress(tmp_path):
    store = BlobStore(tmp_path)
    store.stage(b"{}", b"weights", 100)  # another replica's upload, mid-way
    assert store.clean_temp(min_age_s=3600) == 0 and len(list(store.tmp.iterdir())) == 1


def test_a_read_cache_answers_from_memory_while_the_database_is_unreachable():
    cache: ReadCache[str, int] = ReadCache(max_age_s=0.0, stale_on=(ConnectionError,))

    def unreachable() -> int:
        raise ConnectionError("down")

    assert cache.get("k", lambda: 1) == 1
    assert cache.get("k", unreachable) == 1  # expired, but the last answer beats no answer
    with pytest.raises(DatabaseUnavailableError):
        cache.get("never-read", unreachable)


def _allow_connections(url: str, allowed: bool) -> None:
    """Open or close the server's database to every connection (existing ones are cut)."""
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {str(allowed).lower()}"))
        if not allowed:
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                               {"n": name})
    admin.dispose()


def test_cut_off_from_its_catalogue_a_server_is_unready_refuses_changes_and_serves(
        catalogue, llama_dir, llama_adapters, tmp_path):
    adapter = llama_adapters("cutoff", seed=911, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    settings = Settings(model=llama_dir, adapters_dir=tmp_path, catalogue_url=catalogue, dtype="float32",
                        device="cpu", kv_cache_memory=32 * 1024**2, served_model_name="base",
                        lora=[f"held={adapter}"], shared_limits=True)
    body = {"model": "held", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    with RunningServer(settings) as server:
        assert httpx.get(server.url + "/ready").status_code == 200
        served = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        _allow_connections(catalogue, False)
        try:
            unready = httpx.get(server.url + "/ready", timeout=30)
            assert unready.status_code == 503 and unready.json()["error"]["code"] == "catalogue_unavailable"
            time.sleep(1.1)  # every remembered answer has expired: they are served stale
            again = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            assert again.status_code == 200 and again.json()["choices"][0]["text"] == served
            change = httpx.put(server.url + "/v1/aliases/prod", json={"target": "held"}, timeout=30)
            assert change.status_code == 503 and change.json()["error"]["code"] == "catalogue_unavailable"
            assert "cannot be reached" in change.json()["error"]["message"]
        finally:
            _allow_connections(catalogue, True)
        assert httpx.get(server.url + "/ready", timeout=30).status_code == 200
        assert httpx.put(server.url + "/v1/aliases/prod", json={"target": "held"}, timeout=30).status_code == 200

