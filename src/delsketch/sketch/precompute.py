"""Precompute: m ring runs with ``w = z psi_j``, chunk by chunk, resumable, byte-reproducible."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from safetensors.torch import load_file

from .. import series as taylor
from ..io import atomic_save_tensors, sha256_file, write_json
from ..training import Task
from .core import FORMAT, SketchError, directions, ring_train, weight_series
from .store import Sketch, SketchConfig, chunk_name, complex_to_real, manifest, read_manifest, real_to_complex

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
    workers: int = 1,
) -> "Sketch":
    """Build (or resume) a sketch in directory ``out``.

    Directions are processed in chunks of ``chunk``; each chunk file is written atomically and recorded in
    the manifest with its checksum, so an interrupted run resumes where it stopped. ``progress(done, total)``
    is called after every training step with counts in direction-steps. ``task_spec`` (JSON, recorded in the manifest) lets the CLI
    rebuild the task on load. ``max_chunks`` stops after that many new chunks (for tests of resumption).
    ``only_chunks`` computes just those chunk indices: chunks are independent, so workers can build disjoint
    sets of chunk files elsewhere, and copying every chunk file into one directory and running ``precompute``
    there again (which finds them, verifies them and records them) assembles the sketch.
    ``workers`` > 1 computes chunks in that many processes at once (one torch thread each; on a 2-core
    machine two workers do about twice the work of one). The workers rebuild the task by calling ``task_factory``
    (a picklable zero-argument callable, e.g. ``delsketch.tasks.factory(spec)``), so it is required then; the numbers are those of ``workers=1`` with one torch thread. The
    workers are spawned, so a script that calls this needs the usual ``if __name__ == "__main__":`` guard.
    """
    cfg = SketchConfig(directions=directions, degree=degree, seed=seed, chunk=chunk, steps=steps)
    cfg.validate(task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a killed writer; the files they were for are rewritten
        stale.unlink()
    mpath = out / "manifest.json"
    chunks: dict[str, dict] = {}
    base_sha = None
    if mpath.exists():
        old = read_manifest(out)
        mine = manifest(task, cfg, {}, None, task_spec)
        for key in ("format", "fingerprint", "config", "steps", "n"):
            if old.get(key) != mine.get(key):
                raise SketchError(
                    f"{out} holds a different sketch ({key} differs); choose another --out or delete it"
                )
        chunks = old.get("chunks", {})
        base_sha = old.get("base")
        # drop chunk records whose files are missing or damaged: they will be recomputed
        for name in list(chunks):
            p = out / name
            if not p.exists() or sha256_file(p) != chunks[name]["sha256"]:
                del chunks[name]
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
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers > 1 and task_factory is None:
        raise ValueError("workers > 1 needs task_factory (the workers rebuild the task with it); "
                         "for a task built in Python run chunks in separate processes with only_chunks")
    todo: list[tuple[int, int, int]] = []  # (chunk index, first direction, count)
    for ci, j0 in enumerate(starts):
        name = chunk_name(ci)
        if only_chunks is not None and ci not in only_chunks:
            continue
        if name not in chunks and (out / name).exists():
            adopted = _adopt_chunk(out / name, j0, min(chunk, directions - j0), seed, task.n)
            if adopted is not None:
                chunks[name] = adopted
                done += adopted["count"] * n_steps
                if base_sha is None and (out / "base.safetensors").exists():
                    base_sha = sha256_file(out / "base.safetensors")
                write_json(mpath, manifest(task, cfg, chunks, base_sha, task_spec))
        if name in chunks:
            continue
        if max_chunks is not None and len(todo) >= max_chunks:
            break
        todo.append((ci, j0, min(chunk, directions - j0)))

    def record(ci: int, j0: int, count: int, base: dict, seconds: float) -> None:
        nonlocal base_sha
        bpath = out / "base.safetensors"
        if base_sha is None:
            atomic_save_tensors(bpath, base, {"format": FORMAT})
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

    if workers == 1 or not todo:  # (workers > 1 uses worker processes even for one chunk: same threads, same bits)
        for ci, j0, count in todo:
            base_done = done

            def cb(s, _b=base_done, _c=count):
                if progress:
                    progress(_b + (s + 1) * _c, total)

            base, seconds = _compute_chunk(task, out, ci, j0, count, seed, degree, n_steps, cb)
            done += count * n_steps
            record(ci, j0, count, base, seconds)
    else:
        _precompute_parallel(task, out, todo, seed, degree, n_steps, task_factory, min(workers, len(todo)),
                             record, lambda d: progress(done + d, total) if progress else None)
    if not chunks:
        write_json(mpath, manifest(task, cfg, chunks, base_sha, task_spec))
    return Sketch.load(out, task)


def _compute_chunk(task: Task, out: Path, ci: int, j0: int, count: int, seed: int, degree: int, n_steps: int,
                   cb: Callable[[int], None]) -> tuple[dict, float]:
    """Ring-train directions ``j0 .. j0+count-1`` and write chunk file ``ci`` atomically.

    Returns the degree-0 parameters (plain training, the same in every chunk) and the wall time."""
    psi = directions(seed, range(j0, j0 + count), task.n)
    t0 = time.perf_counter()
    params = ring_train(task, weight_series(psi, degree), steps=n_steps, callback=lambda s, loss: cb(s))
    tensors = {"psi": complex_to_real(psi)}
    base = {}
    for k, v in params.items():
        c = taylor.coefficients(v)
        c = c.expand(count, *c.shape[1:])
        base[k] = c[0, 0].real.clone()
        tensors[f"param.{k}"] = complex_to_real(c[:, 1:])
    atomic_save_tensors(out / chunk_name(ci), tensors, {"format": FORMAT, "first": str(j0), "count": str(count)})
    return base, time.perf_counter() - t0


# state of a worker process of _precompute_parallel
_WORKER: dict = {}


def _worker_init(task_factory: Callable[[], Task], fingerprint: str, queue) -> None:
    torch.set_num_threads(1)
    task = task_factory()
    error = None if task.fingerprint() == fingerprint else "a worker rebuilt a different task from task_factory"
    _WORKER.update(task=task, queue=queue, error=error)  # an initializer that raises breaks the pool


def _worker_chunk(out: str, ci: int, j0: int, count: int, seed: int, degree: int, n_steps: int):
    if _WORKER["error"]:
        raise SketchError(_WORKER["error"])
    queue = _WORKER["queue"]
    every = max(1, n_steps // 200)

    def cb(s: int) -> None:
        if (s + 1) % every == 0 or s + 1 == n_steps:
            queue.put((ci, (s + 1) * count))

    base, seconds = _compute_chunk(_WORKER["task"], Path(out), ci, j0, count, seed, degree, n_steps, cb)
    return ci, j0, count, base, seconds


def _precompute_parallel(task, out, todo, seed, degree, n_steps, task_factory, workers, record, progress) -> None:
    """Chunks in ``workers`` spawned processes; the parent records each finished chunk and reports progress."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if task_factory().fingerprint() != task.fingerprint():
        raise SketchError("task_factory does not rebuild this task (fingerprints differ): the workers would "
                          "compute another task's sketch")
    ctx = mp.get_context("spawn")
    q = ctx.Manager().Queue()
    progress_by_chunk: dict[int, int] = {}
    finished = 0
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(task_factory, task.fingerprint(), q)) as ex:
        pending = {ex.submit(_worker_chunk, str(out), ci, j0, count, seed, degree, n_steps) for ci, j0, count in todo}
        try:
            while pending:
                ready, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        ci, d = q.get_nowait()
                    except queue_mod.Empty:
                        break
                    progress_by_chunk[ci] = d
                for f in ready:
                    ci, j0, count, base, seconds = f.result()
                    progress_by_chunk.pop(ci, None)
                    finished += count * n_steps
                    record(ci, j0, count, base, seconds)
                progress(finished + sum(progress_by_chunk.values()))
        except BaseException:  # Ctrl-C or a failed chunk: stop the other workers now, not after their chunks
            for f in pending:
                f.cancel()
            for proc in list((getattr(ex, "_processes", None) or {}).values()):
                proc.terminate()
            raise




def _adopt_chunk(path: Path, first: int, count: int, seed: int, n: int) -> Optional[dict]:
    """A chunk file computed elsewhere is taken if it parses and holds exactly the directions it should."""
    try:
        t = load_file(path)
        psi = real_to_complex(t["psi"])
    except Exception:
        return None
    if psi.shape != (count, n) or not torch.equal(psi, directions(seed, range(first, first + count), n)):
        return None
    return {"first": first, "count": count, "sha256": sha256_file(path)}

