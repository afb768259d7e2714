"""xwin: CT cohorts -> cone-beam DRR ring datasets (sharded Zarr v3) -> the X-WIN training consumer.

The repository root is this package: its top-level folders are installed as ``xwin.schemas``, ``xwin.pipeline``,
``xwin.storage``, ``xwin.training`` and ``xwin.flows`` (pyproject.toml, ``[tool.setuptools] package-dir``), so no
bare top-level name (``storage``, ``pipeline``, ...) is ever installed. Imports run one way (README, Layout):
``schemas`` <- ``pipeline``, ``storage`` <- ``training`` <- ``flows``.
"""

__version__ = "0.1.0"
