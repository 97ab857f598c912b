"""Precompute: m ring runs with ``w = z psi_j``, chunk by chunk, resumable, byte-reproducible."""

from __future__ import annotations

import copy
import os
import json
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .. import series as taylor
from ..executors import Executor, get_executor, job_progress
from ..io import LockedError, atomic_save_tensors, directory_lock, sha256_file, write_json
from ..training import Task
from ..training.memory import DEFAULT_MEMORY_FRACTION, RESERVE_BYTES, available_bytes, directions_that_fit, parse_bytes
from .core import FORMAT, RecoveryWarning, SketchError, directions, ring_train, weight_series
from .store import (Sketch, SketchConfig, chunk_name, complex_to_real, manifest, read_manifest, real_to_complex,
                    tensor_digest)

def precompute(
    task: Task,
    out: Union[str, Path],
    directions: int,
    degree: int,
    seed: int = 0,
    chunk: int = 64,
    steps: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    task_spec: Optional[dict] = None,
    task_factory: Optional[Callable[[], Task]] = None,
    max_chunks: Optional[int] = None,
    only_chunks: Optional[Sequence[int]] = None,
    workers: Optional[int] = None,
    executor: Union[str, Executor, None] = None,
    device: Union[str, torch.device, None] = None,
    memory_budget: Union[int, float, str, None] = None,
) -> "Sketch":
    """Build (or resume) a sketch in directory ``out``.

    Directions are processed in chunks of ``chunk``; each chunk file is written atomically and recorded in
    the manifest with its checksum, so an interrupted run resumes where it stopped. ``progress(done, total)``
    is called after every training step with counts in direction-steps. ``task_spec`` (JSON, recorded in the manifest) lets the CLI
    rebuild the task on load. ``max_chunks`` stops after that many new chunks (for tests of resumption).
    ``only_chunks`` computes just those chunk indices: chunks are independent, so workers can build disjoint
    sets of chunk files elsewhere, and copying every chunk file into one directory and running ``precompute``
    there again (which finds them, verifies them and records them) assembles the sketch.
    Chunks are jobs of a :mod:`delsketch.executors` farm: ``executor`` is ``"local"`` (this process),
    ``"process"`` (``workers`` spawned processes, one torch thread each; on a 2-core machine two workers do
    about twice the work of one), ``"ray"`` / ``"ray://HOST:PORT"`` (a Ray cluster), or an
    :class:`~delsketch.executors.Executor`; the default is ``"local"``, or ``"process"`` for ``workers`` > 1
    (``workers=None``: one per core for ``"process"``, the cluster's CPUs for ``"ray"``). Executors other than
    ``"local"`` rebuild the task in their workers by calling ``task_factory`` (a picklable zero-argument
    callable: ``delsketch.tasks.factory(spec)``, or ``delsketch.tasks.file_factory("file.py:function")``), so
    it is required then; the
    bytes are those of one process with one torch thread, whichever executor computed which chunk, so one
    executor resumes another's partial sketch. Local workers are spawned, so a script that uses them needs the
    usual ``if __name__ == "__main__":`` guard. ``device`` (e.g. ``"cuda"``) runs the ring training there
    (the task's own tensors must be usable on that device); the files are written from CPU copies.

    ``memory_budget`` (bytes, or a size such as ``"6GB"``) bounds the memory of one ring run: a chunk whose
    directions would need more (:func:`delsketch.training.memory.ring_bytes_per_direction`) is trained in
    several runs of fewer directions and written as one file, so the file layout never depends on the budget.
    Without one, a run may use half the memory available when the precompute starts, shared among the local
    worker processes; the chunk is then split only when memory is short.

    Resuming never trusts bytes it cannot verify: a recorded chunk is kept only if it hashes to its manifest
    record, an unrecorded one (copied in) only if its tensors hash to the digest stored inside it and it holds
    the right directions; anything else is recomputed with a :class:`RecoveryWarning` (one line), and the
    result is byte-identical to a clean run. A directory holding the same sketch with fewer directions is
    grown to ``directions`` (byte-identical to a sketch made at that size); more directions than asked for is
    an error. A lock (``fcntl.flock`` on ``out/.lock``) makes a second concurrent writer fail at once.
    """
    cfg = SketchConfig(directions=directions, degree=degree, seed=seed, chunk=chunk, steps=steps)
    cfg.validate(task)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    executor = get_executor(executor, workers)
    if executor.remote and task_factory is None:
        raise ValueError(f"executor {executor.name!r} needs task_factory (its workers rebuild the task with it: "
                         "delsketch.tasks.factory(spec) for a preset, delsketch.tasks.file_factory('file.py:function') "
                         "for a task defined in a file)")
    device = _check_device(device, here=executor.name != "ray")
    batch = _directions_per_run(task, cfg, memory_budget, executor, device)
    if device is not None and device.startswith("cuda") and getattr(executor, "num_gpus", None) == 0:
        executor = copy.copy(executor)
        executor.num_gpus = 1  # a Ray job on a GPU asks for one
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SketchError(f"{out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with directory_lock(out):
            return _build(task, out, cfg, progress, task_spec, task_factory, max_chunks, only_chunks, executor, device,
                          batch)
    except LockedError as e:
        raise SketchError(f"{e}: another precompute is writing this sketch; wait for it or choose another --out") from None


def _directions_per_run(task: Task, cfg: SketchConfig, memory_budget, executor, device=None) -> int:
    """How many directions one ring run carries: the chunk, or fewer when the memory budget needs it (without a
    budget: half the free memory of the device the runs use, host memory unless ``device`` is a CUDA device)."""
    explicit = memory_budget is not None
    if explicit:
        budget = parse_bytes(memory_budget)
    else:
        on_gpu = device is not None and str(device).startswith("cuda") and torch.cuda.is_available()
        avail = torch.cuda.mem_get_info(torch.device(device))[0] if on_gpu else available_bytes()
        if avail is None:
            return cfg.chunk
        # processes that may run ring runs side by side on this machine share what is available
        local = max(1, getattr(executor, "workers", None) or ((os.cpu_count() or 1) if executor.remote else 1))
        budget = int(avail * DEFAULT_MEMORY_FRACTION) // local
    fit, per = directions_that_fit(task, cfg.degree, budget)
    if fit >= cfg.chunk:
        return cfg.chunk
    if fit < 1:
        msg = (f"one direction of this task at degree {cfg.degree} needs about {per / 2**20:.0f} MiB (plus "
               f"{RESERVE_BYTES >> 20} MiB for the run), more than the memory budget of {budget / 2**20:.0f} MiB")
        if explicit:
            raise SketchError(msg + ": raise --memory-budget or lower the degree")
        warnings.warn(msg + ": trying one direction per run", ResourceWarning)
        return 1
    return fit


def _build(task, out, cfg, progress, task_spec, task_factory, max_chunks, only_chunks, executor, device,
           batch) -> "Sketch":
    """The body of :func:`precompute`, run while holding the directory's lock."""
    directions, degree, seed, chunk = cfg.directions, cfg.degree, cfg.seed, cfg.chunk
    for stale in out.glob(".*.tmp"):  # left by a killed writer; the files they were for are rewritten
        stale.unlink()
    mpath = out / "manifest.json"
    chunks, base_sha, skip = _verified_records(task, out, cfg, task_spec)
    n_steps = cfg.steps if cfg.steps is not None else task.steps
    starts = list(range(0, directions, chunk))
    total = directions * n_steps
    done = sum(chunks[chunk_name(i)]["count"] for i in range(len(starts)) if chunk_name(i) in chunks) * n_steps
    if progress:
        progress(done, total)
    timings = {"chunks": {}}
    tpath = out / "timings.json"
    if tpath.exists():
        try:
            timings = json.loads(tpath.read_text())
        except ValueError:
            pass
        if not isinstance(timings, dict) or not isinstance(timings.get("chunks"), dict):
            timings = {"chunks": {}}
    bpath = out / "base.safetensors"
    if base_sha is None and bpath.exists() and not _self_verified(bpath, task.fingerprint())[0]:
        warnings.warn(f"{bpath}: unrecorded base file that does not prove itself intact: recomputing it "
                      "(with the first chunk)", RecoveryWarning)
        bpath.unlink()
    todo: list[tuple[int, int, int]] = []  # (chunk index, first direction, count)
    for ci, j0 in enumerate(starts):
        name = chunk_name(ci)
        if only_chunks is not None and ci not in only_chunks:
            continue
        adoptable = base_sha is not None or bpath.exists() or ci != 0  # chunk 0 rewrites a missing base
        if name not in chunks and name not in skip and adoptable and (out / name).exists():
            adopted = _adopt_chunk(out / name, j0, min(chunk, directions - j0), seed, task)
            if adopted is None:
                warnings.warn(f"{out / name}: unrecorded chunk file that does not prove itself intact (its content "
                              "digest, directions or range differ): recomputing it", RecoveryWarning)
            else:
                chunks[name] = adopted
                done += adopted["count"] * n_steps
                if base_sha is None and bpath.exists():
                    base_sha = sha256_file(bpath)
                write_json(mpath, manifest(task, cfg, chunks, base_sha, task_spec))
        if name in chunks:
            continue
        if max_chunks is not None and len(todo) >= max_chunks:
            break
        todo.append((ci, j0, min(chunk, directions - j0)))

    def record(ci: int, j0: int, count: int, base: dict, seconds: float) -> None:
        nonlocal base_sha
        if base_sha is None:
            atomic_save_tensors(bpath, base, {"format": FORMAT, "digest": tensor_digest(base),
                                              "fingerprint": task.fingerprint()})
            base_sha = sha256_file(bpath)
        else:
            stored = load_file(bpath)
            for k in base:
                if not torch.allclose(stored[k], base[k], rtol=1e-12, atol=1e-12):
                    raise SketchError(f"degree-0 part of {k} differs between chunks: training is not deterministic")
        name = chunk_name(ci)
        chunks[name] = {"first": j0, "count": count, "sha256": sha256_file(out / name)}
        write_json(mpath, manifest(task, cfg, chunks, base_sha, task_spec))
        timings["chunks"][name] = round(seconds, 3)
        write_json(tpath, timings)

    if todo:
        if executor.remote and task_factory().fingerprint() != task.fingerprint():
            raise SketchError("task_factory does not rebuild this task (fingerprints differ): the workers would "
                              "compute another task's sketch")
        partial: dict[int, float] = {}  # job -> direction-steps reported by the running job

        def on_progress(k: int, units: float) -> None:
            partial[k] = units
            if progress:
                progress(done + sum(partial.values()), total)

        def on_result(k: int, res) -> None:
            nonlocal done
            ci, j0, count, base, seconds = res
            partial.pop(k, None)
            done += count * n_steps
            record(ci, j0, count, base, seconds)
            if progress:
                progress(done + sum(partial.values()), total)

        jobs = [(str(out), ci, j0, count, seed, degree, n_steps, device, batch) for ci, j0, count in todo]
        executor.map(_chunk_job, jobs, task=task, factory=task_factory, on_result=on_result, on_progress=on_progress)
    for stale in out.glob(".*.tmp"):  # a worker killed mid-write (its job was run again)
        stale.unlink(missing_ok=True)
    # always (re)write the manifest: a resume repairs fields that were edited but do not change the sketch
    write_json(mpath, manifest(task, cfg, chunks, base_sha, task_spec))
    return Sketch.load(out, task)


def _check_device(device, here: bool = True) -> Optional[str]:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if here and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here")
    return str(dev)


def _compute_chunk(task: Task, out: Path, ci: int, j0: int, count: int, seed: int, degree: int, n_steps: int,
                   cb: Callable[[int, int], None], device: Optional[str] = None,
                   batch: Optional[int] = None) -> tuple[dict, float]:
    """Ring-train directions ``j0 .. j0+count-1`` (in runs of at most ``batch`` directions) and write chunk file
    ``ci`` atomically. ``cb(directions done before this run, step)``.

    Returns the degree-0 parameters (plain training, the same in every chunk) and the wall time."""
    psi = directions(seed, range(j0, j0 + count), task.n)
    batch = count if batch is None else max(1, min(batch, count))
    t0 = time.perf_counter()
    parts: dict[str, list] = {}
    for b0 in range(0, count, batch):
        sub = psi[b0 : b0 + batch]
        params = ring_train(task, weight_series(sub, degree), steps=n_steps,
                            callback=lambda s, loss, b0=b0: cb(b0, s), device=device)
        for k, v in params.items():
            c = taylor.coefficients(v).cpu()
            parts.setdefault(k, []).append(c.expand(len(sub), *c.shape[1:]))
        del params
    tensors = {"psi": complex_to_real(psi)}
    base = {}
    for k, cs in parts.items():
        c = cs[0] if len(cs) == 1 else torch.cat(cs)
        base[k] = c[0, 0].real.clone()
        tensors[f"param.{k}"] = complex_to_real(c[:, 1:])
    meta = {"format": FORMAT, "first": str(j0), "count": str(count), "digest": tensor_digest(tensors),
            "fingerprint": task.fingerprint()}
    atomic_save_tensors(out / chunk_name(ci), tensors, meta)
    return base, time.perf_counter() - t0


def _chunk_job(task: Task, out: str, ci: int, j0: int, count: int, seed: int, degree: int, n_steps: int,
               device: Optional[str] = None, batch: Optional[int] = None):
    """One job of the farm (any executor): chunk ``ci`` written to ``out``; progress in direction-steps."""
    every = max(1, n_steps // 200)
    run = count if batch is None else max(1, min(batch, count))

    def cb(done: int, s: int) -> None:
        if (s + 1) % every == 0 or s + 1 == n_steps:
            job_progress(done * n_steps + (s + 1) * min(run, count - done))

    base, seconds = _compute_chunk(task, Path(out), ci, j0, count, seed, degree, n_steps, cb, device, batch)
    return ci, j0, count, base, seconds


def _verified_records(task: Task, out: Path, cfg: SketchConfig, task_spec) -> tuple[dict, Optional[str], set]:
    """What an existing manifest in ``out`` contributes to this run: the chunk records that still hold, the
    base checksum, and the chunk names whose files must not be adopted (recomputed instead).

    A record holds when its file is present and hashes to the recorded sha256. A chunk whose bytes differ
    is recomputed (one warning line); a damaged base drops chunk 0 as well, whose recomputation rewrites it.
    The manifest must describe the same sketch except that it may have fewer directions: then this run
    grows it (same seed stream), and a partial last chunk is recomputed at its full size."""
    for name in ("manifest.json", "base.safetensors", "timings.json"):
        if (out / name).exists() and not (out / name).is_file():
            raise SketchError(f"{out / name} is not a file; remove it or choose another --out")
    for i in range(-(-cfg.directions // cfg.chunk)):
        if (out / chunk_name(i)).exists() and not (out / chunk_name(i)).is_file():
            raise SketchError(f"{out / chunk_name(i)} is not a file; remove it or choose another --out")
    if not (out / "manifest.json").exists():
        return {}, None, set()
    old = read_manifest(out)
    mine = manifest(task, cfg, {}, None, task_spec)
    for key in ("format", "fingerprint", "config", "steps", "n"):
        a, b = old.get(key), mine.get(key)
        if key == "config":
            a, b = {**a, "directions": None}, {**b, "directions": None}
        if a != b:
            raise SketchError(f"{out} holds a different sketch ({key} differs); choose another --out or delete it")
    stored = old["config"]["directions"]
    if stored > cfg.directions:
        raise SketchError(f"{out} holds a sketch of {stored} directions, more than the {cfg.directions} asked for; "
                          f"a sketch only grows: ask for {stored} or more, or choose another --out")
    chunks, skip = {}, set()
    for name, rec in sorted(old["chunks"].items()):
        p = out / name
        if rec["count"] != min(cfg.chunk, cfg.directions - rec["first"]):
            skip.add(name)  # the partial last chunk of a smaller sketch: recomputed at its full size
        elif not p.exists():
            warnings.warn(f"{p}: recorded chunk file is missing: recomputing it", RecoveryWarning)
        elif sha256_file(p) != rec["sha256"]:
            skip.add(name)
            warnings.warn(f"{p}: bytes differ from the checksum in the manifest: recomputing it", RecoveryWarning)
        else:
            chunks[name] = rec
    base_sha = old.get("base")
    bpath = out / "base.safetensors"
    if base_sha is not None and (not bpath.exists() or sha256_file(bpath) != base_sha):
        warnings.warn(f"{bpath}: missing or differs from the checksum in the manifest: recomputing it "
                      "(with the first chunk)", RecoveryWarning)
        base_sha = None
        bpath.unlink(missing_ok=True)
        chunks.pop(chunk_name(0), None)
        skip.add(chunk_name(0))
    return chunks, base_sha, skip


def _self_verified(path: Path, fingerprint: str) -> tuple[bool, dict, dict]:
    """(intact, metadata, tensors) of a file written by this module: intact when its tensors hash to the
    digest stored inside it at write time and it was written for the task with this fingerprint."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("delsketch", "{}"))
        t = load_file(path)
    except Exception:
        return False, {}, {}
    ok = isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("digest") == tensor_digest(t)
    ok = ok and meta.get("fingerprint") == fingerprint
    return ok, meta, t


def _adopt_chunk(path: Path, first: int, count: int, seed: int, task: Task) -> Optional[dict]:
    """A chunk file with no record here (computed elsewhere, e.g. with ``only_chunks``, and copied in) is
    adopted only if it proves itself intact: the tensors hash to the digest stored inside the file when it was
    written, and it holds exactly the directions and range it should. Anything else is recomputed."""
    ok, meta, t = _self_verified(path, task.fingerprint())
    n = task.n
    if not ok or "psi" not in t:
        return None
    psi = real_to_complex(t["psi"])
    if (meta.get("first"), meta.get("count")) != (str(first), str(count)):
        return None
    if psi.shape != (count, n) or not torch.equal(psi, directions(seed, range(first, first + count), n)):
        return None
    return {"first": first, "count": count, "sha256": sha256_file(path)}
