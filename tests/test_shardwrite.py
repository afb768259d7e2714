"""xwin.storage.shardwrite: shards byte-identical to zarr-python's, readable by zarr-python, verified after writing."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from xwin.storage.entry import write_entry
from xwin.storage.errors import ChecksumMismatch
from xwin.storage.local import LocalBackend
from xwin.storage.shardwrite import Crc32cTee, cast, encode_shard, shard_layout, zarr_reference_write

RNG = np.random.default_rng(3)
CASES = [
    # (name, data, chunks, codec): every kind of array the store writes
    (
        "views_f32",
        RNG.gamma(2.0, 1.5, (6, 32, 24)).astype(np.float32),
        (1, 32, 24),
        BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4),
    ),
    (
        "views_f16",
        RNG.gamma(2.0, 1.5, (6, 32, 24)).astype(np.float16),
        (1, 32, 24),
        BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2),
    ),
    (
        "hu_edge",
        RNG.integers(-1000, 3000, (20, 24, 37)).astype(np.int16),
        (20, 24, 16),  # 37 = 2*16 + 5: padded edge
        BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2),
    ),
    ("pose_f64", RNG.normal(size=(6, 4, 4)), (6, 4, 4), ZstdCodec(level=3)),
    ("index_i32", np.arange(6, dtype=np.int32), (6,), ZstdCodec(level=3)),
]


@pytest.mark.parametrize("name,data,chunks,codec", CASES, ids=[c[0] for c in CASES])
def test_shard_bytes_identical_to_zarr(tmp_path, name, data, chunks, codec):
    g = zarr.create_group(str(tmp_path / "ref"), zarr_format=3)
    zarr_reference_write(g, "a", data, chunks, codec)  # zarr-python's own write path
    lay = shard_layout(data.shape, data.dtype, chunks, codec)
    ref_shard = (tmp_path / "ref" / "a" / lay.shard_key).read_bytes()
    ours = b"".join(encode_shard(data, lay, codec))
    assert ours == ref_shard
    assert lay.zarr_json == (tmp_path / "ref" / "a" / "zarr.json").read_bytes()


def test_write_entry_is_read_by_zarr(tmp_path):
    b = LocalBackend(tmp_path)
    arrays = [(n, d, c, k) for n, d, c, k in CASES]
    write_entry(b, "e", {"checksum": "x", "nested": {"a": [1, 2]}}, arrays)
    grp = zarr.open_group(str(tmp_path / "e"), mode="r", zarr_format=3)
    assert dict(grp.attrs) == {"checksum": "x", "nested": {"a": [1, 2]}}
    for n, d, _, _ in CASES:
        got = grp[n][...]
        assert got.dtype == d.dtype and np.array_equal(got, d), n
    # the direct reader of single-chunk arrays (ring metadata) agrees with zarr; multi-chunk arrays are not its job
    from xwin.storage.fastread import read_small_array

    for n, d, c, _ in CASES:
        got = read_small_array(b, f"e/{n}")
        if c == d.shape:
            assert got is not None and got.dtype == d.dtype and np.array_equal(got, d), n
        else:
            assert got is None, n
    assert not list((tmp_path / "e").rglob("*.tmp"))


def test_write_entry_detects_a_bad_read_back(tmp_path, monkeypatch):
    b = LocalBackend(tmp_path)
    orig = b.read_all

    def flipped(key):
        data = bytearray(orig(key))
        data[len(data) // 2] ^= 0x01
        return bytes(data)

    monkeypatch.setattr(b, "read_all", flipped)
    with pytest.raises(ChecksumMismatch, match="crc32c"):
        write_entry(b, "e", {}, [CASES[0]])


def test_crc_tee_matches_whole_object():
    import google_crc32c

    data, chunks, codec = CASES[0][1:]
    lay = shard_layout(data.shape, data.dtype, chunks, codec)
    tee = Crc32cTee(encode_shard(data, lay, codec))
    blob = b"".join(tee)
    assert tee.nbytes == len(blob) and tee.crc == google_crc32c.value(blob)
    # the index at the end points at every chunk, in C order, back to back
    ix = np.frombuffer(blob[-(16 * 6 + 4) : -4], dtype="<u8").reshape(6, 2)
    assert ix[0, 0] == 0 and np.all(ix[1:, 0] == np.cumsum(ix[:-1, 1]))


def test_float16_conversion_matches_numpy_rounding():
    """The fast float32 -> float16 cast of the write path rounds exactly like numpy (ties to even, subnormals, inf)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 1 << 20).astype(np.float32) * rng.choice([1e-7, 1e-3, 1.0, 1e3, 1e5], 1 << 20).astype(
        np.float32
    )
    x[:6] = [65504.0, 65520.0, 1e9, -1e9, 2.0**-25, 1.0 + 2.0**-11]  # max, overflow edge, inf, tiny, a tie
    got = cast(x.reshape(16, 256, 256), np.dtype(np.float16))
    assert got.dtype == np.float16 and got.flags.c_contiguous
    with np.errstate(over="ignore"):  # 1e9 -> inf is the expected result
        want = x.astype(np.float16)
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint16), want.view(np.uint16))
    back = cast(got, np.dtype(np.float32))  # and back: exact widening, inf stays inf
    np.testing.assert_array_equal(back, got.astype(np.float32))
