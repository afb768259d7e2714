"""SSIM inside the patient's body (``xwin.pipeline.reconstruct.metrics``): the body on the reconstruction grid
excludes the table and the air around the patient, and ``ssim_in_body`` scores only the voxels inside it."""

from __future__ import annotations

import numpy as np
import pytest

from xwin.pipeline.reconstruct.grid import ReconGrid
from xwin.pipeline.reconstruct.metrics import body_on_grid, score


def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hu, affine, body truth, table truth): 64 x 64 x 24 at 4 x 4 x 5 mm; an elliptic trunk of soft tissue with
    denser bone-like blobs, lying on a 4-voxel-thick, 180 mm wide table plate behind it (posterior = low j)."""
    X, Y, Z = 64, 64, 24
    i, j = np.meshgrid(np.arange(X), np.arange(Y), indexing="ij")
    trunk = ((i - 32) / 22.0) ** 2 + ((j - 34) / 14.0) ** 2 <= 1.0
    hu = np.full((X, Y, Z), -1000, np.int16)
    hu[trunk] = 40
    hu[(i - 24) ** 2 + (j - 34) ** 2 <= 9] = 700
    hu[(i - 40) ** 2 + (j - 30) ** 2 <= 16] = -700  # a lung-like hole inside the body
    table = np.zeros((X, Y), bool)
    table[10:55, 14:16] = True  # 45 voxels = 180 mm wide, 8 mm thick, posterior to the trunk (j 20..48)
    hu[table] = 200
    A = np.diag([4.0, 4.0, 5.0, 1.0])
    A[:3, 3] = [-126.0, -126.0, -57.5]
    filled = ((i - 32) / 22.0) ** 2 + ((j - 34) / 14.0) ** 2 <= 1.0
    return hu, A, np.repeat(filled[:, :, None], Z, 2), np.repeat(table[:, :, None], Z, 2)


def test_body_on_grid_keeps_the_patient_and_drops_table_and_air():
    hu, A, body, table = phantom()
    got = body_on_grid(hu, A, ReconGrid(hu.shape, A))
    assert got.shape == hu.shape and got.dtype == bool
    assert got[body].all()  # the whole trunk, the lung-like hole included (filled)
    assert not got[table].any()  # the table is not body
    far = ~np.pad(np.ones((54, 38, 24), bool), ((5, 5), (13, 13), (0, 0))) & ~table  # air well outside the skin
    assert not got[far].any()
    assert got.sum() <= 1.3 * body.sum()  # grown by a 2 mm margin, not more
    # on a coarser grid over the same box: resampled, not recomputed at another threshold
    A2 = A.copy()
    A2[:3, :3] *= 2.0
    A2[:3, 3] += np.diag(A)[:3] / 2.0
    coarse = body_on_grid(hu, A, ReconGrid((32, 32, 12), A2))
    assert coarse.shape == (32, 32, 12) and 0.8 < coarse.sum() * 8 / got.sum() < 1.2


def test_ssim_in_body_scores_only_the_body():
    hu, _, body, _ = phantom()
    rng = np.random.default_rng(0)
    ref = np.where(hu > -1000, 0.02 * (1 + hu / 1000.0), 0.0).astype(np.float32)
    mask = np.zeros(hu.shape, bool)
    mask[4:60, 4:60, 4:20] = True
    noise = rng.normal(0, 0.004, hu.shape).astype(np.float32)
    outside_only = ref + np.where(body, 0, noise)  # exact anatomy, streaky air
    inside_only = ref + np.where(body, noise, 0)  # noisy anatomy, clean air
    a = score(ref, outside_only, mask, body)
    b = score(ref, inside_only, mask, body)
    assert a["ssim_in_body"] == pytest.approx(1.0, abs=0.05) and a["psnr_in_body_db"] == float("inf")
    assert a["ssim_in_mask"] < a["ssim_in_body"] - 0.05  # the air in the field of view pulls the mask mean down
    assert b["ssim_in_body"] < b["ssim_in_mask"]  # ... and here the anatomy does
    assert b["ssim_in_body"] < a["ssim_in_body"] - 0.2
    assert a["body_voxels"] == int((mask & body).sum())
    assert "ssim_in_body" not in score(ref, inside_only, mask)  # without a body: the figures it always had
    with pytest.raises(ValueError, match="body mask does not overlap"):
        score(ref, inside_only, mask, np.zeros_like(body))
