"""docker-compose.yml without docker: structure, pinned images, no secrets, and every command it runs exists.

Commands run by this project's image (docker/Dockerfile) are checked against the real entry points installed
here (``xwin`` via typer, ``prefect`` and ``dask`` via their ``--help``, including every option the file passes).
Commands of the pinned third-party images are checked against the CLIs those images ship (table below, from the
MinIO / Postgres documentation for the pinned releases).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ENV_EXAMPLE = dict(
    line.split("=", 1)
    for line in (REPO / "docker" / ".env.example").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)
OUR_IMAGE = "xwin:0.1.0"
# CLIs of the pinned third-party images: binary -> subcommands used (minio server; mc alias/mb/ready; pg_isready)
THIRD_PARTY = {
    "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z": {"minio": {"server"}, "mc": {"ready"}},
    "quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z": {"mc": {"alias", "mb"}, "/bin/sh": {"-c"}},
    "postgres:16.4-alpine": {"pg_isready": {"-U"}},
}
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::([-?])([^}]*))?\}")


def subst(s: str) -> str:
    """Compose variable substitution with the values of docker/.env.example (``$$`` stays a literal ``$``)."""

    def one(m: re.Match) -> str:
        name, op, arg = m.groups()
        if name in ENV_EXAMPLE:
            return ENV_EXAMPLE[name]
        if op == "-":
            return arg
        raise AssertionError(f"${{{name}}} is required but missing from docker/.env.example")

    return _VAR.sub(one, s.replace("$$", "\0")).replace("\0", "$")


def argv(cmd) -> list[str]:
    return [subst(c) for c in cmd] if isinstance(cmd, list) else shlex.split(subst(cmd))


def test_topology_and_dependencies():
    need = {
        "postgres",
        "prefect-server",
        "prefect-services",
        "minio",
        "minio-init",
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
    for name in ("postgres", "prefect-server", "minio", "cpu-worker", "gpu-worker", "dask-scheduler"):
        assert SERVICES[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    for name in ("minio-init", "deploy"):
        assert SERVICES[name]["restart"] == "no"
    gpu = SERVICES["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu[0]["driver"] == "nvidia" and "gpu" in gpu[0]["capabilities"]
    assert "devices" not in str(SERVICES["cpu-worker"].get("deploy", {}))
    # the workers reach the server by its service name, the server its database through postgres
    for w in ("cpu-worker", "gpu-worker", "deploy", "dask-worker"):
        assert SERVICES[w]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    db = subst(SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert db.startswith("postgresql+asyncpg://") and "@postgres:5432/" in db


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


def test_no_secrets_in_compose():
    text = (REPO / "docker-compose.yml").read_text()
    for name, svc in SERVICES.items():
        env = svc.get("environment") or {}
        for k, v in env.items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", k):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", str(v)), f"{name}.{k} must come from .env"
    assert "CHANGE-ME" not in text and "minioadmin" not in text
    required = {m.group(1) for m in _VAR.finditer(text) if m.group(2) == "?"}
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
                if cmd[0] == "/bin/sh":  # a shell script of mc calls
                    for part in re.split(r"&&|;", cmd[2]):
                        words = shlex.split(part)
                        assert words[0] in clis and words[1] in clis[words[0]], (name, words)
                else:
                    binary = cmd[0] if cmd[0] in clis else "minio"  # minio's entrypoint is `minio`
                    sub = cmd[1] if binary == cmd[0] else cmd[0]
                    assert sub in clis[binary], (name, cmd)
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
