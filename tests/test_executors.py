"""The executor interface without Ray: a user's task file on both cores, workers that end with their parent,
Ray never imported unless asked for, the audit's farms through an executor, devices, bad settings."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from delsketch.executors import ExecutorError, InProcess, ProcessPool, get_executor
from delsketch.sketch import SketchError, precompute
from delsketch.tasks import build_from_spec, factory, file_factory, load_task_file

SPEC = {"preset": "digits", "data": None, "steps": None, "n_train": 40, "epochs": 3}
SRC = Path(__file__).resolve().parents[1] / "src"


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or p.name == "manifest.json")}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """A user's own task in a file: an nn.Module, data and an optimizer through Task.from_module."""
    p = tmp_path_factory.mktemp("user") / "my_task.py"
    p.write_text(textwrap.dedent("""
        import torch
        from delsketch.training import Task

        def build():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(24, 3, generator=g, dtype=torch.float64)
            y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(24, generator=g, dtype=torch.float64)
            model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
            torch.manual_seed(1)
            for m in model:
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, 0, 0.5); torch.nn.init.zeros_(m.bias)
            loss = lambda out, t: (out.squeeze(-1) - t) ** 2
            return Task.from_module(model, (x, y), loss, torch.optim.SGD(model.parameters(), lr=0.05), steps=6, batch_size=8)

        def not_a_task():
            return 3
    """))
    return p


def test_bad_task_references_are_one_line_errors(task_file, tmp_path):
    with pytest.raises(ValueError, match="must be FILE.py:FUNCTION"):
        load_task_file(str(task_file))
    with pytest.raises(ValueError, match="task file not found"):
        load_task_file(str(tmp_path / "nope.py") + ":build")
    with pytest.raises(ValueError, match="defines no function 'missing'"):
        load_task_file(f"{task_file}:missing")
    with pytest.raises(ValueError, match="must return a delsketch Task .*got int"):
        load_task_file(f"{task_file}:not_a_task")


def test_bad_executor_settings_are_refused(tmp_path):
    task = build_from_spec(SPEC)
    with pytest.raises(ExecutorError, match="unknown executor 'dask'"):
        get_executor("dask")
    with pytest.raises(ExecutorError, match="workers"):
        get_executor("process", workers=-1)
    with pytest.raises(ExecutorError, match="needs a host"):
        get_executor("ray://")
    with pytest.raises(ValueError, match="needs task_factory"):
        precompute(task, tmp_path / "a", directions=4, degree=1, chunk=2, executor="process")
    with pytest.raises(ValueError, match="unknown device"):
        precompute(task, tmp_path / "b", directions=4, degree=1, chunk=2, device="warp-drive")
    other = factory({**SPEC, "n_train": 41})
    with pytest.raises(ExecutorError, match="fingerprints differ"):
        ProcessPool(2).map(lambda t: 0, [()], task=task, factory=other)


def test_the_audit_farm_gives_the_same_scores_through_worker_processes():
    """Leave-one-out memorization through the process pool equals the in-process farm, and both equal plain
    retraining without each example (delsketch.training.retrain)."""
    from delsketch.audit import memorization
    from delsketch.training import retrain

    task = build_from_spec(SPEC)
    idx = [0, 5, 7]
    here = memorization(task, route="loo", indices=idx)
    there = memorization(task, route="loo", indices=idx, executor=ProcessPool(2), task_factory=factory(SPEC))
    assert here.scores == there.scores
    i = idx[1]
    own = lambda p: float(task.example_losses(p, torch.tensor([i]))[0])
    from delsketch.training import train

    assert here.scores[1] == pytest.approx(own(retrain(task, [i])) - own(train(task)), rel=1e-12, abs=1e-15)


def test_device_cpu_runs_the_same_code_path_to_the_same_bytes(tmp_path):
    task = build_from_spec(SPEC)
    a, b = tmp_path / "a", tmp_path / "b"
    precompute(task, a, directions=4, degree=2, chunk=2, seed=2)
    precompute(task, b, directions=4, degree=2, chunk=2, seed=2, device="cpu")
    assert files(a) == files(b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_device_cuda_agrees_with_cpu(tmp_path):  # pragma: no cover - no GPU in CI
    from delsketch.sketch import Sketch

    task = build_from_spec(SPEC)
    precompute(task, tmp_path / "cpu", directions=4, degree=2, chunk=2, seed=2)
    with torch.device("cuda"):
        gtask = build_from_spec(SPEC)
    precompute(gtask, tmp_path / "gpu", directions=4, degree=2, chunk=2, seed=2, device="cuda")
    a, b = Sketch.load(tmp_path / "cpu", task), Sketch.load(tmp_path / "gpu", task)
    assert a.predict("test:mean", [0, 1]).estimate == pytest.approx(b.predict("test:mean", [0, 1]).estimate, rel=1e-9)


def test_a_task_file_runs_in_worker_processes_and_ray_is_never_imported(task_file, tmp_path):
    """A fresh interpreter imports delsketch (CLI and audit included) and precomputes the user's own task (not a
    preset) in two spawned workers that rebuild it from its file: the bytes are those of one process here, and
    ``ray`` never appears in ``sys.modules``."""
    ref = f"{task_file}:build"
    one, two = tmp_path / "one", tmp_path / "two"
    precompute(load_task_file(ref), one, directions=8, degree=2, chunk=2, seed=4)
    script = tmp_path / "noray.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import delsketch, delsketch.apps.cli, delsketch.executors, delsketch.audit
        from delsketch.sketch import precompute
        from delsketch.tasks import file_factory, load_task_file
        if __name__ == "__main__":
            precompute(load_task_file({ref!r}), {str(two)!r}, directions=8, degree=2, chunk=2, seed=4,
                       task_factory=file_factory({ref!r}), executor="process", workers=2)
            print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
    """))
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
    assert files(one) == files(two) and len(files(one)) == 6


def _children(pid: int) -> set[int]:
    out = set()
    for t in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (t / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc (Linux)")
def test_worker_processes_die_with_a_killed_parent(tmp_path):
    """SIGKILL the process that runs a process-pool precompute while its workers train (a chunk takes ~30 s
    here): every worker is gone within 8 s (the watchdog polls each second; 8 s leaves room for a loaded machine,
    where 3 s was once too short) instead of finishing its chunk or lingering."""
    out = tmp_path / "s"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        from delsketch.sketch import precompute
        from delsketch.tasks import build_from_spec, factory
        spec = {{"preset": "digits", "data": None, "steps": None, "epochs": 300}}
        if __name__ == "__main__":
            precompute(build_from_spec(spec), {str(out)!r}, directions=4, degree=3, chunk=2,
                       task_factory=factory(spec), executor="process", workers=2)
    """))
    p = subprocess.Popen([sys.executable, str(script)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        workers: set = set()
        while time.time() < deadline and p.poll() is None:
            workers = _children(p.pid)
            if _busy(workers):
                break
            time.sleep(0.05)
        assert p.poll() is None, p.stderr.read().decode()
        assert _busy(workers), workers
        p.kill()
        p.wait()
        t0 = time.time()
        while time.time() < t0 + 8 and any(_alive(w) for w in workers):
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), [w for w in workers if _alive(w)]
        assert not (out / "manifest.json").exists()  # killed mid-chunk: no chunk had finished
    finally:
        if p.poll() is None:
            p.kill()


def _busy(pids) -> bool:
    """At least two of ``pids`` have used a second of CPU (spawned workers have imported torch and are training)."""
    tick = os.sysconf("SC_CLK_TCK")
    n = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        n += (int(f[11]) + int(f[12])) / tick > 1.0
    return n >= 2


@pytest.mark.parametrize("args, needle", [
    (["--executor", "dask"], "unknown executor 'dask'"),
    (["--executor", "ray://"], "needs a host and port"),
    (["--device", "warp-drive"], "unknown device 'warp-drive'"),
    (["--executor", "local", "--workers", "2"], "executor 'local' runs one job at a time"),
])
def test_bad_executor_and_device_options_are_one_line_errors(args, needle, tmp_path, capsys):
    from delsketch.apps.cli import main

    rc = main(["sketch", "--preset", "digits", "--directions", "4", "--degree", "1", "--out", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (rc, err)


def test_a_stored_farm_resumes_without_rerunning_finished_jobs(tmp_path):
    """Leave-one-out retrains kept in a store: a bigger audit later reuses the finished retrains (their files are
    untouched), a damaged result file is recomputed, and the scores equal an audit without a store."""
    from delsketch.audit import memorization

    task = build_from_spec(SPEC)
    store = tmp_path / "jobs"
    full = memorization(task, route="loo", indices=[0, 1, 2, 3])
    part = memorization(task, route="loo", indices=[0, 1], store=store)
    assert part.scores == memorization(task, route="loo", indices=[0, 1]).scores
    first = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    assert len(first) == 2
    again = memorization(task, route="loo", indices=[0, 1, 2, 3], store=store)
    assert again.scores == full.scores
    now = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    assert len(now) == 4 and all(now[k] == v for k, v in first.items())
    victim = store / sorted(first)[0]
    b = bytearray(victim.read_bytes())
    b[-1] ^= 1
    victim.write_bytes(bytes(b))
    assert memorization(task, route="loo", indices=[0, 1, 2, 3], store=store).scores == full.scores
    assert victim.read_bytes() != bytes(b)  # rewritten
