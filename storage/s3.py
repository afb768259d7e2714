"""The S3-compatible backend (s3fs): conditional PUTs for control objects, async s3fs inside zarr.

Endpoint and credentials: :func:`s3_options` is the one place that reads the endpoint from the environment
(``XWIN_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL``); botocore reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

from zarr.abc.store import Store as ZarrStore

from xwin.storage.backend import Backend
from xwin.storage.errors import ConflictError
from xwin.storage.retry import retry


def s3_options(storage_options: dict | None = None) -> dict:
    """s3fs options: explicit ``storage_options`` first, else the endpoint from XWIN_S3_ENDPOINT / AWS_ENDPOINT_URL.

    Credentials are never read here: botocore takes AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
    Every S3 client of the project (the store, the landing scan, the reports beside the store) uses this.
    """
    opts = dict(storage_options or {})
    endpoint = os.environ.get("XWIN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    ck = dict(opts.get("client_kwargs") or {})
    if endpoint and "endpoint_url" not in ck and "endpoint_url" not in opts:
        ck["endpoint_url"] = endpoint
    if ck:
        opts["client_kwargs"] = ck
    return opts


def s3_filesystem(storage_options: dict | None = None, *, asynchronous: bool = False):
    """An ``s3fs.S3FileSystem`` configured by :func:`s3_options` (retries raised to 8)."""
    import s3fs

    fs = s3fs.S3FileSystem(asynchronous=asynchronous, **s3_options(storage_options))
    fs.retries = 8
    return fs


class S3Backend(Backend):
    """``s3://bucket/prefix`` through s3fs (sync for control objects, async inside zarr)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3 url: {url!r}")
        self.url = url.rstrip("/")
        self.path = self.url[len("s3://") :]
        if not self.path:
            raise ValueError(f"s3 url {url!r} names no bucket")
        self.bucket = self.path.split("/", 1)[0]
        self.opts = s3_options(storage_options)  # the endpoint is resolved once, when the store is opened
        self.fs = s3_filesystem(storage_options)

    def _k(self, key: str) -> str:
        return f"{self.path}/{key}"

    def _split(self, key: str) -> tuple[str, str]:
        full = self._k(key)
        b, k = full.split("/", 1)
        return b, k

    def _conditional_error(self, key: str, e: BaseException) -> ConflictError | None:
        """The ConflictError of a failed precondition (412 / 409 ConditionalRequestConflict, or the object gone
        under If-Match), else None. s3fs wraps botocore's ClientError in an OSError: the chain is searched."""
        from botocore.exceptions import ClientError

        seen: BaseException | None = e
        while seen is not None:
            if isinstance(seen, ClientError):
                code = str(seen.response.get("Error", {}).get("Code", ""))
                status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status == 412:
                    return ConflictError(f"{key}: {code or status}")
            msg = str(seen)
            if any(m in msg for m in ("PreconditionFailed", "pre-conditions you specified", "ConditionalRequest")):
                return ConflictError(f"{key}: precondition failed")
            if isinstance(seen, FileNotFoundError):
                return ConflictError(f"{key}: vanished")
            seen = seen.__cause__ or seen.__context__
        return None

    def get(self, key: str) -> tuple[bytes, str] | None:
        """One GET: the bytes and the ETag the server sent with them (never a checksum computed here)."""
        from fsspec.asyn import sync

        bucket, k = self._split(key)

        async def fetch() -> tuple[bytes, str] | None:
            try:
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=k)
            except FileNotFoundError:
                return None
            async with resp["Body"] as body:
                data = await body.read()
            return data, str(resp["ETag"]).strip('"')

        return retry(lambda: sync(self.fs.loop, fetch), what=f"get {key}")

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        bucket, k = self._split(key)
        cond: dict[str, str] = {}
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        if if_match is not None:
            cond["IfMatch"] = f'"{if_match}"'

        def go() -> str:
            try:
                resp = self.fs.call_s3("put_object", Bucket=bucket, Key=k, Body=data, **cond)
            except Exception as e:
                conflict = self._conditional_error(key, e) if cond else None
                if conflict is not None:
                    raise conflict from e
                raise
            finally:
                self.fs.invalidate_cache(self._k(key))
            return str(resp["ETag"]).strip('"')

        return retry(go, what=f"put {key}")

    def put_pieces(self, key: str, pieces: Iterable[bytes]) -> None:
        bucket, k = self._split(key)
        data = b"".join(pieces)

        def go() -> None:
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=k, Body=data)
            finally:
                self.fs.invalidate_cache(self._k(key))

        retry(go, what=f"put {key}")

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        if if_match is None:

            def go() -> None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._k(key))

            retry(go, what=f"delete {key}")
            return
        bucket, k = self._split(key)

        def go_if() -> None:
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=k, IfMatch=f'"{if_match}"')
            except Exception as e:
                conflict = self._conditional_error(key, e)
                if conflict is not None:
                    raise conflict from e
                raise
            finally:
                self.fs.invalidate_cache(self._k(key))

        retry(go_if, what=f"delete {key}")

    def exists(self, key: str) -> bool:
        return retry(lambda: self.fs.exists(self._k(key)), what=f"exists {key}")

    def size(self, key: str) -> int:
        return int(retry(lambda: self.fs.size(self._k(key)), what=f"size {key}"))

    def get_range(self, key: str, start: int, end: int | None) -> bytes:
        return retry(lambda: self.fs.cat_file(self._k(key), start=start, end=end), what=f"get_range {key}")

    def get_ranges(self, key: str, ranges) -> list[bytes]:
        if not ranges:
            return []
        p = self._k(key)
        return retry(
            lambda: self.fs.cat_ranges([p] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges]),
            what=f"get_ranges {key}",
        )

    def list(self, prefix: str, *, include_partial: bool = False) -> list[str]:
        base = self._k(prefix).rstrip("/")

        def go() -> list[str]:
            self.fs.invalidate_cache(base)
            try:
                found = self.fs.find(base)
            except FileNotFoundError:
                return []
            return found

        n = len(self.path) + 1
        # keys strictly below a folder prefix ("a/b/"): s3fs answers a prefix with no objects left under it with the
        # prefix itself when the server keeps directory entries (SeaweedFS does), which is not an object of ours
        found = retry(go, what=f"list {prefix}")
        if prefix.endswith("/"):
            found = [p for p in found if p != base]
        return sorted(p[n:] for p in found)

    def zarr_store(self, sub: str = "") -> ZarrStore:
        from zarr.storage import FsspecStore

        fs = s3_filesystem(self.opts, asynchronous=True)
        return FsspecStore(fs=fs, path=f"{self.path}/{sub}" if sub else self.path)
