"""`loraserve keys create|list|revoke`: manage API keys directly in the catalogue of an adapters directory
(no server needed; a running server sees the change at its next request)."""

import argparse
import json

from server.settings_cli import add_settings_flags, settings_from_args


def add_parser(commands) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys in the catalogue")
    add_settings_flags(keys, ("adapters_dir", "catalogue_url"))
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print its secret (shown once)")
    create.add_argument("--role", choices=["admin", "tenant"], default="tenant")
    create.add_argument("--tenant", help="the tenant of a tenant key (created if new)")
    create.add_argument("--label", default="")
    actions.add_parser("list", help="list keys (never their secrets)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    keys.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from server.db import open_database
    from server.tenancy.keys import KeyStore

    settings = settings_from_args(args)
    database = open_database(settings.adapters_dir, settings.catalogue_url)
    try:
        return _ACTIONS[args.action](KeyStore(database), args)
    finally:
        database.close()


def _create(store, args: argparse.Namespace) -> int:
    if args.role == "tenant" and not args.tenant:
        raise SystemExit("a tenant key needs --tenant NAME")
    if args.tenant and not store.tenant_exists(args.tenant):
        store.create_tenant(args.tenant)
    key, secret = store.create_key(args.role, args.tenant if args.role == "tenant" else None, args.label)
    print(json.dumps({"id": key.id, "role": key.role, "tenant": key.tenant, "key": secret}))
    return 0


def _list(store, args: argparse.Namespace) -> int:
    for key in store.keys():
        revoked = key.revoked_at.isoformat() if key.revoked_at else None
        print(json.dumps({"id": key.id, "role": key.role, "tenant": key.tenant, "label": key.label,
                          "created": key.created_at.isoformat(), "revoked": revoked}))
    return 0


def _revoke(store, args: argparse.Namespace) -> int:
    key = store.revoke(args.key_id)
    print(json.dumps({"id": key.id, "revoked": key.revoked_at.isoformat()}))
    return 0


_ACTIONS = {"create": _create, "list": _list, "revoke": _revoke}
