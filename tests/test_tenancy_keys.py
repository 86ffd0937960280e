"""API keys in the catalogue: the `loraserve keys` CLI, digests only, revocation, ownership claims."""

import json

import pytest
from sqlalchemy import create_engine

from server.cli import main
from server.registry.catalogue import Catalogue
from server.tenancy.errors import KeyNotFoundError, TenantNotFoundError
from server.tenancy.keys import KeyStore
from server.tenancy.ownership import OwnershipStore


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

    catalogue = Catalogue(f"sqlite:///{tmp_path / '.loraserve' / 'catalogue.db'}")
    try:
        store = KeyStore(catalogue.engine)
        assert store.authenticate(created["key"]) is None  # revoked
        assert store.authenticate(admin["key"]).role == "admin"
        assert store.active_keys() == 1
    finally:
        catalogue.close()


def test_key_store_refusals_and_principals():
    store = KeyStore(create_engine("sqlite://"))
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


def test_ownership_claims_are_first_come():
    owners = OwnershipStore(create_engine("sqlite://"))
    assert owners.claim("bot", "acme") is True
    assert owners.claim("bot", "globex") is False
    assert owners.owner("bot").tenant == "acme"
    owners.release("bot", "globex")  # not globex's: stays
    assert owners.owner("bot").tenant == "acme"
    owners.set_public("bot", True)
    assert owners.visible_names("globex") == {"bot"} and owners.owned_names("globex") == set()
