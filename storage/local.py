"""The local-filesystem backend: atomic replacements (write-temp + ``os.replace``) and ``fcntl``-locked CAS.

The compare step holds an ``fcntl`` lock that the kernel releases when a holder dies, so a SIGKILLed writer never
leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from zarr.abc.store import Store as ZarrStore
from zarr.storage import LocalStore

from xwin.storage.backend import Backend, etag_of
from xwin.storage.errors import ConflictError


def _fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable: after a power loss the new name survives with its data (the commit record's
    rename never outlives the renames of the shards it names)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend(Backend):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Exclusive lock serialising conditional puts on ``key`` (released by the kernel if we die)."""
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        # 64 striped lock files: bounded clutter; unrelated keys rarely share a stripe and then only wait briefly
        name = f"{int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 64:02d}.lock"
        fd = os.open(lock_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._p(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, etag_of(data)

    def _write_atomic(self, key: str, data: bytes) -> None:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        _fsync_dir(p.parent)

    def put_pieces(self, key: str, pieces: Iterable[bytes]) -> None:
        """Stream ``pieces`` into a temporary file (so writing overlaps the producer), fsync, then rename."""
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                for piece in pieces:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            _fsync_dir(p.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def read_all(self, key: str) -> bytes:
        with open(self._p(key), "rb", buffering=0) as f:
            return f.read(os.fstat(f.fileno()).st_size)  # one allocation of the known size, no growing buffer

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        if if_match is None and not if_none_match:
            self._write_atomic(key, data)
            return etag_of(data)
        with self._locked(key):
            cur = self.get(key)
            if if_none_match and cur is not None:
                raise ConflictError(f"{key} already exists")
            if if_match is not None and (cur is None or cur[1] != if_match):
                raise ConflictError(f"{key} changed (expected etag {if_match})")
            self._write_atomic(key, data)
        return etag_of(data)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        if if_match is None:
            with contextlib.suppress(FileNotFoundError):
                self._p(key).unlink()
            return
        with self._locked(key):
            cur = self.get(key)
            if cur is None or cur[1] != if_match:
                raise ConflictError(f"{key} changed (expected etag {if_match})")
            self._p(key).unlink()

    def get_range(self, key: str, start: int, end: int | None) -> bytes:
        return self.get_ranges(key, [(start, end)])[0]

    def get_ranges(self, key: str, ranges) -> list[bytes]:
        out = []
        with open(self._p(key), "rb") as f:
            for a, b in ranges:
                if a < 0:
                    f.seek(a, os.SEEK_END)
                    out.append(f.read())
                else:
                    f.seek(a)
                    out.append(f.read(None if b is None else b - a))
        return out

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def size(self, key: str) -> int:
        return self._p(key).stat().st_size

    def list(self, prefix: str, *, include_partial: bool = False) -> list[str]:
        base = self._p(prefix)
        if not base.exists():
            return []
        out = []
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.endswith(".tmp") and not include_partial:
                    continue
                out.append(str(Path(dirpath, f).relative_to(self.root)).replace(os.sep, "/"))
        return sorted(out)

    def zarr_store(self, sub: str = "") -> ZarrStore:
        root = self.root / sub if sub else self.root
        root.mkdir(parents=True, exist_ok=True)
        return LocalStore(root)
