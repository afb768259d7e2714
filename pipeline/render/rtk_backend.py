"""RTK backend: ``rtk.JosephForwardProjectionImageFilter`` on our geometry (independent check, speed baseline).

Geometry mapping (RTK, vector form of ``ThreeDCircularProjectionGeometry.AddProjection``): a projection-image
point with physical coordinates (x, y) sits at ``detectorPosition + x * rowVector + y * columnVector``.
We give each view ``detectorPosition`` = centre of pixel (row 0, col 0) in world mm, ``rowVector`` = u/|u|,
``columnVector`` = v/|v|, and the projection stack origin 0, spacing (|u|, |v|, 1), identity direction.
ITK index (i, j, k) of the stack = (column, row, view), i.e. numpy (V, H, W) via GetArrayFromImage.

Volumes: ``itk_image_from_volume(array (X,Y,Z), affine)`` gives an ITK image whose index (i, j, k) is
``array[i, j, k]`` and whose physical point of that index is ``affine @ (i, j, k, 1)`` (origin = affine
translation, spacing = column norms, direction = normalised columns). RTK works in these physical coordinates;
it never needs to know that our world is RAS rather than ITK's LPS because volume and rays share the frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Float, Float32, Float64, Shaped

from xwin.pipeline.geometry import ConeBeamViews


def _rtk():
    import itk
    from itk import RTK as rtk

    return itk, rtk


def itk_image_from_volume(
    array: Shaped[np.ndarray, "X Y Z"], affine: Float[np.ndarray, "4 4"], dtype: np.typing.DTypeLike = np.float32
) -> Any:
    """(X,Y,Z) array + voxel->world affine -> itk.Image with matching index order and physical placement."""
    itk, _ = _rtk()
    A = np.asarray(affine, dtype=np.float64)
    img = itk.image_from_array(np.ascontiguousarray(np.asarray(array, dtype=dtype).transpose(2, 1, 0)))
    spacing = np.linalg.norm(A[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    direction = A[:3, :3] / spacing
    img.SetOrigin([float(x) for x in A[:3, 3]])
    img.SetSpacing([float(x) for x in spacing])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return img


def volume_from_itk_image(img: Any) -> tuple[Shaped[np.ndarray, "X Y Z"], Float64[np.ndarray, "4 4"]]:
    """Inverse of :func:`itk_image_from_volume`: (X,Y,Z) array and voxel->world affine."""
    itk, _ = _rtk()
    arr = itk.array_from_image(img).transpose(2, 1, 0).copy()
    D = np.asarray(itk.array_from_matrix(img.GetDirection()), dtype=np.float64)
    A = np.eye(4)
    A[:3, :3] = D * np.asarray(img.GetSpacing(), dtype=np.float64)
    A[:3, 3] = np.asarray(img.GetOrigin(), dtype=np.float64)
    return arr, A


def rtk_geometry(views: ConeBeamViews) -> Any:
    """``rtk.ThreeDCircularProjectionGeometry`` with one vector-form projection per view (see module doc)."""
    itk, rtk = _rtk()
    g = rtk.ThreeDCircularProjectionGeometry.New()
    H, W = views.height, views.width
    for k in range(len(views)):
        du, dv = np.linalg.norm(views.u[k]), np.linalg.norm(views.v[k])
        if abs(du - np.linalg.norm(views.u[0])) > 1e-9 * du or abs(dv - np.linalg.norm(views.v[0])) > 1e-9 * dv:
            raise ValueError("RTK needs the same pixel pitch in every view (one projection-stack spacing)")
        p00 = views.det[k] - (W - 1) / 2.0 * views.u[k] - (H - 1) / 2.0 * views.v[k]
        src = itk.Point[itk.D, 3]([float(x) for x in views.src[k]])
        det = itk.Point[itk.D, 3]([float(x) for x in p00])
        row = itk.Vector[itk.D, 3]([float(x) for x in views.u[k] / du])
        col = itk.Vector[itk.D, 3]([float(x) for x in views.v[k] / dv])
        if not g.AddProjection(src, det, row, col):
            raise ValueError(f"RTK rejected the geometry of view {k}")
    return g


def projection_stack(views: ConeBeamViews, data: Float[np.ndarray, "V H W"] | None = None) -> Any:
    """An RTK projection stack (float32, ITK index (col, row, view)) matching ``views``; zeros unless ``data``
    (V, H, W) is given."""
    itk, _ = _rtk()
    V, H, W = len(views), views.height, views.width
    arr = np.zeros((V, H, W), np.float32) if data is None else np.ascontiguousarray(data, dtype=np.float32)
    if arr.shape != (V, H, W):
        raise ValueError(f"projection data must have shape {(V, H, W)}, got {arr.shape}")
    img = itk.image_from_array(arr)
    img.SetOrigin([0.0, 0.0, 0.0])
    img.SetSpacing([float(np.linalg.norm(views.u[0])), float(np.linalg.norm(views.v[0])), 1.0])
    return img


def project(
    mu: Float[np.ndarray, "X Y Z"], affine: Float[np.ndarray, "4 4"], views: ConeBeamViews, *, batch_views: int = 8
) -> Float32[np.ndarray, "V H W"]:
    """(X,Y,Z) float32 mu -> (V,H,W) float32 line integrals with RTK's Joseph forward projector."""
    itk, rtk = _rtk()
    vol = itk_image_from_volume(mu, affine)
    ImageType = itk.Image[itk.F, 3]
    out = np.empty((len(views), views.height, views.width), np.float32)
    for b0 in range(0, len(views), max(1, batch_views)):
        sub = views.subset(np.arange(b0, min(len(views), b0 + max(1, batch_views))))
        fp = rtk.JosephForwardProjectionImageFilter[ImageType, ImageType].New()
        fp.SetInput(0, projection_stack(sub))
        fp.SetInput(1, vol)
        fp.SetGeometry(rtk_geometry(sub))
        fp.Update()
        out[b0 : b0 + len(sub)] = itk.array_from_image(fp.GetOutput())
    return out
