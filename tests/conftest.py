"""Shared fixtures: the bundled chest CT and a small downsampled copy for fast tests."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest

from pipeline.example import example_ct_path, example_mask_path


@pytest.fixture(scope="session")
def bundled_ct_path():
    return example_ct_path()


@pytest.fixture(scope="session")
def bundled_mask_path():
    return example_mask_path()


def downsample_nifti(src, dst, factors=(4, 4, 2)):
    """Block-average a NIfTI volume by integer ``factors`` and write it with the matching affine.

    Padding (<= -1024) is mapped to -1000 first so it never averages into tissue.
    """
    img = nib.load(str(src))
    a = np.asarray(img.dataobj).astype(np.float32)
    a[a < -1000] = -1000
    fx, fy, fz = factors
    X, Y, Z = (s - s % f for s, f in zip(a.shape, factors))
    a = a[:X, :Y, :Z].reshape(X // fx, fx, Y // fy, fy, Z // fz, fz).mean(axis=(1, 3, 5))
    aff = img.affine.copy()
    aff[:3, :3] = img.affine[:3, :3] @ np.diag(factors)
    # voxel centre of the first block = mean of its members' centres
    aff[:3, 3] = img.affine[:3, :3] @ ((np.asarray(factors) - 1) / 2.0) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(np.round(a).astype(np.int16), aff), str(dst))
    return dst


@pytest.fixture(scope="session")
def small_ct_path(tmp_path_factory, bundled_ct_path):
    """The bundled CT block-averaged 4x4x2: 128x128x66 voxels of 2.81x2.81x5 mm, same world box."""
    d = tmp_path_factory.mktemp("small_ct")
    return downsample_nifti(bundled_ct_path, d / "small_ct.nii.gz")
