"""The package's shape: one ``xwin`` namespace, imports that run one way, command-line code only in ``flows``.

Allowed imports between the five subpackages (README, Layout): ``schemas`` <- ``pipeline``, ``schemas`` <-
``storage``, (``pipeline``, ``storage``) <- ``training``, everything <- ``flows``. ``bench/`` uses public names only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipeline", "storage", "training", "flows")
ALLOWED = {
    "schemas": {"schemas"},
    "pipeline": {"schemas", "pipeline"},
    "storage": {"schemas", "storage"},
    "training": {"schemas", "pipeline", "storage", "training"},
    "flows": set(PACKAGES),
}
# third-party packages a layer must not import: orchestration and command-line code live in flows only
FORBIDDEN = {
    "schemas": {"prefect", "typer", "zarr", "s3fs", "torch"},
    "pipeline": {"prefect", "prefect_dask", "typer", "zarr", "s3fs"},
    "storage": {"prefect", "prefect_dask", "typer"},
    "training": {"prefect", "prefect_dask", "typer"},
    "flows": set(),
}


def _modules(pkg: str) -> list[Path]:
    return sorted(p for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, at any depth (function-level imports count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_no_import_runs_back_up():
    bad = []
    for pkg in PACKAGES:
        for path in _modules(pkg):
            for line, mod in _imports(path):
                parts = mod.split(".")
                where = f"{path.relative_to(REPO)}:{line}"
                if parts[0] in PACKAGES:
                    bad.append(f"{where} imports the bare top-level name {mod!r} (use xwin.{mod})")
                elif parts[0] == "xwin" and len(parts) > 1 and parts[1] not in ALLOWED[pkg]:
                    bad.append(f"{where}: {pkg} must not import {mod}")
                elif parts[0] in FORBIDDEN[pkg]:
                    bad.append(f"{where}: {pkg} must not import {parts[0]}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_back_import(tmp_path):
    """The walk above finds imports inside functions too (where most lazy back-imports would hide)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from xwin.flows.cli import app\n    import storage\n")
    assert [m for _, m in _imports(f)] == ["xwin.flows.cli", "storage"]


def test_bench_uses_public_names_only():
    bad = []
    for path in sorted((REPO / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xwin"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if any(p.startswith("_") for p in node.module.split(".")) or private:
                    bad.append(f"{path.name}:{node.lineno}: from {node.module} import {private or '...'}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{path.name}:{node.lineno}: private attribute .{node.attr}")
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in PACKAGES for a in node.names):
                bad.append(f"{path.name}:{node.lineno}: bare import")
    assert not bad, "\n".join(bad)


def test_installed_packages_are_the_folders():
    """pyproject's package list names every folder with an __init__.py, each under ``xwin.``, and nothing else."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {"xwin": "."}
    folders = {
        "xwin." + ".".join(p.parent.relative_to(REPO).parts)
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert set(cfg["packages"]) == {"xwin", *folders}
    assert (REPO / "__init__.py").is_file() and (REPO / "py.typed").is_file()


@pytest.mark.parametrize("bare", PACKAGES)
def test_only_the_xwin_namespace_is_installed(tmp_path, bare):
    """From a directory outside the checkout: ``xwin.<pkg>`` imports, the bare ``<pkg>`` does not."""
    code = (
        "import importlib, importlib.util\n"
        f"m = importlib.import_module('xwin.{bare}')\n"
        f"assert m.__name__ == 'xwin.{bare}'\n"
        f"spec = importlib.util.find_spec('{bare}')\n"  # an unrelated PyPI package of that name may exist
        "print(spec.origin if spec is not None else '')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    origin = r.stdout.strip()
    assert not origin or not Path(origin).resolve().is_relative_to(REPO), f"bare {bare!r} imports {origin}"
