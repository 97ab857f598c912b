"""Run a benchmark's method in a forked process (bench/accuracy/run.py and bench/own_model/peers.py): a fresh copy
of everything the parent built, one torch thread, an optional address-space limit (a MemoryError in the child, not
the OOM killer), the child's time and peak resident set returned with the result."""

from __future__ import annotations

import multiprocessing as mp
import queue as _queue
import resource
import time
import traceback
from typing import Optional

import torch


def rss_mb() -> float:
    """The peak resident set of this process and its finished children (sketch worker processes), MiB."""
    return max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024.0


def in_child(fn, *args, memory_gb: Optional[float] = None, what: str = "method"):
    """``fn(*args)`` in a forked process; returns (result, seconds, peak RSS MiB of that process). An exception in
    the child is raised here as a RuntimeError with its traceback; a child that dies says so."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def target():
        torch.set_num_threads(1)
        if memory_gb is not None:
            lim = int(memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        t0 = time.perf_counter()
        try:
            q.put(("ok", fn(*args), time.perf_counter() - t0, rss_mb()))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            q.put(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", time.perf_counter() - t0, rss_mb()))

    p = ctx.Process(target=target)
    p.start()
    while True:
        try:
            status, res, dt, rss = q.get(timeout=5)
            break
        except _queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"the {what}'s process died (exit code {p.exitcode})") from None
    p.join()
    if status != "ok":
        raise RuntimeError(res)
    return res, dt, rss
