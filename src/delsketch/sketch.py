"""Deletion sketches: precompute, store, predict, diagnose.

Example i of a task carries the loss weight ``1 - w_i``; an output f of the trained model is a function
f(w), and deleting the set D means evaluating f(1_D). A sketch is m ring runs with ``w = z psi_j``,
psi_j uniform on the unit sphere of C^n. Every output computed from the trained series-valued
parameters is a polynomial in z whose degree-r coefficient c_r(psi) satisfies

    E[ C(n+r-1, r) c_r(psi) (sum_i v_i conj(psi_i))^r ] = T_r[v^r],

the degree-r Taylor term of f at v (here v = W 1_D). Summing r = 0..k estimates f(W 1_D).

Layout of a sketch directory::

    manifest.json           config, fingerprints, versions, chunk checksums (no timestamps)
    base.safetensors        degree-0 parameters (= plain training), stored once
    chunk-00000.safetensors psi and degree 1..k coefficients of every parameter, for a range of directions
    timings.json            wall times (kept out of the manifest so files are reproducible byte for byte)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import __version__, taylor
from .run import Task, train

FORMAT = "delsketch-sketch/1"
Query = Union[str, Callable[[dict], torch.Tensor]]


class SketchError(ValueError):
    """A sketch directory is missing, corrupt, or does not match the task."""


class StabilityWarning(UserWarning):
    """A prediction goes past the deletion size the stability diagnostics consider safe."""


# ----------------------------------------------------------------------------------------------
# directions
# ----------------------------------------------------------------------------------------------


def direction(seed: int, index: int, n: int) -> torch.Tensor:
    """Direction ``index`` of a sketch: complex Gaussian in C^n normalized to unit length.

    Generated from (seed, index) alone, so any direction can be regenerated independently."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index), 0x5E7C])))
    z = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    z /= np.linalg.norm(z)
    return torch.from_numpy(z.astype(np.complex128))


def directions(seed: int, indices: Iterable[int], n: int) -> torch.Tensor:
    return torch.stack([direction(seed, j, n) for j in indices])


def weight_series(psi: torch.Tensor, degree: int) -> taylor.Series:
    """``w = z psi`` as a Series of logical shape [n]: psi is [m, n] complex."""
    m, n = psi.shape
    c = torch.zeros(m, degree + 1, n, dtype=torch.complex128)
    if degree >= 1:
        c[:, 1] = psi
    return taylor.variable(c)


def ring_train(task: Task, w: taylor.Series, steps: Optional[int] = None, callback=None) -> dict:
    """One ring run: train the task with series weights ``w`` (parameters start as constants)."""
    params0 = {k: taylor.lift(v, w.degree) for k, v in task.init_params().items()}
    with taylor.module_context():
        return train(task, w=w, params=params0, steps=steps, callback=callback)


def evaluate(task: Task, params: dict, query: Query) -> torch.Tensor:
    """The value of an output on (possibly series-valued) parameters."""
    with torch.no_grad():
        out = query(params) if callable(query) else task.query(params, query)
    if not isinstance(out, torch.Tensor) or out.dim() != 0:
        raise ValueError("a query must return a 0-dim tensor")
    return out


def query_name(q: Query) -> str:
    return q if isinstance(q, str) else getattr(q, "__name__", "query")


# ----------------------------------------------------------------------------------------------
# the exact series for one deletion set
# ----------------------------------------------------------------------------------------------


@dataclass
class SeriesResult:
    query: str
    coefficients: list[float]  # real parts, degree 0 first
    imag_max: float  # largest |imaginary part| (0 up to rounding for real deletions)
    value_at_1: float  # sum of the coefficients: the degree-k prediction of f(W 1_D)
    partial_sums: list[float]
    weight: float
    degree: int

    def to_json(self) -> dict:
        return asdict(self)


def exact_series(
    task: Task,
    delete: Sequence[int],
    degree: int,
    queries: Sequence[Query],
    weight: float = 1.0,
    steps: Optional[int] = None,
    callback=None,
) -> list[SeriesResult]:
    """Exact Taylor coefficients of t -> f(t W 1_D) from one ring run with w = z W 1_D."""
    v = torch.zeros(1, task.n, dtype=torch.complex128)
    v[0, list(delete)] = weight
    params = ring_train(task, weight_series(v, degree), steps=steps, callback=callback)
    out = []
    for q in queries:
        c = taylor.coefficients(evaluate(task, params, q))[0]
        re = c.real.tolist()
        out.append(
            SeriesResult(
                query=query_name(q),
                coefficients=re,
                imag_max=float(c.imag.abs().max()),
                value_at_1=float(sum(re)),
                partial_sums=np.cumsum(re).tolist(),
                weight=weight,
                degree=degree,
            )
        )
    return out


def first_order(
    task: Task,
    queries: Sequence[Query],
    steps: Optional[int] = None,
    callback=None,
) -> torch.Tensor:
    """Exact first-order effects: ``E[i, q] = d f_q / d w_i`` at ``w = 0`` for every training example i.

    The derivative of each output with respect to each example's deletion weight through the whole
    training run (minibatch order, momentum, Adam, learning-rate schedule: the run as it happened), by
    reverse mode through the unrolled run: one backward pass per output gives all n effects.
    ``E[D].sum(0)`` is the degree-1 Taylor term of ``t -> f(t 1_D)`` (what :func:`exact_series` computes
    one set at a time), the first-order prediction of deleting D; ``E[i] > 0`` means that deleting
    example i raises the output. Holds the whole run's autograd graph in memory (about 0.9 GB for the
    paper's 1000-step microgpt). Returns ``[n, len(queries)]`` float64.

    Needs an optimizer whose update is differentiable (the built-in SGD, Adam, AdamW are; see
    :func:`delsketch.optim.differentiable`)."""
    from .run import NonFiniteError

    if len(queries) == 0:
        raise ValueError("first_order needs at least one query")
    w = torch.zeros(task.n, dtype=torch.float64, requires_grad=True)
    params = train(task, w=w, steps=steps, callback=callback, record=True)
    with torch.enable_grad():
        cols = []
        for j, q in enumerate(queries):
            f = q(params) if callable(q) else task.query(params, q)
            if not isinstance(f, torch.Tensor) or f.dim() != 0:
                raise ValueError("a query must return a 0-dim tensor")
            if not bool(torch.isfinite(f)):
                raise NonFiniteError(f"output {query_name(q)!r} is not finite after training")
            if not f.requires_grad:
                raise ValueError(f"output {query_name(q)!r} does not depend on the trained parameters through "
                                 "autograd (computed under torch.no_grad or detached?)")
            (g,) = torch.autograd.grad(f, w, retain_graph=j < len(queries) - 1, allow_unused=True)
            cols.append(torch.zeros(task.n, dtype=torch.float64) if g is None else g.detach())
    return torch.stack(cols, 1)


# ----------------------------------------------------------------------------------------------
# storage helpers
# ----------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # one metadata key: safetensors orders several keys nondeterministically, which breaks byte identity
        meta = {"delsketch": json.dumps(metadata, sort_keys=True)}
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _complex_to_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.contiguous())


def _real_to_complex(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(t.contiguous())


def _chunk_name(i: int) -> str:
    return f"chunk-{i:05d}.safetensors"


def _versions() -> dict:
    return {"delsketch": __version__, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------
# precompute
# ----------------------------------------------------------------------------------------------


@dataclass
class SketchConfig:
    directions: int
    degree: int
    seed: int = 0
    chunk: int = 64
    steps: Optional[int] = None  # None = the whole schedule

    def validate(self, task: Task) -> None:
        if self.directions < 1:
            raise ValueError(f"directions must be at least 1, got {self.directions}")
        if not 1 <= self.degree <= 100:
            raise ValueError(f"degree must lie in [1, 100], got {self.degree}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {self.chunk}")
        if self.steps is not None and not 0 <= self.steps <= task.steps:
            raise ValueError(f"steps must lie in [0, {task.steps}], got {self.steps}")


def _manifest(task: Task, cfg: SketchConfig, chunks: dict, base_sha: Optional[str], task_spec: Optional[dict]) -> dict:
    return {
        "format": FORMAT,
        "task": task.describe(),
        "task_spec": task_spec,
        "fingerprint": task.fingerprint(),
        "n": task.n,
        "steps": cfg.steps if cfg.steps is not None else task.steps,
        "config": asdict(cfg),
        "params": {k: list(v.shape) for k, v in task.init_params().items()},
        "direction_generator": "numpy PCG64(SeedSequence([seed, index, 0x5E7C])), complex Gaussian, unit norm",
        "versions": _versions(),
        "base": base_sha,
        "chunks": chunks,
    }


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
    max_chunks: Optional[int] = None,
    only_chunks: Optional[Sequence[int]] = None,
    workers: int = 1,
) -> "Sketch":
    """Build (or resume) a sketch in directory ``out``.

    Directions are processed in chunks of ``chunk``; each chunk file is written atomically and recorded in
    the manifest with its checksum, so an interrupted run resumes where it stopped. ``progress(done, total)``
    is called after every training step with counts in direction-steps. ``task_spec`` (JSON) lets the CLI
    rebuild the task on load. ``max_chunks`` stops after that many new chunks (for tests of resumption).
    ``only_chunks`` computes just those chunk indices: chunks are independent, so workers can build disjoint
    sets of chunk files elsewhere, and copying every chunk file into one directory and running ``precompute``
    there again (which finds them, verifies them and records them) assembles the sketch.
    ``workers`` > 1 computes chunks in that many processes at once (one torch thread each; on a 2-core
    machine two workers do about twice the work of one). The workers rebuild the task from ``task_spec``
    (a preset), so it is required then; the numbers are those of ``workers=1`` with one torch thread. The
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
        old = _read_manifest(out)
        mine = _manifest(task, cfg, {}, None, task_spec)
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
            if not p.exists() or _sha256_file(p) != chunks[name]["sha256"]:
                del chunks[name]
    n_steps = cfg.steps if cfg.steps is not None else task.steps
    starts = list(range(0, directions, chunk))
    total = directions * n_steps
    done = sum(chunks[_chunk_name(i)]["count"] for i in range(len(starts)) if _chunk_name(i) in chunks) * n_steps
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
    if workers > 1 and not (task_spec and task_spec.get("preset")):
        raise ValueError("workers > 1 needs task_spec naming a preset (the workers rebuild the task from it); "
                         "for a task built in Python run chunks in separate processes with only_chunks")
    todo: list[tuple[int, int, int]] = []  # (chunk index, first direction, count)
    for ci, j0 in enumerate(starts):
        name = _chunk_name(ci)
        if only_chunks is not None and ci not in only_chunks:
            continue
        if name not in chunks and (out / name).exists():
            adopted = _adopt_chunk(out / name, j0, min(chunk, directions - j0), seed, task.n)
            if adopted is not None:
                chunks[name] = adopted
                done += adopted["count"] * n_steps
                if base_sha is None and (out / "base.safetensors").exists():
                    base_sha = _sha256_file(out / "base.safetensors")
                _write_json(mpath, _manifest(task, cfg, chunks, base_sha, task_spec))
        if name in chunks:
            continue
        if max_chunks is not None and len(todo) >= max_chunks:
            break
        todo.append((ci, j0, min(chunk, directions - j0)))

    def record(ci: int, j0: int, count: int, base: dict, seconds: float) -> None:
        nonlocal base_sha
        bpath = out / "base.safetensors"
        if base_sha is None:
            _atomic_save_tensors(bpath, base, {"format": FORMAT})
            base_sha = _sha256_file(bpath)
        else:
            stored = load_file(bpath)
            for k in base:
                if not torch.allclose(stored[k], base[k], rtol=1e-12, atol=1e-12):
                    raise SketchError(f"degree-0 part of {k} differs between chunks: training is not deterministic")
        name = _chunk_name(ci)
        chunks[name] = {"first": j0, "count": count, "sha256": _sha256_file(out / name)}
        _write_json(mpath, _manifest(task, cfg, chunks, base_sha, task_spec))
        timings["chunks"][name] = round(seconds, 3)
        _write_json(tpath, timings)

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
        _precompute_parallel(task, out, todo, seed, degree, n_steps, task_spec, min(workers, len(todo)),
                             record, lambda d: progress(done + d, total) if progress else None)
    if not chunks:
        _write_json(mpath, _manifest(task, cfg, chunks, base_sha, task_spec))
    return Sketch.load(out, task)


def _compute_chunk(task: Task, out: Path, ci: int, j0: int, count: int, seed: int, degree: int, n_steps: int,
                   cb: Callable[[int], None]) -> tuple[dict, float]:
    """Ring-train directions ``j0 .. j0+count-1`` and write chunk file ``ci`` atomically.

    Returns the degree-0 parameters (plain training, the same in every chunk) and the wall time."""
    psi = directions(seed, range(j0, j0 + count), task.n)
    t0 = time.perf_counter()
    params = ring_train(task, weight_series(psi, degree), steps=n_steps, callback=lambda s, loss: cb(s))
    tensors = {"psi": _complex_to_real(psi)}
    base = {}
    for k, v in params.items():
        c = taylor.coefficients(v)
        c = c.expand(count, *c.shape[1:])
        base[k] = c[0, 0].real.clone()
        tensors[f"param.{k}"] = _complex_to_real(c[:, 1:])
    _atomic_save_tensors(out / _chunk_name(ci), tensors, {"format": FORMAT, "first": str(j0), "count": str(count)})
    return base, time.perf_counter() - t0


# state of a worker process of _precompute_parallel
_WORKER: dict = {}


def _worker_init(task_spec: dict, fingerprint: str, queue) -> None:
    from .presets import build_from_spec

    torch.set_num_threads(1)
    task = build_from_spec(task_spec)
    error = None if task.fingerprint() == fingerprint else "a worker rebuilt a different task from task_spec"
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


def _precompute_parallel(task, out, todo, seed, degree, n_steps, task_spec, workers, record, progress) -> None:
    """Chunks in ``workers`` spawned processes; the parent records each finished chunk and reports progress."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from .presets import build_from_spec

    if build_from_spec(task_spec).fingerprint() != task.fingerprint():
        raise SketchError("task_spec does not describe this task (fingerprints differ): the workers would "
                          "compute another task's sketch")
    ctx = mp.get_context("spawn")
    q = ctx.Manager().Queue()
    progress_by_chunk: dict[int, int] = {}
    finished = 0
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(task_spec, task.fingerprint(), q)) as ex:
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
        psi = _real_to_complex(t["psi"])
    except Exception:
        return None
    if psi.shape != (count, n) or not torch.equal(psi, directions(seed, range(first, first + count), n)):
        return None
    return {"first": first, "count": count, "sha256": _sha256_file(path)}


def _read_manifest(path: Path) -> dict:
    mpath = Path(path) / "manifest.json"
    if not mpath.exists():
        raise SketchError(f"{path}: no sketch here (manifest.json not found)")
    try:
        man = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SketchError(f"{mpath}: manifest is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise SketchError(f"{mpath}: not a delsketch sketch manifest (format {man.get('format') if isinstance(man, dict) else None!r})")
    return man


# ----------------------------------------------------------------------------------------------
# loading and prediction
# ----------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    query: str
    estimate: float  # mean over directions of the degree-k estimate
    base: float  # f(0): the trained model's value
    change: float  # estimate - base
    stderr: float  # standard error of the estimate over directions
    median_of_means: float
    delta: float  # failure probability of the median-of-means bound
    terms: list[float]  # per-degree estimated Taylor terms, degree 0 first
    term_stderr: list[float]
    directions: int
    degree: int
    deletion_size: int
    weight: float
    safe_deletion_size: Optional[float] = None
    warning: Optional[str] = None
    control_variates: bool = False
    # [change, stderr] of the estimate truncated at each degree r = 0..degree (the last row is change/stderr):
    # the trade-off between truncation bias (low r) and sampling noise (high r), see docs/accuracy.md
    by_degree: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _log_binom(n: int, r: int) -> float:
    return math.lgamma(n + r) - math.lgamma(r + 1) - math.lgamma(n)


class Sketch:
    """A stored sketch. ``Sketch.load(path, task)`` verifies checksums and that ``task`` matches."""

    def __init__(self, path: Path, manifest: dict, task: Task):
        self.path = Path(path)
        self.manifest = manifest
        self.task = task
        self.n = manifest["n"]
        self.degree = manifest["config"]["degree"]
        self._cache: dict[str, torch.Tensor] = {}
        self._psi: Optional[torch.Tensor] = None

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Union[str, Path], task: Task) -> "Sketch":
        path = Path(path)
        man = _read_manifest(path)
        fp = task.fingerprint()
        if man.get("fingerprint") != fp:
            raise SketchError(
                f"{path}: sketch was built for other data or another config (fingerprint {str(man.get('fingerprint'))[:12]} != {fp[:12]})"
            )
        if not man.get("chunks"):
            raise SketchError(f"{path}: sketch has no completed chunks; run the precompute again to resume")
        cfg = man["config"]
        covered = sorted((c["first"], c["count"]) for c in man["chunks"].values())
        nxt = 0
        for first, count in covered:
            if first != nxt:
                break
            nxt += count
        if nxt != cfg["directions"]:
            warnings.warn(
                f"{path}: sketch is incomplete ({nxt} of {cfg['directions']} directions); resume the precompute to finish it",
                StabilityWarning,
            )
        files = ["base.safetensors"] + sorted(man["chunks"])
        shas = [man["base"]] + [man["chunks"][c]["sha256"] for c in sorted(man["chunks"])]
        for f, sha in zip(files, shas):
            p = path / f
            if not p.exists():
                raise SketchError(f"{p}: file missing from the sketch")
            if _sha256_file(p) != sha:
                raise SketchError(f"{p}: checksum mismatch (file corrupted or truncated)")
        return cls(path, man, task)

    @property
    def m(self) -> int:
        return sum(c["count"] for c in self.manifest["chunks"].values())

    def _chunk_files(self) -> list[Path]:
        return [self.path / c for c in sorted(self.manifest["chunks"])]

    def base_params(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / "base.safetensors")

    def psi(self) -> torch.Tensor:
        """All directions, [m, n] complex."""
        if self._psi is None:
            self._psi = torch.cat([_real_to_complex(load_file(p)["psi"]) for p in self._chunk_files()])
        return self._psi

    def chunk_params(self) -> Iterable[dict[str, taylor.Series]]:
        base = self.base_params()
        for p in self._chunk_files():
            t = load_file(p)
            out = {}
            for k, b in base.items():
                hi = _real_to_complex(t[f"param.{k}"])
                c = torch.cat([b.to(torch.complex128).expand(hi.shape[0], 1, *b.shape), hi], dim=1)
                out[k] = taylor.variable(c)
            yield out

    def coefficients(self, query: Query) -> torch.Tensor:
        """c_r(psi_j) of an output for every direction: [m, K] complex."""
        key = query if isinstance(query, str) else None
        if key is not None and key in self._cache:
            return self._cache[key]
        parts = []
        for params in self.chunk_params():
            with taylor.module_context():
                c = taylor.coefficients(evaluate(self.task, params, query))
            parts.append(c.expand(next(iter(params.values())).m, *c.shape[1:]))
        out = torch.cat(parts)
        if key is not None:
            self._cache[key] = out
        return out

    # -- estimates --------------------------------------------------------------------------------
    def _scale(self) -> torch.Tensor:
        """C(n+r-1, r) for r = 0..k."""
        return torch.tensor([math.exp(_log_binom(self.n, r)) for r in range(self.degree + 1)], dtype=torch.float64)

    def per_direction_terms(self, query: Query, deletions: torch.Tensor) -> torch.Tensor:
        """Unbiased per-direction estimates of each degree's Taylor term.

        ``deletions``: [S, n] real (weights W 1_D per set). Returns [S, m, K] real."""
        c = self.coefficients(query)  # [m, K]
        s = deletions.to(torch.complex128) @ self.psi().conj().T  # [S, m]
        r = torch.arange(self.degree + 1)
        powers = s[..., None] ** r  # [S, m, K]
        return (self._scale() * c[None] * powers).real

    def lean(self, deletions: torch.Tensor) -> torch.Tensor:
        """How far each direction leans towards each deletion vector v: |<psi, v>|^2 / |v|^2, Beta(1, n-1)
        distributed (the control of :func:`control_variate_adjust`). ``deletions``: [S, n] real; returns [S, m]."""
        s = deletions.to(torch.complex128) @ self.psi().conj().T  # [S, m]
        return s.abs() ** 2 / (deletions**2).sum(1, keepdim=True)

    def predict(
        self,
        queries: Union[Query, Sequence[Query]],
        delete: Union[Sequence[int], Sequence[Sequence[int]]],
        weight: float = 1.0,
        delta: float = 0.05,
        degree: Optional[int] = None,
        tolerance: float = 0.05,
        control_variates: bool = False,
    ) -> Union[Prediction, list]:
        """Predict outputs after deleting D (weight W: 1 deletes, 0<W<1 downweights, W<0 upweights).

        ``queries``: one query or a list; ``delete``: one index list or a list of index lists. Returns a
        Prediction, or nested lists [query][set] when lists were given.

        ``degree``: truncate at this degree (at most the sketch's). ``control_variates``: subtract the part
        of each direction's estimate explained by how far that direction happens to lean towards D (see
        :func:`control_variate_adjust`); unbiased, and a smaller standard error when that lean drives the
        scatter (it does for small deletion sets). ``terms`` then stay the plain per-degree means."""
        single_q = isinstance(queries, str) or callable(queries)
        qs = [queries] if single_q else list(queries)
        single_d = len(delete) == 0 or not isinstance(delete[0], (list, tuple, range, np.ndarray, torch.Tensor))
        sets = [list(delete)] if single_d else [list(d) for d in delete]
        k = self.degree if degree is None else degree
        if not 0 <= k <= self.degree:
            raise ValueError(f"degree must lie in [0, {self.degree}]")
        D = torch.zeros(len(sets), self.n, dtype=torch.float64)
        for i, d in enumerate(sets):
            if len(d) == 0:
                raise ValueError("empty deletion set")
            for j in d:
                if not 0 <= int(j) < self.n:
                    raise ValueError(f"deletion index {j} outside [0, {self.n})")
            D[i, list(map(int, d))] = weight
        lean = self.lean(D) if control_variates else None
        out = []
        for q in qs:
            terms = self.per_direction_terms(q, D)[..., : k + 1]  # [S, m, K]
            stab = self.stability(q, tolerance=tolerance)
            row = []
            for i, d in enumerate(sets):
                t = terms[i]
                m = t.shape[0]
                cum = t.cumsum(-1)  # [m, k+1]: the estimate truncated at each degree
                if lean is not None:
                    cum = torch.stack([control_variate_adjust(cum[:, r], lean[i], self.n, 1)
                                       for r in range(k + 1)], -1)
                est = cum[:, k]  # [m]
                base = float(t[0, 0])
                by_degree = [[float(cum[:, r].mean()) - base,
                              float(cum[:, r].std(unbiased=True) / math.sqrt(m)) if m > 1 else float("nan")]
                             for r in range(k + 1)]
                se = by_degree[k][1]
                mom = median_of_means(est, delta)
                size = len(set(map(int, d)))
                safe = stab.get("safe_deletion_size")
                warn = None
                eff = size * weight * weight
                if safe is not None and eff > safe:
                    warn = (
                        f"deletion of {size} examples (weight {weight}) exceeds the size the stability diagnostics "
                        f"consider safe ({safe:.3g}); the truncated series may be inaccurate"
                    )
                    warnings.warn(warn, StabilityWarning)
                row.append(
                    Prediction(
                        query=query_name(q),
                        estimate=float(est.mean()),
                        base=base,
                        change=float(est.mean()) - base,
                        stderr=se,
                        median_of_means=mom,
                        delta=delta,
                        terms=t.mean(0).tolist(),
                        term_stderr=(t.std(0, unbiased=True) / math.sqrt(m)).tolist() if m > 1 else [float("nan")] * (k + 1),
                        directions=m,
                        degree=k,
                        deletion_size=size,
                        weight=weight,
                        safe_deletion_size=safe,
                        warning=warn,
                        control_variates=lean is not None,
                        by_degree=by_degree,
                    )
                )
            out.append(row)
        if single_q and single_d:
            return out[0][0]
        if single_d:
            return [r[0] for r in out]
        if single_q:
            return out[0]
        return out

    def effects(self, queries: Sequence[Query], weight: float = 1.0, degree: Optional[int] = None) -> torch.Tensor:
        """Predicted change of every output when each single training example is deleted: [n, len(queries)]."""
        k = self.degree if degree is None else degree
        psi_c = self.psi().conj()  # [m, n]
        scale = self._scale()
        cols = []
        for q in queries:
            c = self.coefficients(q)  # [m, K]
            tot = torch.zeros(self.n, dtype=torch.float64)
            for r in range(1, k + 1):
                tot += (scale[r] * (c[:, r : r + 1] * (weight * psi_c) ** r)).real.mean(0)
            cols.append(tot)
        return torch.stack(cols, dim=1)

    def stability(self, query: Query, tolerance: float = 0.05, confidence: float = 0.95) -> dict:
        return stability_report(self.coefficients(query), self.n, tolerance=tolerance, confidence=confidence)


def lean_moment(n: int, j: int) -> float:
    """E[B^j] for B = |<psi, u>|^2, psi uniform on the unit sphere of C^n and u a unit vector: B ~ Beta(1, n-1),
    so E[B^j] = j! (n-1)! / (n+j-1)!."""
    return math.exp(math.lgamma(j + 1) + math.lgamma(n) - math.lgamma(n + j))


def control_variate_adjust(est: torch.Tensor, lean: torch.Tensor, n: int, powers: int) -> torch.Tensor:
    """Per-direction estimates with control variates removed, two-fold cross-fitted.

    The controls are Y_j = B^j - E[B^j] (j = 1..powers), B = ``lean`` the squared projection of each direction on
    the deletion vector: their means are known exactly (:func:`lean_moment`), so est - beta . Y has the mean of
    est for any fixed beta. beta is fitted by least squares on one half of the directions and applied to the other
    half (and vice versa), so it is independent of the values it adjusts and the mean stays exactly unbiased.
    Returns [m] adjusted values (their mean is the estimate, their spread gives its standard error); with fewer
    than 2 (powers + 2) directions the estimates are returned unchanged."""
    m = est.shape[0]
    if m < 2 * (powers + 2):
        return est
    Y = torch.stack([lean**j - lean_moment(n, j) for j in range(1, powers + 1)], dim=1)  # [m, J]
    Y = Y / Y.std(0, keepdim=True).clamp_min(1e-300)  # conditioning only: the fitted beta . Y is scale-free
    first = torch.arange(m) < m // 2
    out = est.clone()
    for fit, use in ((first, ~first), (~first, first)):
        A = torch.cat([torch.ones(int(fit.sum()), 1, dtype=est.dtype), Y[fit]], dim=1)
        beta = torch.linalg.lstsq(A, est[fit].unsqueeze(1)).solution[1:, 0]
        out[use] = est[use] - Y[use] @ beta
    return out


def median_of_means(x: torch.Tensor, delta: float) -> float:
    """Median of g group means, g = ceil(8 ln(1/delta)) capped by the sample size (Lugosi & Mendelson)."""
    m = x.shape[0]
    g = max(1, min(m, math.ceil(8 * math.log(1 / delta))))
    groups = torch.tensor_split(x, g)
    means = torch.stack([gr.mean() for gr in groups])
    return float(means.median())


def _safe_size(A: float, rho: float, k: int, n: int, tolerance: float) -> float:
    """Largest s with sum_{r>k} A (rho sqrt(s))^r < tolerance (0 if none, n at most)."""

    def bound(size):
        x = rho * math.sqrt(size)
        if x >= 1:
            return math.inf
        return A * x ** (k + 1) / (1 - x)

    if rho <= 0:
        return float(n)
    lo, hi = 0.0, min(float(n), 1.0 / (rho * rho))
    if bound(hi * (1 - 1e-12)) < tolerance:
        return hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if bound(mid) < tolerance:
            lo = mid
        else:
            hi = mid
    return lo


def stability_report(c: torch.Tensor, n: int, tolerance: float = 0.05, confidence: float = 0.95) -> dict:
    """Per-degree size estimates of the Taylor terms from sketch coefficients c [m, K].

    For psi uniform on the complex unit sphere, C(n+r-1, r) E|c_r|^2 = ||T_r||^2 (the Frobenius norm of the
    symmetric degree-r Taylor tensor, up to the symmetric normalization): the paper's figure-1 estimate, reported
    per degree as log2 with a bootstrap confidence interval and per direction.

    Two deletion-size limits follow from a geometric fit size_r ~ A rho^r and a tolerance on the truncation
    error sum_{r>k} of the dropped terms, for a deletion vector v = W 1_D with ||v||^2 = W^2 |D|:

    * ``safe_deletion_size`` (typical case): terms of size RMS(c_r) ||v||^r, which is exactly the RMS term
      size along a uniformly random direction of that norm;
    * ``safe_deletion_size_worst_case``: terms bounded by ||T_r|| ||v||^r (Cauchy-Schwarz), valid for every D
      but loose.

    ``predict`` warns when W^2 |D| exceeds the typical-case limit."""
    m, K = c.shape
    k = K - 1
    rows = []
    log_norm, log_rms = [], []
    gen = torch.Generator().manual_seed(12345)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    for r in range(1, K):
        scale = math.exp(_log_binom(n, r))
        a2 = c[:, r].abs() ** 2
        rms = float(a2.mean().sqrt())
        est = rms * math.sqrt(scale)
        if m > 1:
            boot = (a2[torch.randint(0, m, (400, m), generator=gen)].mean(1) * scale).sqrt()
            lo, hi = torch.quantile(boot, torch.tensor([lo_q, hi_q], dtype=boot.dtype)).tolist()
        else:
            lo = hi = est
        per_dir = ((a2 * scale).sqrt()).clamp_min(1e-300).log2().tolist()
        rows.append({
            "degree": r,
            "log2_size": math.log2(max(est, 1e-300)),
            "log2_lo": math.log2(max(lo, 1e-300)),
            "log2_hi": math.log2(max(hi, 1e-300)),
            "rms_coefficient": rms,
            "log2_per_direction": per_dir,
        })
        log_norm.append(math.log(max(est, 1e-300)))
        log_rms.append(math.log(max(rms, 1e-300)))
    report: dict[str, Any] = {"degrees": rows, "directions": m, "n": n, "degree": k, "tolerance": tolerance}
    if k >= 2:
        rs = np.arange(1, K)
        slope, intercept = np.polyfit(rs, np.array(log_norm), 1)
        slope_t, intercept_t = np.polyfit(rs, np.array(log_rms), 1)
        rho = float(math.exp(slope))
        report["decay_per_degree"] = rho
        report["log2_decay_per_degree"] = float(slope / math.log(2))
        report["safe_deletion_size"] = _safe_size(math.exp(intercept_t), math.exp(slope_t), k, n, tolerance)
        report["safe_deletion_size_worst_case"] = _safe_size(math.exp(intercept), rho, k, n, tolerance)
        if rho < 0.9:
            verdict = "stable: Taylor terms decay geometrically"
        elif rho <= 1.1:
            verdict = "marginal: Taylor terms do not clearly decay"
        else:
            verdict = "unstable: Taylor terms grow with degree; predictions are unreliable"
        report["verdict"] = verdict
    else:
        report["decay_per_degree"] = None
        report["log2_decay_per_degree"] = None
        report["safe_deletion_size"] = None
        report["safe_deletion_size_worst_case"] = None
        report["verdict"] = "unknown: a degree-1 sketch cannot show decay"
    return report
