"""Per-view ray parameters shared by the Joseph-style backends."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Float64

from xwin.pipeline.geometry import ConeBeamViews


def index_space(views: ConeBeamViews, affine: Float[np.ndarray, "4 4"]) -> Float64[np.ndarray, "V 24"]:
    """(V, 24) float64 per view: index-space src, det, u, v (columns 0:12), then world src, det, u, v (12:24).

    Index space: voxel (i, j, k) centres at integer coordinates, ``inv(affine)`` applied to world mm.
    """
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    L, t = inv[:3, :3], inv[:3, 3]
    s_i = views.src @ L.T + t
    d_i = views.det @ L.T + t
    u_i = views.u @ L.T
    v_i = views.v @ L.T
    return np.ascontiguousarray(np.concatenate([s_i, d_i, u_i, v_i, views.src, views.det, views.u, views.v], 1))
