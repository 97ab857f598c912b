"""How a ring run gets its memory: huge pages, and freed blocks kept for reuse while it runs.

A ring step allocates many series tensors of tens to hundreds of MB, each used for a few memory-bound
passes, and frees them again.  By default both costs of a fresh block are paid on every allocation: glibc
maps blocks over 32 MB anew with mmap and unmaps them when freed, and the first touch of every 4 kB page
then faults (on a virtual machine several times the arithmetic: a fresh 67 MB complex128 product measured
50 ms against 8 ms into an existing buffer).  Two remedies, measured by bench/alloc.py
(bench/results/engine-alloc.json: with both, that product 8 ms, a degree-3 silu_backward on [32, 4, 512, 256]
0.30 s instead of 1.16 s, a degree-3 Cauchy matmul 1.64 s instead of 2.35 s):

* **Huge pages** (:func:`enable_huge_pages`, run when delsketch is imported): torch aligns allocations of
  2 MB and more to 2 MB and advises the kernel to back them with transparent huge pages when
  ``THP_MEM_ALLOC_ENABLE=1`` (c10's CPU allocator).  torch reads the variable once, at its first allocation,
  so it is set before ``import torch``; a value the user set is kept (``THP_MEM_ALLOC_ENABLE=0`` turns it
  off), and when torch was imported before delsketch nothing changes (set it in the shell then).
* **A heap cache** (:func:`heap_cache`, around every ring run): glibc serves all blocks from its heap and
  keeps freed ones, so that the next step reuses memory that is already mapped; when the outermost run
  ends the settings go back to glibc's defaults and the freed memory is returned to the system
  (``malloc_trim``).  Only where glibc is the C library and the user has not tuned its malloc (``MALLOC_*_``
  variables, ``glibc.malloc`` tunables); ``DELSKETCH_HEAP_CACHE=0`` turns it off.

Neither changes a value: only where tensors live.

A ring step also makes tens of thousands of short-lived Python objects (the series wrappers of
``__torch_dispatch__``), so CPython's cyclic garbage collector runs often, and every few steps a full
collection walks all ~170,000 objects the process holds (torch's modules and the task among them): ~100 ms
each, 19 ms a paper-task step on average (counted with ``gc.callbacks``).  :func:`frozen_gc` (around every
ring run) moves the objects that exist when the run starts into the collector's permanent generation
(``gc.freeze``) and back when it ends: collections during the run walk only what the run made, 4 ms a step.
Nothing is freed later than before except cyclic garbage among those older objects, which waits for the end
of the run.  Where the user has frozen objects themselves, it leaves the collector alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import sys
import threading

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
CACHE_VARIABLE = "DELSKETCH_HEAP_CACHE"

# glibc's mallopt parameters and their defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP = 2**31 - 1  # a trim threshold no heap reaches: freed memory stays

_lock = threading.Lock()
_depth = [0]
_libc = []


def enable_huge_pages() -> bool:
    """Set THP_MEM_ALLOC_ENABLE=1 unless it is set or torch is loaded; True when huge-page allocation is on."""
    if "torch" not in sys.modules:
        os.environ.setdefault(THP_VARIABLE, "1")
    return huge_pages()


def huge_pages() -> bool:
    """Whether this process's torch asks for huge pages (as far as the environment tells)."""
    return os.environ.get(THP_VARIABLE, "0") not in ("", "0")


def _glibc():
    if not _libc:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                cand = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                cand.gnu_get_libc_version.restype = ctypes.c_char_p
                cand.gnu_get_libc_version()  # glibc only (musl has no mallopt parameters of these numbers)
                lib = cand
            except (OSError, AttributeError):
                lib = None
        _libc.append(lib)
    return _libc[0]


def _user_tuned_malloc() -> bool:
    """The user configured glibc's malloc (MALLOC_*_ variables or malloc tunables): leave it as they set it."""
    return any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", "")


def heap_cache_available() -> bool:
    """Whether :func:`heap_cache` changes anything here: glibc, not turned off, malloc not tuned by the user."""
    return (_glibc() is not None and os.environ.get(CACHE_VARIABLE, "1") not in ("", "0")
            and not _user_tuned_malloc())


@contextlib.contextmanager
def _outermost(depth: list, enter, leave):
    """enter() when the first of nested contexts on ``depth`` ([count]) opens, leave() when the last closes."""
    with _lock:
        depth[0] += 1
        if depth[0] == 1:
            enter()
    try:
        yield
    finally:
        with _lock:
            depth[0] -= 1
            if depth[0] == 0:
                leave()


def _keep_freed(lib) -> None:
    lib.mallopt(_M_MMAP_MAX, 0)
    lib.mallopt(_M_TRIM_THRESHOLD, _KEEP)


def _glibc_defaults(lib) -> None:
    lib.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    lib.malloc_trim(0)


@contextlib.contextmanager
def heap_cache():
    """While inside (nested calls count once), freed blocks of any size stay in the heap for reuse."""
    lib = _glibc() if heap_cache_available() else None
    if lib is None:
        yield
        return
    with _outermost(_depth, lambda: _keep_freed(lib), lambda: _glibc_defaults(lib)):
        yield


_gc_depth = [0]
_gc_froze = [False]  # whether the outermost frozen_gc froze (not when the user had frozen objects)


def _freeze() -> None:
    _gc_froze[0] = gc.get_freeze_count() == 0  # the user's own freeze is theirs to undo
    if _gc_froze[0]:
        gc.freeze()


def _unfreeze() -> None:
    if _gc_froze[0]:
        gc.unfreeze()


def frozen_gc():
    """While inside (nested calls count once), the objects made before are out of the collector's walks."""
    return _outermost(_gc_depth, _freeze, _unfreeze)

enable_huge_pages()
