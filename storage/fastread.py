"""Direct chunk reads from one xwin views shard (zarr v3 ``sharding_indexed``, index at the end, crc32c).

zarr-python's generic selection path costs more per call than reading the 9 raw views an X-WIN sample needs
(docs/benchmarks.md, Store); the layout is ours (docs/format.md), so the read path reads the shard index once
(checked with its crc32c), then only the byte ranges of the requested chunks, and decodes them with numcodecs.
Anything not in the expected layout returns ``None`` from :func:`shard_reader` and the caller falls back to zarr.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Blosc, Zstd

from xwin.storage.backend import Backend

_EMPTY = np.uint64(2**64 - 1)


class ShardReader:
    def __init__(self, backend: Backend, key: str, shape: tuple[int, int, int], dtype: np.dtype, decode) -> None:
        self.backend, self.key, self.shape, self.dtype, self.decode = backend, key, shape, dtype, decode
        self._index: np.ndarray | None = None

    def index(self) -> np.ndarray:
        """(V, 2) uint64 (offset, nbytes) of each chunk in the shard."""
        if self._index is None:
            n = self.shape[0]
            tail = self.backend.get_range(self.key, -(16 * n + 4), None)
            body, crc = tail[:-4], tail[-4:]
            if np.uint32(google_crc32c.value(body)).tobytes() != crc:
                raise ValueError(f"{self.key}: shard index checksum mismatch")
            self._index = np.frombuffer(body, dtype="<u8").reshape(n, 2)
        return self._index

    def read(self, idx: np.ndarray) -> np.ndarray:
        """(n, H, W) views ``idx`` in stored dtype; each requested chunk is fetched once and decoded in place."""
        ix = self.index()
        _, H, W = self.shape
        out = np.empty((len(idx), H, W), dtype=self.dtype.newbyteorder("<"))
        first: dict[int, int] = {}
        for j, k in enumerate(int(k) for k in idx):
            first.setdefault(k, j)
        present = [k for k in first if ix[k, 0] != _EMPTY]
        ranges = [(int(ix[k, 0]), int(ix[k, 0] + ix[k, 1])) for k in present]
        for k, blob in zip(present, self.backend.get_ranges(self.key, ranges)):
            dst = out[first[k]]
            self.decode(blob, out=dst.reshape(-1).view(np.uint8))
        for k, j in first.items():
            if ix[k, 0] == _EMPTY:  # never written (zarr fill value)
                out[j] = 0
        for j, k in enumerate(int(k) for k in idx):
            if first[k] != j:
                out[j] = out[first[k]]
        return out


def _single_shard(meta: dict[str, Any], chunk_shape: list[int]) -> tuple[np.dtype, Callable[..., Any]] | None:
    """(dtype, decode) when zarr.json ``meta`` describes our layout: the whole array in one ``sharding_indexed`` shard
    (index at the end, little-endian with crc32c) of chunks ``chunk_shape``, each chunk little-endian bytes + one
    zstd/blosc compressor, default "/" chunk keys; None otherwise (the caller falls back to zarr-python)."""
    try:
        if meta["chunk_grid"]["configuration"]["chunk_shape"] != list(meta["shape"]):
            return None
        if meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}:
            return None
        (sh,) = meta["codecs"]
        cfg = sh["configuration"]
        if sh["name"] != "sharding_indexed" or cfg["index_location"] != "end" or cfg["chunk_shape"] != chunk_shape:
            return None
        if [c["name"] for c in cfg["index_codecs"]] != ["bytes", "crc32c"]:
            return None
        if cfg["index_codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            return None
        inner = cfg["codecs"]
        if (
            len(inner) != 2
            or inner[0]["name"] != "bytes"
            or inner[0].get("configuration", {}).get("endian") != "little"
        ):
            return None
        decode = _DECODERS.get(inner[1]["name"])
        if decode is None:
            return None
        return np.dtype(meta["data_type"]).newbyteorder("<"), decode
    except (KeyError, ValueError, TypeError):
        return None


def read_small_array(backend: Backend, array_path: str) -> np.ndarray | None:
    """A whole single-chunk, single-shard array (the per-view metadata arrays of a ring: ``index``, ``yaw_deg``, ...)
    read with two GETs (zarr.json, the shard) and one decode; None if the array is not in that layout (the caller
    falls back to zarr). zarr-python's async machinery costs far more per such array than the two reads."""
    got = backend.get(f"{array_path}/zarr.json")
    if got is None:
        return None
    try:
        meta = json.loads(got[0])
        shape = tuple(meta["shape"])
    except (KeyError, ValueError, TypeError):
        return None
    found = _single_shard(meta, list(shape))
    if found is None:
        return None
    dtype, decode = found
    key = f"{array_path}/c/" + "/".join("0" for _ in shape)
    blob = backend.read_all(key)
    body, crc = blob[-20:-4], blob[-4:]
    if np.uint32(google_crc32c.value(body)).tobytes() != crc:
        raise ValueError(f"{key}: shard index checksum mismatch")
    off, n = (int(x) for x in np.frombuffer(body, dtype="<u8"))
    if off == int(_EMPTY):
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(decode(blob[off : off + n]), dtype=dtype).reshape(shape).copy()


_DECODERS: dict[str, Callable[..., Any]] = {"zstd": Zstd().decode, "blosc": Blosc().decode}


def shard_reader(backend: Backend, array_path: str, meta: dict[str, Any]) -> ShardReader | None:
    """A reader for the single-shard (V, H, W) float array described by zarr.json ``meta``, or None if not our
    layout (one chunk per view)."""
    shape = tuple(meta.get("shape", ()))
    if len(shape) != 3:
        return None
    found = _single_shard(meta, [1, shape[1], shape[2]])
    if found is None or found[0].kind != "f":
        return None
    dtype, decode = found
    return ShardReader(backend, f"{array_path}/c/0/0/0", (shape[0], shape[1], shape[2]), dtype, decode)


def channel_shard_reader(backend: Backend, array_path: str, meta: dict[str, Any]) -> ShardReader | None:
    """A reader for a single-shard (C, V, H, W) float array stored one chunk (C, 1, H, W) per view (a ring's
    ``materials``), or None if not that layout. Its "views" are the chunks as (C*H, W): ``read(idx)`` gives
    (n, C*H, W), which reshapes to (n, C, H, W)."""
    shape = tuple(meta.get("shape", ()))
    if len(shape) != 4:
        return None
    C, V, H, W = shape
    found = _single_shard(meta, [C, 1, H, W])
    if found is None or found[0].kind != "f":
        return None
    dtype, decode = found
    return ShardReader(backend, f"{array_path}/c/0/0/0/0", (V, C * H, W), dtype, decode)
