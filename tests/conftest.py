"""Shared fixtures: the bundled chest CT and a small downsampled copy for fast tests."""

from __future__ import annotations

import contextlib

from jaxtyping import install_import_hook

# Every call the tests make checks the shapes and dtypes the signatures state (jaxtyping + beartype), in the modules
# whose public functions take arrays. Numba kernels are left out (a Python wrapper cannot be called from compiled
# code), and so are the schemas: ViewMeta checks its own shapes with a clear error.
CHECKED_MODULES = [
    "xwin.pipeline.geometry",
    "xwin.pipeline.render.project",
    "xwin.pipeline.render.appearance",
    "xwin.pipeline.render._rays",
    "xwin.pipeline.render.gpu",
    "xwin.pipeline.render.triton_joseph",  # the host code; the kernel (_triton_kernel) must stay unwrapped
    "xwin.pipeline.render.nanodrr_backend",
    "xwin.pipeline.render.diffdrr_backend",
    "xwin.pipeline.render.rtk_backend",
    "xwin.pipeline.reconstruct.fdk",
    "xwin.pipeline.reconstruct.validate",
    "xwin.pipeline.reconstruct.grid",
    "xwin.pipeline.reconstruct.metrics",
    "xwin.pipeline.reconstruct.frames",
    "xwin.pipeline.reconstruct.orbit",
    "xwin.pipeline.reconstruct.fdk_astra",
    "xwin.pipeline.reconstruct.fdk_rtk",
    "xwin.pipeline.reconstruct.report",
    "xwin.storage.dataset",
    "xwin.storage.store",
    "xwin.storage.entry",
    "xwin.pipeline.body",
    "xwin.pipeline.ingest.qc",
    "xwin.pipeline.materials",
    "xwin.pipeline.radiograph",
]
# The hook stays installed for the whole session: a listed module imported later (lazily, by a test or by another
# module's function) is instrumented too. tests/test_shape_checks.py fails on a listed module that is not.
SHAPE_HOOK = install_import_hook(CHECKED_MODULES, "typechecked.typechecker")
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import xwin.pipeline.body  # noqa: E402
import xwin.pipeline.geometry  # noqa: E402
import xwin.pipeline.ingest.qc  # noqa: E402
import xwin.pipeline.reconstruct  # noqa: E402
import xwin.pipeline.render  # noqa: E402
import xwin.storage  # noqa: E402, F401
from xwin.pipeline.example import example_ct_path, example_mask_path  # noqa: E402


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


# ---- S3 (moto server mode) ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random free port) for the whole session; yields its endpoint URL.

    Sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION / AWS_ENDPOINT_URL / XWIN_S3_ENDPOINT for
    the session (subprocesses inherit them) and restores them afterwards. Make buckets with ``make_s3_bucket``.
    """
    import os
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "XWIN_S3_ENDPOINT": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_s3_bucket(endpoint: str, name: str) -> str:
    """Create bucket ``name`` on ``endpoint`` (idempotent); returns ``s3://name``."""
    import boto3

    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
        c.create_bucket(Bucket=name)
    return f"s3://{name}"


# ---- S3 (SeaweedFS: a real S3-compatible server) -------------------------------------------------------------
@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory):
    """SeaweedFS (``weed mini``) serving S3 on 127.0.0.1 for the whole session (tests/seaweed.py); stopped after."""
    from seaweed import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def seaweed_url(seaweed_s3, monkeypatch):
    """A fresh bucket on SeaweedFS, the process environment pointed at it (credentials + endpoint), and its store
    URL ``s3://<bucket>/store``."""
    import uuid

    for k, v in seaweed_s3.env().items():
        monkeypatch.setenv(k, v)
    bucket = f"xwin-{uuid.uuid4().hex[:12]}"
    seaweed_s3.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/store"


# ---- a dataset the pipeline rendered itself (consumer, training tests) -----------------------------------------
RENDERED_SPEC_KW = {"height": 64, "width": 64, "pixel_mm": 8.0}  # 120 views at 3 deg, FOV ~350 mm at the isocentre


@pytest.fixture(scope="session")
def rendered_dataset(tmp_path_factory, small_ct_path):
    """A local store with cohort "small" rendered from ``small_ct_path`` (joseph, 64x64 detector, 120 views x 3 deg).

    Three rings: the rendered ring scaled by 1.0, 0.9 and 1.1 under ids ``small-a/b/c`` (distinct contents, same
    geometry). Returns a SimpleNamespace(url, cohort, spec, volume_ids, rings: dict id -> (V,H,W) float32,
    geometry: ConeBeamViews).
    """
    from types import SimpleNamespace

    from xwin.pipeline.render import render_ring
    from xwin.schemas.render import RenderSpec
    from xwin.storage import open_store

    img = nib.load(str(small_ct_path))
    hu = np.asarray(img.dataobj)
    spec = RenderSpec(**RENDERED_SPEC_KW)
    views, geometry = render_ring(hu, img.affine, spec, backend="joseph")
    url = str(tmp_path_factory.mktemp("rendered_store") / "store")
    ds = open_store(url).dataset("small", spec)
    rings = {}
    for vid, f in (("small-a", 1.0), ("small-b", 0.9), ("small-c", 1.1)):
        rings[vid] = (views * np.float32(f)).astype(np.float32)
        ds.write_ring(vid, rings[vid], geometry.view_meta(), {"source": str(small_ct_path), "scale": f})
    return SimpleNamespace(url=url, cohort="small", spec=spec, volume_ids=sorted(rings), rings=rings, geometry=geometry)


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect server (temporary SQLite database) for every Prefect test of the session; yields its API URL.

    The harness points this process's Prefect settings at the server; pass the URL as PREFECT_API_URL to
    subprocesses (workers, CLI runs) that must reach it.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


def slab(path, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``z0:z1`` of a NIfTI as (int16 HU array, affine of the slab: origin moved to slice ``z0``)."""
    img = nib.load(str(path))
    hu = np.asarray(img.dataobj).astype(np.int16)[:, :, z0:z1].copy()
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ [0, 0, z0] + img.affine[:3, 3]
    return hu, aff
