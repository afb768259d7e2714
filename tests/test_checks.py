"""The static checks, run with the tests so CI runs them: ruff (lint + format) and mypy (types), configured in
pyproject.toml. By hand: ``python -m pytest -q tests/test_checks.py``.

mypy needs the package's own module names (``xwin.storage.store``), but the package is the repository root mapped by
setuptools' ``package-dir``, which mypy cannot follow through an editable install. So the check runs on a one-link
tree, ``<tmp>/xwin -> <repo>``: the same files under the names the package installs them as.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PACKAGES = ("schemas", "pipeline", "storage", "training", "flows")


def _tool(name: str) -> str:
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)


def test_ruff_lint():
    r = _run([_tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."], REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format():
    r = _run([_tool("ruff"), "format", "--no-cache", "--check", "."], REPO)
    assert r.returncode == 0, "not ruff-formatted (run `ruff format .`):\n" + r.stdout + r.stderr


def test_mypy(tmp_path):
    (tmp_path / "xwin").symlink_to(REPO, target_is_directory=True)
    cmd = [
        _tool("mypy"),
        "--config-file",
        str(REPO / "pyproject.toml"),
        "--python-executable",
        sys.executable,
        "--cache-dir",
        str(REPO / ".mypy_cache"),
        "-m",
        "xwin",
    ]
    for pkg in PACKAGES:
        cmd += ["-p", f"xwin.{pkg}"]
    r = _run(cmd, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_signature_shapes_are_checked_at_run_time():
    """conftest's import hook makes every call the tests make check the shapes and dtypes the signatures state."""
    import numpy as np
    from jaxtyping import TypeCheckError

    from xwin.pipeline.geometry import volume_center
    from xwin.storage.entry import sha256_of

    assert volume_center(np.eye(4), (3, 3, 3)).shape == (3,)
    with pytest.raises(TypeCheckError):
        volume_center(np.eye(3), (3, 3, 3))  # a 3x3 matrix is no (4, 4) affine
    with pytest.raises(TypeCheckError):
        sha256_of([1, 2, 3])  # type: ignore[arg-type]  # a list is no array
