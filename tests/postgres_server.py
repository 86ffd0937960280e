"""A real PostgreSQL for the database tests: initdb into a temporary directory and start it on a free
loopback port, once per session; each test gets a database of its own. Skipped where the binaries
(PostgreSQL 15, /usr/lib/postgresql/15/bin) are missing, except in CI (CI=true), where .ci/run installs
them and a missing server fails. Root may not run postgres: as root
the server runs as the `postgres` user."""

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.server_harness import free_port

BIN = Path(os.environ.get("LORASERVE_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="session")
def postgres() -> Iterator[Callable[[], str]]:
    """A factory of SQLAlchemy URLs, each naming a new empty database on the session's server."""
    missing = None if (BIN / "initdb").exists() else f"no PostgreSQL binaries in {BIN}"
    if missing and os.environ.get("CI") == "true":  # .ci/run installs them: a skip there would hide a failure
        pytest.fail(missing + " (.ci/run should have installed postgresql-15)")
    if missing:
        pytest.skip(missing)
    root = Path(tempfile.mkdtemp(prefix="loraserve-pg-"))  # not under pytest's 0700 root-owned tmp
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", free_port()
    subprocess.run(_as_server_user([str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                    "--no-sync"]), check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_server_user([str(BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options,
                                    "-w", "start"]), check=True, capture_output=True)
    admin = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT")

    def new_database() -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        admin.dispose()
        subprocess.run(_as_server_user([str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
