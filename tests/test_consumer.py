"""Training consumer: order, sharding, sampling and resume on a synthetic in-memory ring (no storage needed)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from xwin.schemas.render import RenderSpec
from xwin.training.data import EpochOrder, SyntheticSource, XWinSampling, XWinStream, make_loader, shard_batches
from xwin.training.data.readers import synthetic_view_value

SPEC = RenderSpec(height=24, width=24, n_views=120, yaw_step_deg=3.0)


def _wrap(a):
    return (np.asarray(a, dtype=np.float64) + 180.0) % 360.0 - 180.0


def _key(s):
    return (s["epoch"], s["position"], s["volume_id"], tuple(s["actions"].tolist()), float(s["context_yaw"]))


def _stream(n_volumes=7, **kw):
    kw.setdefault("image_size", 24)
    kw.setdefault("appearance", "none")
    kw.setdefault("seed", 3)
    kw.setdefault("draws_per_volume", 2)
    kw.setdefault("shuffle_window", 5)
    return XWinStream(SyntheticSource(n_volumes, SPEC), **kw)


# --------------------------------------------------------------------------------------------------- order
@pytest.mark.parametrize("window", [1, 4, 7, 1000])
def test_epoch_order_is_a_bounded_permutation(window):
    n_vol, draws = 11, 3
    o = EpochOrder(n_vol, draws, seed=5, epoch=2, shuffle_window=window)
    units = [o.unit(p) for p in range(len(o))]
    assert sorted(units) == [(v, d) for v in range(n_vol) for d in range(draws)]
    # bounded shuffle: each unit sits within its window of the volume-major stream
    vm = {(int(v), d): i * draws + d for i, v in enumerate(o.volume_perm) for d in range(draws)}
    assert all(vm[u] // window == p // window for p, u in enumerate(units))
    # a pure function of (seed, epoch, position): fresh objects and random access agree
    o2 = EpochOrder(n_vol, draws, seed=5, epoch=2, shuffle_window=window)
    assert [o2.unit(p) for p in reversed(range(len(o)))] == units[::-1]
    if window > 1:
        assert [EpochOrder(n_vol, draws, 5, 3, window).unit(p) for p in range(len(o))] != units
        assert [EpochOrder(n_vol, draws, 6, 2, window).unit(p) for p in range(len(o))] != units


@pytest.mark.parametrize(
    "start,total,bs,world,workers,drop_last",
    [
        (0, 50, 4, 1, 1, False),
        (3, 50, 4, 2, 3, False),
        (7, 50, 3, 3, 2, True),
        (0, 5, 4, 2, 2, False),
        (49, 50, 2, 1, 4, True),
    ],
)
def test_shard_batches_partition_and_step_order(start, total, bs, world, workers, drop_last):
    shards = {
        (r, w): shard_batches(start, total, bs, r, world, w, workers, drop_last)
        for r in range(world)
        for w in range(workers)
    }
    flat = [p for s in shards.values() for b in s for p in b]
    expect = list(range(start, total))
    if drop_last:
        expect = expect[: len(expect) // bs * bs]
    assert sorted(flat) == expect and len(flat) == len(set(flat))
    # a DataLoader interleaves workers round-robin: per rank, that yields steps in order; step s of all ranks
    # together covers [start + s*world*bs, start + (s+1)*world*bs)
    for r in range(world):
        seq = [b for group in itertools.zip_longest(*(shards[(r, w)] for w in range(workers))) for b in group if b]
        for s, b in enumerate(seq):
            assert b.start == start + (s * world + r) * bs


# --------------------------------------------------------------------------------------------------- sampling
def test_direct_actions_match_views_read():
    ds = _stream()
    plan_k = 90 // 3
    seen_ctx = set()
    for s in ds:
        a = s["actions"].numpy()
        assert a.shape == (8,) and s["targets"].shape == (8, 1, 24, 24) and s["context"].shape == (1, 24, 24)
        k = a / 3.0
        assert (
            np.allclose(k, np.round(k)) and len(set(k.tolist())) == 8 and np.all(k != 0) and np.all(np.abs(k) <= plan_k)
        )
        np.testing.assert_allclose(s["actions_norm"].numpy(), a / 90.0, rtol=1e-6)
        np.testing.assert_array_equal(s["actions_cumulative"].numpy(), a)
        # stored yaws of the views returned == context yaw + action
        np.testing.assert_allclose(_wrap(s["target_yaws"].numpy() - float(s["context_yaw"])), a, atol=1e-4)
        # and the pixels are those of exactly those views of that volume (synthetic value = 1000*vol + index)
        n = int(s["volume_id"][1:])
        ctx_idx = SPEC.view_index(float(s["context_yaw"]))
        assert float(s["context"][0, 0, 0]) == synthetic_view_value(n, ctx_idx)
        for t, y in zip(s["targets"], s["target_yaws"].tolist()):
            assert float(t[0, 0, 0]) == synthetic_view_value(n, SPEC.view_index(y))
        seen_ctx.add(float(s["context_yaw"]))
    assert seen_ctx == {0.0, 90.0}


def test_context_mix_step_and_stepwise():
    only_frontal = _stream(sampling=XWinSampling(context_yaws=(0.0, 90.0), context_probs=(1.0, 0.0)))
    assert {float(s["context_yaw"]) for s in only_frontal} == {0.0}
    coarse = _stream(sampling=XWinSampling(step_deg=15.0, n_targets=8))
    for s in coarse:
        k = s["actions"].numpy() / 15.0
        assert np.allclose(k, np.round(k)) and set(np.abs(k).tolist()) <= {1, 2, 3, 4, 5, 6}
    with pytest.raises(ValueError, match="multiple"):
        XWinSampling(step_deg=4.0).plan(SPEC)
    with pytest.raises(ValueError, match="only 6 target offsets"):
        XWinSampling(step_deg=30.0, n_targets=8).plan(SPEC)
    step = _stream(sampling=XWinSampling(mode="stepwise"))
    for s in step:
        cum, act = s["actions_cumulative"].numpy(), s["actions"].numpy()
        d = np.diff(np.concatenate([[0.0], cum]))
        np.testing.assert_allclose(act, d)  # each action is the rotation from the previous view
        assert np.all(np.sign(cum) == np.sign(cum[0])) and np.all(np.diff(np.abs(cum)) > 0)  # monotone trajectory
        np.testing.assert_allclose(_wrap(s["target_yaws"].numpy() - float(s["context_yaw"])), cum, atol=1e-4)


def test_appearance_and_resize():
    s = next(iter(_stream(appearance="minmax", image_size=12)))
    assert s["context"].shape == (1, 12, 12) and s["targets"].shape == (8, 1, 12, 12)
    for img in torch.cat([s["context"][None], s["targets"]]):
        # synthetic views are a column ramp 0..1 after min-max; antialiased resize keeps the monotone ramp in [0,1]
        row = img[0, 0].numpy()
        assert row.min() >= 0 and row.max() <= 1 and np.all(np.diff(row) > 0)
        ref = torch.nn.functional.interpolate(
            torch.linspace(0, 1, 24).expand(1, 1, 24, 24), size=(12, 12), mode="bilinear", antialias=True
        )
        torch.testing.assert_close(img[None], ref, atol=2e-4, rtol=0)  # float32 ramp on a 1e3 offset


def test_batches_and_ranks_disjoint():
    full = [_key(s) for s in _stream()]
    assert [k[1] for k in full] == list(range(14))
    got = []
    for r in range(3):
        ds = _stream(rank=r, world_size=3, batch_size=2)
        for b in ds:
            assert b["context"].shape == (len(b["volume_id"]), 1, 24, 24) and b["targets"].shape[1:] == (8, 1, 24, 24)
            got += [
                (e, p, v, tuple(a.tolist()), float(c))
                for e, p, v, a, c in zip(b["epoch"], b["position"], b["volume_id"], b["actions"], b["context_yaw"])
            ]
    assert sorted(got) == sorted(full) and len(set(got)) == len(got)


def test_epochs_reshuffle_and_state_advances():
    ds = _stream()
    e0 = [_key(s) for s in ds]
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["position"] == 0
    e1 = [_key(s) for s in ds]
    assert [k[2] for k in e0] != [k[2] for k in e1]
    assert sorted(k[2] for k in e0) == sorted(k[2] for k in e1)  # same volumes, each draws_per_volume times


def test_resume_in_process():
    full = [_key(s) for s in _stream()]
    ds = _stream()
    head = [_key(s) for s in itertools.islice(iter(ds), 5)]
    state = ds.state_dict()
    assert state["position"] == 5
    ds2 = _stream()
    ds2.load_state_dict(state)
    assert head + [_key(s) for s in ds2] == full
    with pytest.raises(ValueError, match="seed"):
        _stream(seed=4).load_state_dict(state)


def test_resume_across_worker_counts():
    """Stop after k samples with 2 workers; resume with 1 and with 3: each union is the uninterrupted stream."""
    full = [_key(s) for s in _stream(n_volumes=9)]  # 18 samples, main process
    ds = _stream(n_volumes=9)
    loader = make_loader(ds, num_workers=2)
    head = []
    for s in loader:
        head.append(_key(s))
        if len(head) == 7:
            break
    state = loader.state_dict()
    assert state["position"] == 7 and head == full[:7]
    for workers in (1, 3):
        ds2 = _stream(n_volumes=9)
        loader2 = make_loader(ds2, num_workers=workers)
        loader2.load_state_dict(state)
        tail = [_key(s) for s in loader2]
        assert head + tail == full
        assert loader2.state_dict() == {**state, "epoch": 1, "position": 0}
    # the 3-worker loader keeps its workers for the next epoch, which matches the in-process epoch 1
    ref = _stream(n_volumes=9)
    ref.set_epoch(1)
    dl = loader2._dl
    assert [_key(s) for s in loader2] == [_key(s) for s in ref] and loader2._dl is dl


# --------------------------------------------------------------------------------------------- fast batch assembly
def test_appearance_into_matches_reference_transforms():
    from xwin.pipeline.render.appearance import minmax
    from xwin.training.data.transforms import appearance_into, apply_appearance, resize

    rng = np.random.default_rng(0)
    views = (rng.random((9, 24, 24)) * 7 + 2).astype(np.float32)
    views[3] = 5.0  # a constant view: min-max gives 0, like the reference
    out = torch.empty(9, 1, 24, 24)
    appearance_into(views, "minmax", out)
    ref = np.stack([minmax(v) for v in views])
    np.testing.assert_array_equal(out[:, 0].numpy(), ref)  # in-place path is bit-identical to the definition
    assert float(out[3].abs().max()) == 0.0
    # float16 rings: widened exactly, then the same arithmetic
    v16 = views.astype(np.float16)
    appearance_into(list(v16), "minmax", out)
    np.testing.assert_array_equal(out[:, 0].numpy(), np.stack([minmax(v.astype(np.float32)) for v in v16]))
    # half-size outputs: the float32 result rounded once
    for dt in (torch.bfloat16, torch.float16):
        o = torch.empty(9, 1, 24, 24, dtype=dt)
        appearance_into(views, "minmax", o)
        assert torch.equal(o, torch.from_numpy(ref).unsqueeze(1).to(dt))
    # other appearances and resizing go through the reference functions
    for name, S in (("neglog", 24), ("minmax", 12), ("none", 16)):
        o = torch.empty(9, 1, S, S)
        appearance_into(views, name, o)
        torch.testing.assert_close(o, resize(torch.from_numpy(apply_appearance(views, name)).unsqueeze(1), S))


class _HalfReader:
    """A reader whose ``read_views(..., dtype=None)`` returns float16 (a ring stored as float16)."""

    def __init__(self, inner):
        self.inner, self.spec, self.calls = inner, inner.spec, []

    def volume_ids(self):
        return self.inner.volume_ids()

    def read_views(self, volume_id, indices, dtype=np.float32):
        self.calls.append(dtype)
        v, meta = self.inner.read_views(volume_id, indices)
        return v.astype(np.float16 if dtype is None else dtype), meta


class _HalfSource:
    def __init__(self, n):
        self.inner = SyntheticSource(n, SPEC)

    def open(self):
        return _HalfReader(self.inner.open())


def test_output_dtypes_and_stored_float16_views():
    ref = _stream(appearance="minmax", batch_size=4)
    half = _stream(appearance="minmax", batch_size=4, dtype="bfloat16")
    for b32, b16 in itertools.islice(zip(ref, half), 3):
        assert b16["context"].dtype == torch.bfloat16 and b16["targets"].dtype == torch.bfloat16
        assert b32["context"].dtype == torch.float32 and b32["targets"].shape == b16["targets"].shape
        assert torch.equal(b32["targets"].to(torch.bfloat16), b16["targets"])
        assert b32["volume_id"] == b16["volume_id"] and torch.equal(b32["actions"], b16["actions"])
    with pytest.raises(ValueError, match="output dtype"):
        _stream(dtype="int8")
    # a reader that can return the stored dtype is asked for it (dtype=None); float16 views are widened exactly
    ds = XWinStream(_HalfSource(7), image_size=24, appearance="minmax", seed=3, draws_per_volume=2, shuffle_window=5)
    s, r = ds.sample_at(5), _stream(appearance="minmax").sample_at(5)
    assert ds.reader.calls and all(c is None for c in ds.reader.calls)
    assert s["volume_id"] == r["volume_id"] and torch.equal(s["actions"], r["actions"])
    # independent reference: the same views rounded to float16, widened, then the min-max definition
    from xwin.pipeline.render.appearance import minmax

    want = [SPEC.view_index(float(s["context_yaw"]))] + [SPEC.view_index(float(y)) for y in s["target_yaws"]]
    raw = SyntheticSource(7, SPEC).open().read_views(s["volume_id"], want)[0].astype(np.float16).astype(np.float32)
    got = torch.cat([s["context"][None], s["targets"]])[:, 0].numpy()
    np.testing.assert_array_equal(got, np.stack([minmax(v) for v in raw]))


# ------------------------------------------------------------------------------------------- reused batch buffers
def _images(b):
    return b["context"].clone(), b["targets"].clone(), list(b["volume_id"])


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_buffers_are_reused_but_never_while_the_consumer_holds_them(workers):
    """Batches are assembled in reused memory (no fresh 100 MB per batch at 512²); a batch the consumer still holds,
    or a numpy view of one, is never overwritten: values equal a stream that allocates every batch afresh."""
    ref = [_images(b) for e in range(4) for b in _fresh_epoch(e)]  # 4 epochs x 5 batches, fresh memory
    ds = _stream(n_volumes=9, batch_size=4)
    loader = make_loader(ds, num_workers=workers)
    # 1. a training loop: holds one batch at a time -> buffers are recycled
    ptrs, got = set(), []
    for _ in range(2):
        for b in loader:
            ptrs.add(b["targets"].data_ptr())
            got.append(_images(b))
    _assert_same(got, ref[:10])
    if workers:
        slots = loader._slots
        assert slots.retired == 0 and len(ptrs) <= workers * slots.per_worker
    else:
        assert ds._local_buffers.allocated <= 2 and len(ptrs) <= 2
    # 2. a consumer that keeps every batch (and a numpy view of one): nothing it holds changes
    held = list(loader)
    arr = held[0]["targets"].numpy()
    first = arr.copy()
    held += list(loader)
    _assert_same([_images(b) for b in held], ref[10:])
    np.testing.assert_array_equal(arr, first)
    assert len({b["targets"].data_ptr() for b in held}) == len(held)  # all distinct memory
    if workers:
        assert loader._slots.retired > 0  # held slots were given fresh memory instead of being waited on


def _fresh_epoch(epoch):
    ds = _stream(n_volumes=9, batch_size=4, reuse_buffers=False)
    ds.set_epoch(epoch)
    return list(ds)


def _assert_same(got, ref):
    assert len(got) == len(ref)
    for (c, t, v), (rc, rt, rv) in zip(got, ref):
        assert v == rv
        assert torch.equal(c, rc) and torch.equal(t, rt)


def test_close_stops_the_workers_at_once():
    """``close()`` ends the persistent workers now (a benchmark or a resume must not share the CPU with them)."""
    loader = make_loader(_stream(n_volumes=9, batch_size=4), num_workers=2)
    next(iter(loader))
    procs = list(loader._dl._iterator._workers)
    assert len(procs) == 2 and all(p.is_alive() for p in procs)
    loader.close()
    assert loader._dl is None and not any(p.is_alive() for p in procs)


def test_too_little_shared_memory_is_a_clear_error(monkeypatch):
    """Slots are checked against /dev/shm up front (a full /dev/shm would SIGBUS a worker at its first write)."""
    import multiprocessing as mp
    import os
    from types import SimpleNamespace

    from xwin.training.data.buffers import SharedSlots

    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=16, f_frsize=2**20))  # 16 MiB free
    with pytest.raises(RuntimeError, match=r"2 workers x 4 batch slots need 80 MiB of shared memory .* 16 MiB free"):
        SharedSlots(mp.get_context("spawn"), workers=2, nbytes=10 * 2**20)
    loader = make_loader(_stream(n_volumes=9, batch_size=4), num_workers=2)
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=0, f_frsize=4096))  # /dev/shm full
    with pytest.raises(RuntimeError, match="shm-size"):  # raised by the loader before any worker starts
        next(iter(loader))
