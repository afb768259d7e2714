"""Processes the tests start: ``xwin`` under torchrun, and finding the processes a run left behind."""

from __future__ import annotations

import os
import shutil
import socket
import sys

import psutil


def marked(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``XWIN_TEST_MARK=mark`` (children inherit it)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("XWIN_TEST_MARK") == mark and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def torchrun_xwin(nproc: int, *args: str) -> list[str]:
    """The command line of ``torchrun --nproc_per_node nproc xwin ARGS`` on a free local port."""
    xwin = shutil.which("xwin", path=os.path.dirname(sys.executable))
    assert xwin is not None, "no xwin beside this Python"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
        "--no-python", xwin, *args,
    ]  # fmt: skip
