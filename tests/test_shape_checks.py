"""The run-time shape checks of the test process (tests/conftest.py) reach every module they list: each one is
loaded through jaxtyping's import hook, however late it is first imported, and a call with a wrong shape is
answered by the type checker rather than by whatever the function body would raise."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
from conftest import CHECKED_MODULES
from jaxtyping import TypeCheckError


def instrumented(name: str) -> bool:
    """True when the module was loaded through jaxtyping's import hook (its loader is the hook's)."""
    mod = sys.modules.get(name) or importlib.import_module(name)
    return type(mod.__spec__.loader).__name__ == "_JaxtypingLoader"


@pytest.mark.parametrize("name", CHECKED_MODULES)
def test_every_listed_module_is_instrumented(name):
    assert instrumented(name), f"{name} is listed in conftest.CHECKED_MODULES but was imported without the hook"


def test_a_module_imported_without_the_hook_is_caught():
    """The check itself: the same module loaded by a plain import (hook removed) is reported."""
    from conftest import SHAPE_HOOK

    name = "xwin.pipeline.reconstruct.report"
    saved = sys.modules.pop(name, None)
    sys.meta_path.remove(SHAPE_HOOK.hook)
    try:
        importlib.import_module(name)
        assert not instrumented(name)
    finally:
        sys.meta_path.insert(0, SHAPE_HOOK.hook)
        sys.modules.pop(name, None)
        if saved is not None:
            sys.modules[name] = saved


def test_a_lazily_imported_module_checks_shapes():
    """``metrics.psnr`` (imported by the tests only when needed) and the ray table of the GPU projector reject a
    wrong shape through the checker, not with a plain ValueError/IndexError from inside."""
    from xwin.pipeline.reconstruct.metrics import psnr

    a = np.zeros((4, 4), np.float32)
    with pytest.raises(TypeCheckError):
        psnr(a, np.zeros((4, 5), np.float32), np.ones((4, 4), bool))
    from xwin.pipeline.geometry import ring_for_volume
    from xwin.pipeline.render._rays import index_space
    from xwin.schemas.render import RenderSpec

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    views = ring_for_volume(
        RenderSpec(height=8, width=8, pixel_mm=40.0, n_views=4, yaw_step_deg=90.0), affine, (8, 8, 8)
    )
    assert index_space(views, affine).shape == (4, 24)
    with pytest.raises(TypeCheckError):
        index_space(views, affine[:3, :3])
