"""The Ray executor against a real local Ray runtime (two CPUs) started here: the same bytes as one process,
a killed worker retried, a killed driver resumed. Skipped where Ray is not installed (``pip install
'delsketch[ray]'``; the ``test`` extra installs it)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from delsketch.apps.cli import main  # noqa: E402
from delsketch.executors import ExecutorError, ProcessPool, RayExecutor  # noqa: E402
from delsketch.sketch import precompute  # noqa: E402
from delsketch.tasks import build_from_spec, factory, file_factory  # noqa: E402

SPEC = {"preset": "digits", "data": None, "steps": None, "n_train": 40, "epochs": 3}
KW = dict(directions=8, degree=2, chunk=2, seed=1, task_spec=SPEC)  # 4 chunks of 2 directions
SRC = Path(__file__).resolve().parents[1] / "src"


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or p.name == "manifest.json")}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray runtime for the module; yields its address (other drivers join it with RAY_ADDRESS)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def task():
    return build_from_spec(SPEC)


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory):
    d = tmp_path_factory.mktemp("ray") / "local"
    precompute(task, d, **KW)
    return files(d)


def test_the_same_bytes_in_process_in_a_process_pool_and_on_ray(cluster, task, reference, tmp_path):
    """One sketch three ways, and executors finishing each other's partial sketches: every file identical."""
    precompute(task, tmp_path / "pool", **KW, task_factory=factory(SPEC), executor=ProcessPool(2))
    precompute(task, tmp_path / "ray", **KW, task_factory=factory(SPEC), executor=RayExecutor(workers=2))
    assert files(tmp_path / "pool") == reference
    assert files(tmp_path / "ray") == reference
    # Ray starts, the process finishes; the process starts, Ray finishes
    mixed1, mixed2 = tmp_path / "m1", tmp_path / "m2"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an incomplete sketch's stability warning
        precompute(task, mixed1, **KW, task_factory=factory(SPEC), executor="ray", max_chunks=2)
        precompute(task, mixed2, **KW, max_chunks=1)
    assert len(json.loads((mixed1 / "manifest.json").read_text())["chunks"]) == 2
    precompute(task, mixed1, **KW)
    precompute(task, mixed2, **KW, task_factory=factory(SPEC), executor="ray")
    assert files(mixed1) == reference and files(mixed2) == reference


KILLER = """
import os, signal
from delsketch.tasks import build_from_spec

MARK = {mark!r}

def build():
    task = build_from_spec({spec!r})
    losses, calls = task.example_losses, [0]

    def example_losses(params, idx):
        # the first worker to reach its third step claims the marker and SIGKILLs its own process
        calls[0] += 1
        if calls[0] == 3:
            try:
                fd = os.open(MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return losses(params, idx)

    task.example_losses = example_losses
    return task
"""


def _killer(tmp_path: Path, name: str):
    mark = tmp_path / f"{name}.killed"
    p = tmp_path / f"{name}.py"
    p.write_text(KILLER.format(mark=str(mark), spec=SPEC))
    return file_factory(f"{p}:build"), mark


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_killed_worker_is_retried_to_the_same_bytes_and_retries_are_bounded(cluster, task, reference, tmp_path):
    """A job SIGKILLs its own Ray worker process mid-run (a real worker death): Ray runs the job again and the
    sketch is byte-identical to the in-process one. With ``max_retries=0`` the same death fails the run with one
    line naming the job instead."""
    fac, mark = _killer(tmp_path, "retried")
    precompute(task, tmp_path / "s", **KW, task_factory=fac, executor=RayExecutor(workers=2, max_retries=2))
    assert mark.exists() and _dead(int(mark.read_text()))
    assert files(tmp_path / "s") == reference

    fac, mark = _killer(tmp_path, "bounded")
    with pytest.raises(ExecutorError, match=r"job \d: its Ray worker died on each of 1 try \(max_retries=0\)"):
        precompute(task, tmp_path / "b", **KW, task_factory=fac, executor=RayExecutor(workers=2, max_retries=0))
    assert mark.exists()


def test_a_killed_driver_resumes_from_the_finished_jobs(cluster, tmp_path, capsys):
    """``delsketch sketch --executor ray`` in another process joins this cluster through RAY_ADDRESS and is
    SIGKILLed once some chunks are recorded; the same command run again (here, in-process) keeps those chunk
    files untouched, computes the rest, and the sketch is byte-identical to an uninterrupted build."""
    args = ["sketch", "--preset", "digits", "--directions", "16", "--degree", "2", "--chunk", "2", "--seed", "3"]
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert main([*args, "--out", str(clean)]) == 0
    env = dict(os.environ, RAY_ADDRESS=cluster, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    p = subprocess.Popen([sys.executable, "-m", "delsketch", *args, "--out", str(out), "--executor", "ray"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    man = out / "manifest.json"
    recorded: dict = {}
    try:
        deadline = time.time() + 90
        while time.time() < deadline and p.poll() is None:
            try:
                recorded = json.loads(man.read_text())["chunks"] if man.exists() else {}
            except ValueError:
                recorded = {}
            if recorded:
                break
            time.sleep(0.005)
        assert p.poll() is None, p.stderr.read().decode()
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    recorded = json.loads(man.read_text())["chunks"]
    assert 1 <= len(recorded) < 8, recorded
    kept = {name: (out / name).stat().st_mtime_ns for name in recorded}
    time.sleep(0.5)  # the dead driver's Ray tasks are cancelled by the cluster
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert {name: (out / name).stat().st_mtime_ns for name in recorded} == kept  # not recomputed
    assert files(out) == files(clean)


def test_first_order_effects_farmed_on_ray_are_the_same_bits(cluster, task):
    """Exact first-order effects of 4 outputs in 3 Ray jobs (one recorded run each) equal the in-process ones bit
    for bit, and each column equals the finite difference of real retraining with w_i = +-h (central, h=1e-5)."""
    import torch

    from delsketch.sketch import first_order
    from delsketch.training import train

    qs = ["test:0", "test:3", "train:1", "test:mean"]
    here = first_order(task, qs)
    there = first_order(task, qs, executor=RayExecutor(workers=2), task_factory=factory(SPEC), groups=3)
    assert torch.equal(here, there)
    i, h = 5, 1e-5
    w = torch.zeros(task.n, dtype=torch.float64)
    f = lambda s: float(task.query(train(task, w=w + s * h * (torch.arange(task.n) == i)), "test:0"))
    assert here[i, 0].item() == pytest.approx((f(1) - f(-1)) / (2 * h), rel=1e-6, abs=1e-10)
