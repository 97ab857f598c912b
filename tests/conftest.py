"""Shared fixtures: the location of ../shared (reference data) and a single-thread guard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: ../shared next to the repository (override with DELSKETCH_SHARED)
SHARED = Path(os.environ.get("DELSKETCH_SHARED", REPO.parent / "shared"))
NAMES_TXT = SHARED / "data" / "names.txt"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def names_txt() -> Path:
    if not NAMES_TXT.is_file():
        pytest.skip(f"reference data {NAMES_TXT} is absent (set DELSKETCH_SHARED to the shared folder)")
    return NAMES_TXT


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference numbers {REFERENCE} are absent (set DELSKETCH_SHARED to the shared folder)")
    return REFERENCE


@pytest.fixture(scope="session", autouse=True)
def _one_thread_for_the_session():
    """Tiny tensors everywhere: one intra-op thread is faster and immune to the stalls described below."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def single_thread():
    """Run a test module with one intra-op thread.

    The tensors here are tiny; with 2 intra-op threads on a busy 2-core machine each op can stall
    for tens of milliseconds (1000 microgpt steps went from ~2.5 s to ~100 s)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
