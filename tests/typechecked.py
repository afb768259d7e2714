"""The run-time type checker the test suite applies to xwin's array-taking modules (conftest.CHECKED_MODULES):
beartype, with PEP 484's numeric tower (an ``int`` is a valid ``float``, as static checkers read it).

Entry points that check their own input and answer bad input with a clear message (the tests ask for those
messages) are left to their own checks: their signatures state the contract, their code enforces it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from beartype import BeartypeConf, beartype

OWN_CHECKS = {
    "xwin.pipeline.render.project.render_views",
    "xwin.pipeline.render.project.render_ring",
    "xwin.pipeline.reconstruct.fdk.reconstruct",
    "xwin.storage.store.Store.write_volume",
    "xwin.storage.dataset.ProjectionDataset.write_ring",
}
_check = beartype(conf=BeartypeConf(is_pep484_tower=True))


def typechecker(fn: Callable[..., Any]) -> Callable[..., Any]:
    if f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}" in OWN_CHECKS:
        return fn
    return _check(fn)
