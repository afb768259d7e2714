"""The JSON-lines log of a run: ``<out_dir>/log.jsonl``, one event per line, shared by the world-model trainer and the
decoder trainer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO


class RunLog:
    """Appends events to ``out_dir/log.jsonl`` (created at the first event, flushed per line); with ``echo`` each
    line also goes to stderr. ``close()`` ends the run's log."""

    def __init__(self, out_dir: str | Path, echo: bool = False) -> None:
        self.path = Path(out_dir) / "log.jsonl"
        self.echo = echo
        self._fh: TextIO | None = None

    def write(self, rec: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a")  # noqa: SIM115 - open for the run, closed by close()
        line = json.dumps(rec, default=float)
        self._fh.write(line + "\n")
        self._fh.flush()
        if self.echo:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
