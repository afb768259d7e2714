"""``python -m xwin.flows.cli``: the ``xwin`` command."""

from xwin.flows.cli import app

app()
