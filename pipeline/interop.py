"""The stored ray geometry in the conventions of other tools: RTK, ASTRA, DiffDRR / nanodrr (docs/interop.md).

Every form here is a rigid re-expression of the same :class:`~xwin.pipeline.geometry.ConeBeamViews` rows (the
stored ``cone_vec``), never a re-derivation from yaw angles, so an exported view has exactly the stored rays:

* **RTK**: the world is ITK's physical frame, **LPS** mm (``x_LPS = -x_RAS``, ``y_LPS = -y_RAS``): the frame in
  which ITK itself places the CT when it reads the NIfTI. One vector-form projection per view
  (``ThreeDCircularProjectionGeometry.AddProjection(source, detector_centre, row_dir, column_dir)``) with a centred
  projection stack: stack origin ``(-(W-1)/2 |u|, -(H-1)/2 |v|, 0)``, spacing ``(|u|, |v|, 1)``, identity
  direction, ITK index (column, row, view). The volume image: origin, spacing and direction of the LPS affine.
* **ASTRA**: ASTRA's volume is axis-aligned, so the frame is the volume's own: ``p = D^T (x - c)`` with ``D`` the
  affine's unit voxel axes and ``c`` the volume centre (rigid for any orthonormal-axis affine, oblique included).
  The volume array is (slices, rows, cols) = ``hu.transpose(2, 1, 0)``; its window is centred on the origin.
* **DiffDRR** (0.6.1, ``orientation=None``, ``reverse_x_axis=True``, ``center_volume=False``): the world is the
  volume's RAS affine; per view the 4x4 pose ``world_from_camera @ diag(-1, -1, 1, 1)`` (DiffDRR's camera frame
  is ours turned by 180 degrees about the optical axis) and the intrinsics ``sdd, delx, dely, x0, y0``.
  **nanodrr**: ``rt_inv`` = our ``world_from_camera`` and ``make_k_inv(sdd, delx, dely, x0, y0, H, W)``.

Values: the stored views are line integrals of ``mu = mu_water * max(0, 1 + HU/1000)`` [1/mm] times mm; each
export names ``mu_water_per_mm`` and the HU volume the views were rendered from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float, Float64, Real

from xwin.pipeline.geometry import ConeBeamViews, volume_center
from xwin.pipeline.reconstruct.frames import transform_views

FORMATS = ("rtk", "astra", "diffdrr")
# LPS from RAS (and back): a rotation by 180 degrees about +S, so rays, lengths and handedness are unchanged
LPS_FROM_RAS: Float64[np.ndarray, "4 4"] = np.diag([-1.0, -1.0, 1.0, 1.0])
HU_TO_MU = "mu [1/mm] = mu_water_per_mm * max(0, 1 + HU / 1000)"
VIEW_UNITS = "line integral of mu [1/mm] * mm (dimensionless)"


def _pitch(views: ConeBeamViews) -> tuple[float, float]:
    """The one detector pitch (|u|, |v|) of every view; raises when it varies (one projection stack spacing)."""
    du, dv = np.linalg.norm(views.u, axis=1), np.linalg.norm(views.v, axis=1)
    if np.ptp(du) > 1e-9 * du.max() or np.ptp(dv) > 1e-9 * dv.max():
        raise ValueError("views have different pixel pitches: one projection stack needs one spacing")
    return float(du[0]), float(dv[0])


def _unit_axes(affine: Float[np.ndarray, "4 4"]) -> tuple[Float64[np.ndarray, "3 3"], Float64[np.ndarray, "3"]]:
    """(D, spacing) of an affine ``A[:3, :3] = D @ diag(spacing)``; raises unless D is orthonormal (no shear)."""
    A = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(A[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    D = A[:3, :3] / spacing
    if not np.allclose(D.T @ D, np.eye(3), atol=1e-6):
        raise ValueError("affine's voxel axes are not orthogonal (sheared grid): no axis-aligned export exists")
    return D, spacing


# ---- RTK ------------------------------------------------------------------------------------------------------
def rtk_record(views: ConeBeamViews, affine: Float[np.ndarray, "4 4"], shape: tuple[int, int, int]) -> dict:
    """What RTK needs beside its geometry XML, in LPS mm: the projection stack (size, spacing, origin, direction)
    and the volume image (size, origin, spacing, direction), plus each view's vector form (source, detector
    centre, row and column directions) that the XML encodes."""
    lps = transform_views(views, LPS_FROM_RAS)
    du, dv = _pitch(lps)
    H, W = views.height, views.width
    A = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    D, spacing = _unit_axes(A)
    return {
        "frame": "LPS",
        "detector": {
            "size": [W, H, len(views)],
            "spacing": [du, dv, 1.0],
            "origin": [-(W - 1) / 2.0 * du, -(H - 1) / 2.0 * dv, 0.0],
            "direction": np.eye(3).tolist(),
            "index_order": "ITK (column, row, view) = numpy [view, row, column]",
        },
        "volume": {
            "size": [int(s) for s in shape],
            "origin": A[:3, 3].tolist(),
            "spacing": spacing.tolist(),
            "direction": D.tolist(),
            "index_order": "ITK (i, j, k) = stored voxel (i, j, k); numpy of itk.array_from_image: [k, j, i]",
        },
        "views": [
            {
                "source": lps.src[k].tolist(),
                "detector_centre": lps.det[k].tolist(),
                "row_direction": (lps.u[k] / du).tolist(),
                "column_direction": (lps.v[k] / dv).tolist(),
            }
            for k in range(len(views))
        ],
    }


def rtk_geometry_from_record(record: dict) -> Any:
    """``rtk.ThreeDCircularProjectionGeometry`` of an :func:`rtk_record` (one vector-form projection per view)."""
    import itk
    from itk import RTK as rtk

    g = rtk.ThreeDCircularProjectionGeometry.New()

    def pt(x):
        return itk.Point[itk.D, 3]([float(a) for a in x])

    def vec(x):
        return itk.Vector[itk.D, 3]([float(a) for a in x])

    for k, v in enumerate(record["views"]):
        ok = g.AddProjection(
            pt(v["source"]), pt(v["detector_centre"]), vec(v["row_direction"]), vec(v["column_direction"])
        )
        if not ok:
            raise ValueError(f"RTK rejected the geometry of view {k}")
    return g


def write_rtk(
    out: Path,
    views: ConeBeamViews,
    affine: Float[np.ndarray, "4 4"],
    hu: Real[np.ndarray, "X Y Z"] | None,
    projections: Float[np.ndarray, "V H W"] | None,
    info: dict,
) -> list[Path]:
    """``out/geometry.xml`` (RTK's own XML writer), ``out/rtk.json`` (detector, volume, units), and when given the
    HU volume ``out/volume.mha`` and the views ``out/projections.mha`` (a centred RTK projection stack)."""
    import itk
    from itk import RTK as rtk

    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in (hu.shape if hu is not None else info["volume_shape"]))
    rec = rtk_record(views, affine, shape)  # type: ignore[arg-type]
    w = rtk.ThreeDCircularProjectionGeometryXMLFileWriter.New()
    w.SetFilename(str(out / "geometry.xml"))
    geometry = rtk_geometry_from_record(rec)  # held here: the writer keeps only a raw pointer to it
    w.SetObject(geometry)
    w.WriteFile()
    files = [out / "geometry.xml"]
    if hu is not None:
        A = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
        img = itk.image_from_array(np.ascontiguousarray(np.asarray(hu).transpose(2, 1, 0)))
        img.SetOrigin(rec["volume"]["origin"])
        img.SetSpacing(rec["volume"]["spacing"])
        img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(_unit_axes(A)[0])))
        itk.imwrite(img, str(out / "volume.mha"), compression=True)
        files.append(out / "volume.mha")
    if projections is not None:
        det = rec["detector"]
        p = itk.image_from_array(np.ascontiguousarray(projections, dtype=np.float32))
        p.SetOrigin(det["origin"])
        p.SetSpacing(det["spacing"])
        itk.imwrite(p, str(out / "projections.mha"), compression=True)
        files.append(out / "projections.mha")
    side = {
        "format": "rtk",
        **info,
        **rec,
        "files": {
            "geometry": "geometry.xml",
            "volume": "volume.mha" if hu is not None else None,
            "projections": "projections.mha" if projections is not None else None,
        },
        "hu_to_mu": HU_TO_MU,
        "view_units": VIEW_UNITS,
        "usage": (
            "g = rtk.ThreeDCircularProjectionGeometryXMLFileReader (geometry.xml); a projection stack of detector "
            "size/spacing/origin (or projections.mha); the volume.mha in HU, mapped to mu as hu_to_mu; "
            "rtk.JosephForwardProjectionImageFilter(stack, mu, g) reproduces the views; rtkfdk --geometry "
            "geometry.xml --path . --regexp projections.mha reconstructs mu [1/mm]"
        ),
    }
    (out / "rtk.json").write_text(json.dumps(side, indent=1))
    return [*files, out / "rtk.json"]


# ---- ASTRA ----------------------------------------------------------------------------------------------------
def astra_record(views: ConeBeamViews, affine: Float[np.ndarray, "4 4"], shape: tuple[int, int, int]) -> dict:
    """ASTRA's 3-D geometry of the views and the volume: ``cone_vec`` rows (V, 12) in the volume's own centred
    frame, ``vol_geom`` (``astra.create_vol_geom`` arguments) and ``frame_from_world`` (4x4 rigid, RAS mm ->
    ASTRA frame mm). The volume array is ``hu.transpose(2, 1, 0)``: (slices, rows, cols) = (k, j, i)."""
    D, spacing = _unit_axes(affine)
    c = volume_center(affine, shape)
    T = np.eye(4)
    T[:3, :3] = D.T
    T[:3, 3] = -D.T @ c
    a = transform_views(views, T)
    nx, ny, nz = (int(s) for s in shape)
    hx, hy, hz = (n * s / 2.0 for n, s in zip(shape, spacing))
    return {
        "frame": "ASTRA volume frame: x, y, z along the voxel axes i, j, k of the stored volume, origin at its centre",
        "frame_from_world": T.tolist(),
        "vectors": a.cone_vecs.tolist(),
        "det_rows": views.height,
        "det_cols": views.width,
        "vol_geom": {
            "rows": ny,
            "cols": nx,
            "slices": nz,
            "minx": -hx,
            "maxx": hx,
            "miny": -hy,
            "maxy": hy,
            "minz": -hz,
            "maxz": hz,
        },
        "volume_order": "(slices, rows, cols) = hu.transpose(2, 1, 0) of the stored (X, Y, Z) volume",
        "projection_order": "(det_rows, views, det_cols): stored views (V, H, W) are astra_data.transpose(1, 0, 2)",
    }


def write_astra(
    out: Path,
    views: ConeBeamViews,
    affine: Float[np.ndarray, "4 4"],
    hu: Real[np.ndarray, "X Y Z"] | None,
    projections: Float[np.ndarray, "V H W"] | None,
    info: dict,
) -> list[Path]:
    """``out/astra.json`` (geometry, units, how to project) and ``out/astra.npz`` (``vectors`` (V, 12), and when
    given ``volume_hu`` (slices, rows, cols) int16 and ``projections`` (det_rows, V, det_cols) float32)."""
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in (hu.shape if hu is not None else info["volume_shape"]))
    rec = astra_record(views, affine, shape)  # type: ignore[arg-type]
    arrays: dict[str, np.ndarray] = {"vectors": np.asarray(rec["vectors"], dtype=np.float64)}
    if hu is not None:
        arrays["volume_hu"] = np.ascontiguousarray(np.asarray(hu).transpose(2, 1, 0))
    if projections is not None:
        arrays["projections"] = np.ascontiguousarray(np.asarray(projections, dtype=np.float32).transpose(1, 0, 2))
    np.savez_compressed(out / "astra.npz", **arrays)  # type: ignore[arg-type]
    side = {
        "format": "astra",
        **info,
        **rec,
        "arrays": {k: list(a.shape) for k, a in arrays.items()},
        "hu_to_mu": HU_TO_MU,
        "view_units": VIEW_UNITS,
        "usage": (
            "vg = astra.create_vol_geom(rows, cols, slices, minx, maxx, miny, maxy, minz, maxz); "
            "pg = astra.create_proj_geom('cone_vec', det_rows, det_cols, vectors); "
            "_, p = astra.create_sino3d_gpu(mu(volume_hu), pg, vg); views = p.transpose(1, 0, 2)"
        ),
    }
    (out / "astra.json").write_text(json.dumps(side, indent=1))
    return [out / "astra.npz", out / "astra.json"]


# ---- DiffDRR / nanodrr ----------------------------------------------------------------------------------------
DIFFDRR_FROM_CAMERA: Float64[np.ndarray, "4 4"] = np.diag([-1.0, -1.0, 1.0, 1.0])


def diffdrr_record(views: ConeBeamViews) -> dict:
    """DiffDRR's and nanodrr's camera of every view, world = the volume's RAS affine (module docstring).

    DiffDRR 0.6.1 (``reverse_x_axis=True``, ``orientation=None``) places pixel (row i, col j) at camera point
    ``(-delx (j - (W-1)/2) + x0, -dely (i - (H-1)/2) + y0, sdd)``; ours (OpenCV) at ``((j - cx) |u|, (i - cy) |v|,
    f)``. The two frames differ by diag(-1, -1, 1), a proper rotation, hence the pose and ``x0 = |u| (cx -
    (W-1)/2)``, ``y0 = |v| (cy - (H-1)/2)``.
    """
    from xwin.pipeline.render.nanodrr_backend import camera_params

    V, H, W = len(views), views.height, views.width
    nano, rt_inv = camera_params(views)  # (sdd, delx, dely, x0, y0) and world_from_camera per view
    per_view = []
    for k in range(V):
        sdd, du, dv, x0, y0 = (float(x) for x in nano[k])
        per_view.append(
            {
                "pose": (rt_inv[k] @ DIFFDRR_FROM_CAMERA).tolist(),
                "sdd": sdd,
                "delx": du,
                "dely": dv,
                "x0": x0,
                "y0": y0,
                "nanodrr": {
                    "rt_inv": rt_inv[k].tolist(),
                    "make_k_inv": {"sdd": sdd, "delx": du, "dely": dv, "x0": x0, "y0": y0},
                },
            }
        )
    keys = ("sdd", "delx", "dely", "x0", "y0")
    same = all(all(abs(p[key] - per_view[0][key]) <= 1e-9 * max(1.0, abs(p[key])) for key in keys) for p in per_view)
    return {
        "frame": "RAS mm: the affine of volume.nii.gz; DiffDRR read(..., orientation=None, center_volume=False)",
        "height": H,
        "width": W,
        "reverse_x_axis": True,
        "orientation": None,
        "one_detector": same,  # DiffDRR's DRR holds one detector: when False, pass a calibration per view
        "views": per_view,
    }


def write_diffdrr(
    out: Path,
    views: ConeBeamViews,
    affine: Float[np.ndarray, "4 4"],
    hu: Real[np.ndarray, "X Y Z"] | None,
    info: dict,
) -> list[Path]:
    """``out/diffdrr.json`` (poses, intrinsics, nanodrr's camera, units, how to render) and, when given, the HU
    volume as ``out/volume.nii.gz`` with its RAS affine (what DiffDRR and torchio read)."""
    import nibabel as nib

    out.mkdir(parents=True, exist_ok=True)
    rec = diffdrr_record(views)
    files = []
    if hu is not None:
        nib.save(nib.Nifti1Image(np.asarray(hu), np.asarray(affine, dtype=np.float64)), str(out / "volume.nii.gz"))
        files.append(out / "volume.nii.gz")
    side = {
        "format": "diffdrr",
        **info,
        **rec,
        "files": {"volume": "volume.nii.gz" if hu is not None else None},
        "hu_to_mu": HU_TO_MU,
        "view_units": VIEW_UNITS,
        "usage": (
            "subject = diffdrr.data.read('volume.nii.gz', orientation=None, center_volume=False); "
            "drr = diffdrr.drr.DRR(subject, sdd=v['sdd'], height=height, width=width, delx=v['delx'], dely=v['dely'], "
            "x0=v['x0'], y0=v['y0'], reverse_x_axis=True); drr.density = mu (DiffDRR's own density is a rescaled HU, "
            "not mu); img = drr(diffdrr.pose.RigidTransform(torch.tensor(v['pose'])))[0, 0] "
            "(the rows and columns of the stored view). nanodrr: k_inv = nanodrr.camera.make_k_inv(**make_k_inv, "
            "height=height, width=width), rt_inv as given."
        ),
    }
    (out / "diffdrr.json").write_text(json.dumps(side, indent=1))
    return [*files, out / "diffdrr.json"]


def write_geometry(
    fmt: str,
    out: Path,
    views: ConeBeamViews,
    affine: Float[np.ndarray, "4 4"],
    hu: Real[np.ndarray, "X Y Z"] | None,
    projections: Float[np.ndarray, "V H W"] | None,
    info: dict,
) -> list[Path]:
    """Write one export ``fmt`` (rtk | astra | diffdrr) of ``views`` under ``out``; returns the files written.

    ``info`` (volume id, cohort, spec hash, ``mu_water_per_mm``, ``volume_shape``, ...) goes into the sidecar JSON.
    """
    if fmt == "rtk":
        return write_rtk(out, views, affine, hu, projections, info)
    if fmt == "astra":
        return write_astra(out, views, affine, hu, projections, info)
    if fmt == "diffdrr":
        return write_diffdrr(out, views, affine, hu, info)
    raise ValueError(f"unknown geometry format {fmt!r}: use one of {', '.join(FORMATS)}")
