"""Thread pools of the storage layer, one per purpose and process (recreated in a forked child, whose copy of the
parent's pool has no threads)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[str, tuple[int, ThreadPoolExecutor]] = {}


def process_pool(name: str, max_workers: int) -> ThreadPoolExecutor:
    """The pool ``name`` of this process (threads named ``xwin-<name>``), made on first use. Two threads racing
    here at most make one pool too many, which never starts a thread (executors start threads on submit)."""
    got = _POOLS.get(name)
    if got is None or got[0] != os.getpid():
        got = (os.getpid(), ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"xwin-{name}"))
        _POOLS[name] = got
    return got[1]
