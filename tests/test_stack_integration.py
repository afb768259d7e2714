"""The deployment stack of docker-compose.yml for real, without docker: every part a process on 127.0.0.1.

PostgreSQL 15 (initdb + postgres), Redis (redis-server), SeaweedFS S3 (the session's server, tests/seaweed.py), a
Prefect API server (``--no-services``) and a separate ``prefect server services start``, both with
docker-compose.yml's server settings (Postgres, Redis messaging, ordering, leases, cleanup queue, Docket), then
compose's ``xwin deploy`` and CPU worker. A run of ``backfill-cohort/cpu`` on the example cohort must complete with
its task runs, events and artifacts in Postgres and a clean store on S3, and the landing scan's cron schedule must
make the scheduler of the services process create scheduled runs. Without the Redis settings the split server
records the flow run but no task run and no event (docs/orchestration.md).

Run it alone with ``pytest -m stack`` (docs/orchestration.md: by hand). It skips, naming what is missing, only
when a binary is absent (.ci/run installs PostgreSQL and Redis with apt-get where it can).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from stack import (
    REPO,
    Postgres,
    Stack,
    clean_env,
    compose_command,
    compose_env,
    entry_point,
    env_example,
    free_port,
    http_ok,
    localize,
    missing_binaries,
    redis_healthcheck,
    start_redis,
    subst,
    wait_for,
)

from xwin.schemas.render import RenderSpec


def stack_test(fn):
    """The marks of a test on the real stack: ``-m stack`` selects them alone."""
    return pytest.mark.stack(pytest.mark.prefect(pytest.mark.slow(pytest.mark.timeout(600)(fn))))


SPEC = RenderSpec(height=64, width=64, pixel_mm=6.0, n_views=8, yaw_step_deg=45.0)
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _argv(cmd: list[str], **options: str) -> list[str]:
    """``cmd`` with its first word resolved to this environment's entry point and ``--option value`` replaced."""
    exe = entry_point(cmd[0])
    assert exe is not None, cmd[0]
    out = [exe, *cmd[1:]]
    for opt, value in options.items():
        i = out.index(f"--{opt}")
        out[i + 1] = value
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    missing = missing_binaries()
    if missing:
        pytest.skip("the deployment stack needs: " + "; ".join(missing))
    s3 = request.getfixturevalue("seaweed_s3")  # the session's SeaweedFS (tests/conftest.py, tests/seaweed.py)
    t0 = time.monotonic()
    envx = env_example()
    db = SimpleNamespace(user=envx["POSTGRES_USER"], password=envx["POSTGRES_PASSWORD"], db=envx["POSTGRES_DB"])
    store = subst("s3://${XWIN_BUCKET:-xwin}/store")
    root = tmp_path_factory.mktemp("stack")
    st = Stack(root)
    try:
        pg = Postgres(st)
        redis, redis_port = start_redis(st)
        have = {b["Name"] for b in s3.client().list_buckets().get("Buckets", [])}
        for b in (envx["XWIN_BUCKET"], envx["XWIN_LANDING_BUCKET"]):  # what compose's seaweedfs -bucket= makes
            assert b not in have, f"bucket {b} exists already on the session's SeaweedFS"
            s3.client().create_bucket(Bucket=b)
        pg.wait()
        pg.create_db(db.user, db.password, db.db)
        wait_for("redis healthcheck", lambda: redis_healthcheck(redis_port).returncode == 0, 30, [redis])

        api_port = free_port()
        api = f"http://127.0.0.1:{api_port}/api"
        ports = {
            "postgres:5432": pg.port,
            "redis:6379": redis_port,
            "prefect-server:4200": api_port,
            "seaweedfs:8333": int(s3.endpoint.rsplit(":", 1)[1]),
        }
        home = root / "prefect-home"
        home.mkdir()
        # the UI is not under test (its first start copies a build into PREFECT_HOME)
        quiet = {"PREFECT_HOME": str(home), "PREFECT_SERVER_UI_ENABLED": "false"}
        server = st.start(
            "prefect-server",
            _argv(compose_command("prefect-server"), host="127.0.0.1", port=str(api_port)),
            clean_env(**localize(compose_env("prefect-server"), ports), **quiet),
            cwd=root,
        )
        t_api = wait_for("the API server's /health", lambda: http_ok(f"{api}/health"), 240, [server], every_s=1)
        # after the API server has migrated the database, as compose orders them
        services = st.start(
            "prefect-services",
            _argv(compose_command("prefect-services")),
            clean_env(**localize(compose_env("prefect-services"), ports), **quiet),
            cwd=root,
        )
        # the workers' and deploy's environment: compose's, with this S3 server's endpoint and key pair
        client_env = {**localize(compose_env("deploy"), ports), **s3.env(), "PREFECT_HOME": str(home)}
        r = subprocess.run(_argv(compose_command("deploy")), env=clean_env(**client_env), cwd=root,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, f"xwin deploy failed:\n{r.stdout}\n{r.stderr}\n{st.logs()}"
        health_port = free_port()
        worker_env = {**localize(compose_env("cpu-worker"), ports), **s3.env(), "PREFECT_HOME": str(home)}
        worker_env["PREFECT_WORKER_WEBSERVER_PORT"] = str(health_port)
        # polling intervals only, so that the test does not wait 10-15 s per poll
        worker_env.update(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")
        worker = st.start("cpu-worker", _argv(compose_command("cpu-worker")), clean_env(**worker_env), cwd=root)
        wait_for(
            "the worker's /health",
            lambda: http_ok(f"http://127.0.0.1:{health_port}/health"),
            120,
            [worker, server, services],
            every_s=1,
        )
        yield SimpleNamespace(
            stack=st,
            api=api,
            pg=pg,
            db=db,
            s3=s3,
            store=store,
            procs=[server, services, worker],
            deploy_out=r.stdout,
            started_s=time.monotonic() - t0,
            api_s=t_api,
        )
    finally:
        st.stop()


def _sql(stack, sql: str, *args):
    return stack.pg.query(sql, *args, user=stack.db.user, password=stack.db.password, db=stack.db.db)


@stack_test
def test_backfill_deployment_on_split_server(stack):
    """backfill-cohort/cpu on the example cohort: completed, task runs + events + artifacts in Postgres, clean S3."""
    t0 = time.monotonic()
    dep = httpx.get(f"{stack.api}/deployments/name/backfill-cohort/cpu", timeout=30)
    assert dep.status_code == 200, dep.text
    params = {"cohort": "example", "spec": SPEC.model_dump(mode="json"), "verify": "deep"}
    r = httpx.post(
        f"{stack.api}/deployments/{dep.json()['id']}/create_flow_run", json={"parameters": params}, timeout=30
    )
    assert r.status_code == 201, r.text
    fr_id = r.json()["id"]

    state = {}

    def final() -> bool:
        state.update(httpx.get(f"{stack.api}/flow_runs/{fr_id}", timeout=10).json()["state"] or {})
        return state.get("type") in FINAL

    wait_for("the backfill flow run", final, 420, stack.procs, every_s=2)
    assert state["type"] == "COMPLETED", (state, stack.stack.logs())
    run_s = time.monotonic() - t0

    # task runs: written by the services process's task-run recorder from the events the API server published
    names: dict[str, str] = {}

    def tasks_recorded() -> bool:
        rows = _sql(stack, "SELECT id, name, state_type FROM task_run WHERE flow_run_id = $1", uuid.UUID(fr_id))
        names.clear()
        names.update({str(r["id"]): f"{r['name']}:{r['state_type']}" for r in rows})
        stages = {n.rsplit("-", 1)[0] + ":" + n.split(":")[1] for n in names.values()}
        return {"plan-series:COMPLETED", "ingest-series:COMPLETED", "render-series:COMPLETED"} <= stages

    wait_for("task runs in Postgres", tasks_recorded, 60, stack.procs)
    assert all(v.endswith(":COMPLETED") for v in names.values()), names

    # events: persisted by the services process's event persister
    task_resources = [f"prefect.task-run.{i}" for i in names]
    got: dict[str, int] = {}

    def events_persisted() -> bool:
        rows = _sql(
            stack,
            "SELECT event, count(*) AS n FROM events WHERE resource_id = $1 OR resource_id = ANY($2::text[]) "
            "GROUP BY event",
            f"prefect.flow-run.{fr_id}",
            task_resources,
        )
        got.clear()
        got.update({r["event"]: int(r["n"]) for r in rows})
        return got.get("prefect.flow-run.Completed") == 1 and got.get("prefect.task-run.Completed", 0) >= len(names)

    wait_for("events in Postgres", events_persisted, 60, stack.procs)
    assert got["prefect.flow-run.Running"] == 1 and got["prefect.task-run.Running"] >= 3, got

    # artifacts of the run: summary, counts table (one series done), progress at 100 %
    arts = {
        r["key"]: r
        for r in _sql(stack, "SELECT key, type, data FROM artifact WHERE flow_run_id = $1", uuid.UUID(fr_id))
    }
    assert {"backfill-example", "backfill-example-counts", "backfill-progress-example"} <= set(arts), sorted(arts)
    assert arts["backfill-example"]["type"] == "markdown"
    counts = json.loads(arts["backfill-example-counts"]["data"])
    counts = json.loads(counts) if isinstance(counts, str) else counts
    assert {"outcome": "done", "series": 1} in counts, counts
    assert float(arts["backfill-progress-example"]["data"]) == pytest.approx(100.0)

    # the store on S3: xwin verify (deep) is clean and holds the volume and its ring
    r = subprocess.run(
        [entry_point("xwin") or "xwin", "verify", "--store", stack.store, "--json"],
        env=clean_env(**stack.s3.env()),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    rep = json.loads(r.stdout)
    assert rep["volumes"] == rep["ok"] == 2 and not rep["corrupt"] and not rep["missing"], rep
    print(
        f"\nstack started in {stack.started_s:.1f} s (API server healthy after {stack.api_s:.1f} s); "
        f"backfill run {run_s:.1f} s; {len(names)} task runs, {sum(got.values())} events"
    )


@stack_test
def test_cron_schedule_creates_scheduled_runs(stack):
    """scan-landing/landing (cron */15) gets scheduled runs from the scheduler in the services process."""
    assert "scan-landing/landing -> xwin-gpu cron */15 * * * *" in stack.deploy_out
    rows: list = []

    def scheduled() -> bool:
        rows[:] = _sql(
            stack,
            "SELECT f.expected_start_time AS t, f.state_type AS s, f.auto_scheduled AS a FROM flow_run f "
            "JOIN deployment d ON d.id = f.deployment_id JOIN flow ON flow.id = d.flow_id "
            "WHERE flow.name = 'scan-landing' AND d.name = 'landing'",
        )
        return len(rows) > 0

    wait_for("scheduled runs of scan-landing/landing", scheduled, 90, stack.procs)
    assert all(r["s"] == "SCHEDULED" and r["a"] for r in rows), rows
    for r in rows:  # on the cron's quarter hours
        assert r["t"].minute % 15 == 0 and r["t"].second == 0 and r["t"].microsecond == 0, r["t"]
    assert len({r["t"] for r in rows}) == len(rows)


def test_scheduler_inserts_runs_of_a_cron_deployment(tmp_path):
    """Prefect's scheduler code on this environment's SQLAlchemy, in process on SQLite (no binaries needed): a
    ``*/15`` cron deployment gets scheduled runs on the quarter hours. Under SQLAlchemy 2.1 the scheduler's bulk
    insert fails ("Can't evaluate bulk DML statement", the hybrid ``FlowRun.state``), so no schedule of any server,
    single process or split, ever creates a run; pyproject pins SQLAlchemy 2.0."""
    from prefect.server import models, schemas
    from prefect.server.database import provide_database_interface
    from prefect.server.database.dependencies import temporary_database_interface
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME, temporary_settings

    async def scheduled() -> list:
        db = provide_database_interface()
        await db.create_db()
        async with db.session_context(begin_transaction=True) as session:
            flow = await models.flows.create_flow(session=session, flow=schemas.core.Flow(name="scan-landing"))
            dep = await models.deployments.create_deployment(
                session=session, deployment=schemas.core.Deployment(name="landing", flow_id=flow.id)
            )
            assert dep is not None
            cron = schemas.schedules.CronSchedule(cron="*/15 * * * *")
            await models.deployments.create_deployment_schedules(
                session=session,
                deployment_id=dep.id,
                schedules=[schemas.actions.DeploymentScheduleCreate(schedule=cron, active=True)],
            )
        async with db.session_context(begin_transaction=True) as session:
            ids = await models.deployments.schedule_runs(session=session, deployment_id=dep.id)
        async with db.session_context() as session:
            runs = await models.flow_runs.read_flow_runs(session=session)
        assert sorted(r.id for r in runs) == sorted(ids)
        return runs

    url = f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"
    # the database interface is cached process-wide: a fresh one on this database, the session's restored after
    settings = {PREFECT_API_DATABASE_CONNECTION_URL: url, PREFECT_HOME: tmp_path}
    with temporary_settings(settings), temporary_database_interface():
        runs = asyncio.run(scheduled())
    assert len(runs) >= 3  # the scheduler's minimum number of runs
    for r in runs:
        assert r.state_type == "SCHEDULED" and r.auto_scheduled
        t = r.expected_start_time
        assert t.minute % 15 == 0 and t.second == 0 and t.microsecond == 0, t
