"""Whole-shard writes of xwin arrays, byte-identical to what zarr-python writes (docs/format.md, "Write path").

Every data array of the store is ONE shard (``sharding_indexed``, index at the end with crc32c, every chunk
written). zarr-python encodes such a shard one chunk at a time through its async codec pipeline, buffers the whole
shard, and then needs a full decode to read it back: much slower than writing the same bytes raw
(docs/benchmarks.md, Store). Here the layout is fixed by us, so we

* take the array metadata document (``zarr.json``) from zarr-python itself (created once per array shape/dtype/codec
  in an in-memory zarr store and cached), so the metadata can never drift from what zarr reads;
* encode the chunks with the same numcodecs codecs zarr uses, on a small thread pool (blosc/zstd release the GIL),
  while already-encoded chunks stream to the backend (local: chunked writes + fsync overlap the encoding);
* append the shard index (offset, nbytes per chunk, little-endian uint64, C order) and its crc32c;
* return the crc32c of the whole shard so the caller verifies the stored object by reading back raw bytes
  (no decode) and comparing.

``tests/test_shardwrite.py`` checks byte identity with zarr-python's own output for every codec and array kind the
store uses, and that zarr-python reads our shards back to the same values.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import MemoryStore

from xwin.storage.pools import process_pool

SHARD_KEY = "c/0/0/0"  # the one shard of a 3-D array (default chunk key encoding, "/" separator)
_EMPTY = 2**64 - 1

ENCODE_THREADS = max(1, min(4, os.cpu_count() or 1))  # blosc/zstd release the GIL: one thread per core, at most 4


def encode_pool() -> ThreadPoolExecutor:
    """This process's encoder pool."""
    return process_pool("encode", ENCODE_THREADS)


def numcodec_of(codec: BloscCodec | ZstdCodec) -> numcodecs.abc.Codec:
    """The numcodecs codec zarr-python uses for ``codec`` (same configuration, hence the same bytes)."""
    if isinstance(codec, BloscCodec):
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.name]
        return numcodecs.Blosc.from_config(
            {
                "cname": codec.cname.name,
                "clevel": codec.clevel,
                "shuffle": shuffle,
                "blocksize": codec.blocksize,
                "typesize": codec.typesize,
            }
        )
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd.from_config({"level": codec.level, "checksum": codec.checksum})
    raise TypeError(f"no direct encoder for codec {codec!r}")


@dataclass(frozen=True)
class ShardLayout:
    """One array stored as a single shard: its zarr.json document and how to encode its chunks."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    fill_value: float | int
    zarr_json: bytes  # the array metadata document exactly as zarr-python writes it
    codec_json: str  # the compressor's zarr configuration (cache key / reproducibility)

    @property
    def grid(self) -> tuple[int, ...]:
        """Chunks per shard along each axis (the shard covers the whole array)."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    @property
    def shard_key(self) -> str:
        return "c/" + "/".join("0" for _ in self.shape)


def whole_shard(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    """The shard shape that holds the whole array: ``shape`` rounded up to whole ``chunks``."""
    return tuple(-(-s // c) * c for s, c in zip(shape, chunks))


@lru_cache(maxsize=64)
def _layout_cached(shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], codec_json: str, fill) -> ShardLayout:
    codec = _codec_from_json(codec_json)
    ms = MemoryStore()
    zarr.create_array(
        ms,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        shards=whole_shard(shape, chunks),
        compressors=codec,
        fill_value=fill,
        zarr_format=3,
        config={"write_empty_chunks": True},
    )
    doc = ms._store_dict["zarr.json"].to_bytes()
    return ShardLayout(tuple(shape), np.dtype(dtype), tuple(chunks), fill, doc, codec_json)


def _codec_from_json(codec_json: str) -> BloscCodec | ZstdCodec:
    d = json.loads(codec_json)
    if d["name"] == "blosc":
        return BloscCodec.from_dict(d)
    if d["name"] == "zstd":
        return ZstdCodec.from_dict(d)
    raise ValueError(f"no direct encoder for codec {d['name']!r}")


def shard_layout(
    shape: tuple[int, ...], dtype, chunks: tuple[int, ...], codec: BloscCodec | ZstdCodec, fill=0
) -> ShardLayout:
    """Layout (and zarr.json, from zarr-python) of a ``shape`` array of ``chunks`` stored as one shard."""
    if len(shape) != len(chunks) or any(c <= 0 for c in chunks):
        raise ValueError(f"chunks {chunks} do not fit shape {shape}")
    return _layout_cached(
        tuple(int(s) for s in shape),
        np.dtype(dtype).name,
        tuple(int(c) for c in chunks),
        json.dumps(codec.to_dict(), sort_keys=True),
        fill,
    )


def cast(a: np.ndarray, dtype: np.dtype, *, import_torch: bool = True) -> np.ndarray:
    """``a`` as C-contiguous little-endian ``dtype``. float32 <-> float16 go through torch when it is available:
    bit-identical to numpy's cast (round to nearest even; tests/test_shardwrite.py) and several times faster
    (numpy's float16 casts are not vectorised; docs/benchmarks.md, Store). ``import_torch=False`` uses torch only if
    the process already imported it (light readers do not pay torch's import). storage never requires torch."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if {dtype.name, a.dtype.name} == {"float16", "float32"} and a.dtype.byteorder in "=<|":
        torch = _torch() if import_torch else sys.modules.get("torch")
        if torch is not None:
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.to(torch.float16 if dtype == np.float16 else torch.float32).numpy()
    return np.ascontiguousarray(a, dtype=dtype)


@lru_cache(maxsize=1)
def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a project dependency
        return None
    return torch


def _chunk_bytes(data: np.ndarray, lay: ShardLayout, ix: tuple[int, ...], check: Callable | None = None) -> np.ndarray:
    """Chunk ``ix`` as zarr's ``bytes`` codec sees it: ``lay.dtype`` little-endian, C order, edge chunks padded with
    fill. ``check(part, ix)`` validates the source values first (raises to abort the shard)."""
    sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(ix, lay.chunks, lay.shape))
    part = data[sl]
    if check is not None:
        check(part, ix)
    if part.shape != lay.chunks:
        full = np.full(lay.chunks, lay.fill_value, dtype=data.dtype)
        full[tuple(slice(0, n) for n in part.shape)] = part
        part = full
    return cast(part, lay.dtype).reshape(-1).view(np.uint8)


def encode_shard(
    data: np.ndarray,
    lay: ShardLayout,
    codec: BloscCodec | ZstdCodec,
    *,
    on_chunk: Callable[[np.ndarray], None] | None = None,
    check: Callable[[np.ndarray, tuple[int, ...]], None] | None = None,
) -> Iterator[bytes]:
    """The shard object of ``data`` as pieces (encoded chunks in C order, then index + crc32c), lazily.

    ``data`` may have another dtype than ``lay.dtype``: each chunk is cast inside its encode task. Chunks are
    validated (``check``), cast and encoded on :func:`encode_pool`, in order; a piece is yielded as soon as it is
    ready, so the caller writes while later chunks are still being compressed. ``on_chunk(raw)`` receives each
    chunk's uncompressed bytes (uint8, ``lay.dtype``) in C order of the chunk grid, in the calling thread (e.g. to
    hash the stored values without another pass over the array)."""
    if tuple(data.shape) != lay.shape:
        raise ValueError(f"data shape {data.shape} != layout shape {lay.shape}")
    enc = numcodec_of(codec)
    coords = list(np.ndindex(*lay.grid))
    index = np.full((len(coords), 2), _EMPTY, dtype="<u8")
    offset = 0
    pool = encode_pool()
    window = 2 * ENCODE_THREADS + 2  # bounded read-ahead: memory stays a few chunks, not the whole shard

    def task(ix: tuple[int, ...]) -> tuple[bytes, np.ndarray | None]:
        raw = _chunk_bytes(data, lay, ix, check)
        return bytes(enc.encode(raw)), (raw if on_chunk is not None else None)

    submit = iter(coords)
    futures: list[Future[tuple[bytes, np.ndarray | None]] | None] = [
        pool.submit(task, ix) for ix in [next(submit) for _ in range(min(window, len(coords)))]
    ]
    try:
        for k in range(len(coords)):
            fut = futures[k]
            assert fut is not None
            blob, raw = fut.result()
            futures[k] = None
            nxt = next(submit, None)
            if nxt is not None:
                futures.append(pool.submit(task, nxt))
            if on_chunk is not None and raw is not None:
                on_chunk(raw)
            index[k] = (offset, len(blob))
            offset += len(blob)
            yield blob
    finally:  # abandoned early (error, or the consumer stopped): drop the queued tasks
        for f in futures:
            if f is not None:
                f.cancel()
    body = index.tobytes()
    yield body + np.uint32(google_crc32c.value(body)).astype("<u4").tobytes()


class Crc32cTee:
    """Wraps a piece iterator, computing the crc32c and size of everything that passed through."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self.crc = 0
        self.nbytes = 0

    def __iter__(self) -> Iterator[bytes]:
        for p in self._pieces:
            self.crc = google_crc32c.extend(self.crc, p)
            self.nbytes += len(p)
            yield p


def zarr_reference_write(group, name: str, data: np.ndarray, chunks: tuple[int, ...], compressors) -> None:
    """Create ``name`` in a zarr ``group`` as a single-shard array and write it through zarr-python (the reference
    path: tests and bench/bench_store.py compare :func:`encode_shard` and the store's commit against it)."""
    arr = group.create_array(
        name=name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=whole_shard(data.shape, chunks),
        compressors=compressors,
        fill_value=0,
        overwrite=False,
        config={"write_empty_chunks": True},
    )
    arr[...] = data
