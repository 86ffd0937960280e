"""API keys in the catalogue: the `loraserve keys` CLI, digests only, revocation."""

import json

import pytest

from server.cli import main
from server.db import Database, open_database
from server.tenancy.errors import KeyNotFoundError, TenantNotFoundError
from server.tenancy.keys import KeyStore


def _run(capsys, *argv) -> list[dict]:
    assert main(list(argv)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_creates_lists_and_revokes_keys_in_the_adapters_catalogue(tmp_path, capsys):
    flags = ["keys", "--adapters-dir", str(tmp_path)]
    [created] = _run(capsys, *flags, "create", "--tenant", "acme", "--label", "ci")
    assert created["role"] == "tenant" and created["tenant"] == "acme" and created["key"].startswith("lsk_")
    [admin] = _run(capsys, *flags, "create", "--role", "admin")
    listed = _run(capsys, *flags, "list")
    assert [k["id"] for k in listed] == [created["id"], admin["id"]]
    assert created["key"] not in json.dumps(listed)
    _run(capsys, *flags, "revoke", created["id"])

    database = open_database(tmp_path)
    try:
        store = KeyStore(database)
        assert store.authenticate(created["key"]) is None  # revoked
        assert store.authenticate(admin["key"]).role == "admin"
        assert store.active_keys() == 1
    finally:
        database.close()


def test_key_store_refusals_and_principals(tmp_path):
    store = KeyStore(Database(f"sqlite:///{tmp_path / 'catalogue.db'}"))
    with pytest.raises(TenantNotFoundError):
        store.create_key("tenant", "nobody")
    with pytest.raises(ValueError):
        store.create_key("admin", "acme")
    store.create_tenant("acme")
    key, secret = store.create_key("tenant", "acme")
    principal = store.authenticate(secret)
    assert (principal.key_id, principal.role, principal.tenant) == (key.id, "tenant", "acme")
    assert store.authenticate(secret + "x") is None
    with pytest.raises(KeyNotFoundError):
        store.revoke("key_nope")

