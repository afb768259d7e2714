"""Training inputs that cannot work are one line before training starts, also under torchrun: a stream with fewer
batches an epoch than ranks, an action step that is not a multiple of the dataset's yaw step."""

from __future__ import annotations

import itertools
import re
import subprocess

import numpy as np
import pytest
from procs import torchrun_xwin
from typer.testing import CliRunner

from xwin.flows.cli import app
from xwin.schemas.render import RenderSpec
from xwin.training.data.sampling import XWinSampling
from xwin.training.data.stream import ResumableStream
from xwin.training.loop import action_step_problem, shard_problem


class _Items(ResumableStream):
    """A stream of ``n`` items (the sharding under test is the base class's)."""

    def __init__(self, n: int, **kw) -> None:
        super().__init__(**kw)
        self.n = n

    def _keys(self) -> list[str]:
        return [f"v{i}" for i in range(self.n)]

    def _load(self, key: str, draw: int, rng: np.random.Generator) -> dict | None:
        return {"key": key}


def _empty_rank(n: int, bs: int, draws: int, world: int, drop: bool) -> bool:
    """Does some rank get no batch an epoch? Asked of the stream's own sharding, rank by rank."""
    for r in range(world):
        s = _Items(n, batch_size=bs, draws_per_item=draws, drop_last=drop, rank=r, world_size=world)
        if not s.shard():
            return True
    return False


def test_shard_problem_exactly_when_a_rank_would_get_no_batch():
    for n, bs, draws, world, drop in itertools.product(
        (1, 2, 3, 5), (1, 2, 4), (1, 3), (2, 3, 4), (False, True)
    ):  # fmt: skip
        s = _Items(n, batch_size=bs, draws_per_item=draws, drop_last=drop)
        p = shard_problem("data", s, "data.batch_size", world)
        assert (p is not None) == _empty_rank(n, bs, draws, world, drop), (n, bs, draws, world, drop, p)
        if p is None:
            continue
        assert p.startswith(f"data: {n} volume") and f"fewer than the {world} ranks" in p
        # each fix the line offers works
        m = re.search(r"data\.batch_size to (\d+) or less", p)
        if m:
            assert not _empty_rank(n, int(m.group(1)), draws, world, drop)
        m = re.search(r"data\.draws_per_volume to (\d+) or more", p)
        assert m, p
        assert not _empty_rank(n, bs, int(m.group(1)), world, drop)
    assert shard_problem("data", _Items(1, batch_size=4), "data.batch_size", 1) is None  # one process: no check


def test_action_step_problem_agrees_with_the_sampler():
    for yaw, step in itertools.product((1.5, 2.0, 3.0), (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 4.5, 6.0, 7.0, 9.0)):
        spec = RenderSpec(height=64, width=64, pixel_mm=8.0, n_views=int(360 / yaw), yaw_step_deg=yaw)
        p = action_step_problem(step, yaw, "dataset c/h")
        try:
            XWinSampling(step_deg=step).plan(spec)
            ok = True
        except ValueError:
            ok = False
        assert (p is None) == ok, (yaw, step, p)
        if p is not None:
            fit = float(p.split("set data.step_deg to ")[1].split(" ")[0])
            assert fit >= step and action_step_problem(fit, yaw, "x") is None
            XWinSampling(step_deg=fit).plan(spec)  # the suggested step samples
            assert f"data.step_deg = {step:g}" in p and f"yaw step {yaw:g} of dataset c/h" in p
    assert action_step_problem(None, 3.0, "x") is None  # null: the dataset's own step


def test_train_with_a_step_that_does_not_fit_is_one_line(tmp_path, rendered_dataset):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--store", rendered_dataset.url, "--max-steps", "1", "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--device", "cpu", "--set", "data.num_workers=0", "--set", "data.step_deg=4"])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert lines == [
        f"error: data.step_deg = 4: the action step must be a multiple of the yaw step 3 of dataset "
        f"small/{rendered_dataset.spec.spec_hash}: set data.step_deg to 6 (or another multiple of 3, or null for "
        "the yaw step itself), or train on a dataset rendered with a yaw step that divides 4"
    ], r.output
    assert not out.exists()


def test_a_failing_command_prints_only_on_rank_0(tmp_path, monkeypatch):
    """Under torchrun every rank meets the same bad input; only rank 0 says so, every rank exits 2."""
    args = ["train", "--preset", "tiny", "--store", str(tmp_path / "nowhere"), "--max-steps", "1"]
    monkeypatch.setenv("RANK", "1")
    r1 = CliRunner().invoke(app, args)
    monkeypatch.setenv("RANK", "0")
    r0 = CliRunner().invoke(app, args)
    assert r1.exit_code == r0.exit_code == 2
    assert r1.output == "" and r0.output.startswith("error: ") and len(r0.output.splitlines()) == 1


@pytest.mark.slow
def test_torchrun_fewer_batches_than_ranks_is_one_line(tmp_path, rendered_dataset):
    """3 volumes in batches of 4 make one batch an epoch for 2 ranks: refused before training, by rank 0 only."""
    out = tmp_path / "ddp"
    cmd = torchrun_xwin(2, "train", "--preset", "tiny", "--store", rendered_dataset.url, "--max-steps", "1")
    cmd += ["--out", str(out), "--device", "cpu", "--set", "data.num_workers=0", "--set", "data.batch_size=4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert errors == [
        "error: data: 3 volumes x 1 draw = 3 samples an epoch make 1 batch of 4, fewer than the 2 ranks (each rank "
        "needs a batch every epoch): run on at most 1 rank, or set data.batch_size to 2 or less, or set "
        "data.draws_per_volume to 2 or more"
    ], res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr  # torchrun's report: the ranks exited 2
    assert "/xwin/" not in res.stderr and "RuntimeError" not in res.stderr  # no traceback of ours from any rank
    assert not out.exists()  # refused before anything was written
