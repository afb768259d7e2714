"""Thin Prefect flows and the ``xwin`` CLI. All logic lives in ``xwin.pipeline`` and ``xwin.storage``; this is the
only package that imports Prefect or holds command-line code."""
