"""Thin Prefect flows and the ``xwin`` CLI. All logic lives in ``pipeline`` and ``storage``."""
