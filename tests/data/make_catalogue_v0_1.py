"""How tests/data/catalogue-v0.1.db was made: the stores of loraserve 0.1.0 (commit 720a6ef, before the
one database module and its migrations) writing a small catalogue with rows in every table.

It imports the 0.1.0 stores, which no longer exist in this form: to run it again, check that commit out
(`git worktree add /tmp/v0.1 720a6ef`) and run `python tests/data/make_catalogue_v0_1.py OUT.db` there.
The secrets of the keys it made are written beside the database (`OUT.secrets.json`); they open nothing
but this test fixture.
"""

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from server.experiments.model import Assignment, Experiment, Outcome, Status, Variant
from server.experiments.store import ExperimentStore
from server.registry.catalogue import Catalogue
from server.registry.records import AdapterMetadata
from server.tenancy.audit import AuditLog
from server.tenancy.keys import KeyStore
from server.tenancy.ownership import OwnershipStore


def _metadata(blob: str, rank: int = 8, source: str = "upload") -> AdapterMetadata:
    return AdapterMetadata(
        blob_key=blob * 64, weights_sha256=blob.upper() * 64, description=f"blob {blob}", rank=rank,
        alpha=2.0 * rank, target_modules=("q_proj", "v_proj"), use_dora=False, use_rslora=rank == 16,
        trainable_params=1000 * rank, adapted_base_params=65536, size_bytes=4096 * rank, source=source,
    )


def main(out: Path) -> None:
    out.unlink(missing_ok=True)
    catalogue = Catalogue(f"sqlite:///{out}")
    engine = catalogue.engine
    experiments, keys = ExperimentStore(engine), KeyStore(engine)
    owners, audit = OwnershipStore(engine), AuditLog(engine)

    # Adapters: support-bot 1 (live) and 2 (deleted); old-bot wholly deleted; acme-bot of a tenant;
    # shared hand-placed by the admins and made public.
    catalogue.add_version("support-bot", _metadata("a"))
    catalogue.add_version("support-bot", _metadata("b", rank=16))
    catalogue.delete("support-bot", 2)
    catalogue.add_version("old-bot", _metadata("c", rank=4, source="disk"))
    catalogue.delete("old-bot")
    catalogue.add_version("acme-bot", _metadata("d"))
    catalogue.add_version("shared", _metadata("e", source="disk"))
    catalogue.set_alias("prod", "support-bot", 1)
    catalogue.set_alias("acme-prod", "acme-bot", 1)

    keys.create_tenant("acme")
    keys.create_tenant("globex")
    admin, admin_secret = keys.create_key("admin", label="ops")
    acme, acme_secret = keys.create_key("tenant", "acme", label="acme ci")
    globex, globex_secret = keys.create_key("tenant", "globex", label="globex old")
    keys.revoke(globex.id)
    for name in ("acme-bot", "acme-prod", "acme-exp"):
        owners.claim(name, "acme")
    owners.set_public("shared", True)

    now = datetime.now(UTC)
    experiments.add(Experiment(
        "acme-exp", "acme tries its bot", Status.RUNNING,
        (Variant("a", "acme-bot@1", 1.0), Variant("b", None, 1.0, control=True)), "user", 30, now, now,
        started_at=now,
    ))
    for request_id, variant, adapter in (("req-1", "a", "acme-bot@1"), ("req-2", "b", None), ("req-3", "a", "acme-bot@1")):
        experiments.add_request(Assignment("acme-exp", variant, adapter, request_id), key="user-7")
    experiments.finish_request("req-1", Outcome(None, 12, 0.02, 0.3))
    experiments.finish_request("req-2", Outcome("server_busy", 0, None, 0.01))
    experiments.score(["req-1"], 1.0)

    audit.record(admin.id, None, "adapter.upload", "support-bot@1", {"bytes": 32768})
    audit.record(acme.id, "acme", "adapter.upload", "acme-bot@1", {"bytes": 32768})
    audit.record(acme.id, "acme", "experiment.create", "acme-exp", {"status": "running"})
    audit.record("config-admin", None, "key.revoke", globex.id, {})
    catalogue.close()

    secrets = {"admin": [admin.id, admin_secret], "acme": [acme.id, acme_secret],
               "globex_revoked": [globex.id, globex_secret]}
    out.with_suffix(".secrets.json").write_text(json.dumps(secrets, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
