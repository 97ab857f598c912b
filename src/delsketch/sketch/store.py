"""The sketch on disk: its manifest, its chunk files, and :class:`Sketch`, which loads and verifies them and
evaluates outputs on the stored series-valued parameters.

Layout of a sketch directory::

    manifest.json           config, fingerprints, versions, chunk checksums (no timestamps)
    base.safetensors        degree-0 parameters (= plain training), stored once
    chunk-00000.safetensors psi and degree 1..k coefficients of every parameter, for a range of directions
    timings.json            wall times (kept out of the manifest so files are reproducible byte for byte)

Every safetensors file carries, in its one metadata entry, the digest of its tensors (:func:`tensor_digest`) and
the task's fingerprint, so a file can prove it is intact without a manifest record. The manifest is checked
against a schema (:func:`validate_manifest`) before any field is used, and the stored tensors' names and shapes
against the manifest (:func:`check_headers`) on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .. import series as taylor
from ..io import sha256_file, versions
from ..training import Task
from ..training.outputs import Output, as_output
from .core import FORMAT, Query, SketchError, StabilityWarning
from .estimate import log_binom
from .predict import effects as effects_fn
from .predict import predict as predict_fn
from .stability import clipping_diagnostics, element_stability, fold_clipping, stability_report, vector_report

def complex_to_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.contiguous())


def real_to_complex(t: torch.Tensor) -> torch.Tensor:
    """The complex view of a [..., 2] real tensor. Tensors read by safetensors sit at the file's offsets, often
    8 but not 16 bytes aligned; a complex128 view of such memory crashed torch 2.13's cat (a segmentation fault
    in a degree-1 sketch's first prediction), so misaligned data is copied first."""
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return torch.view_as_complex(t)


def chunk_name(i: int) -> str:
    return f"chunk-{i:05d}.safetensors"




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
        if self.seed < 0:
            raise ValueError(f"seed must be at least 0, got {self.seed}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {self.chunk}")
        if self.steps is not None and not 0 <= self.steps <= task.steps:
            raise ValueError(f"steps must lie in [0, {task.steps}], got {self.steps}")


def manifest(task: Task, cfg: SketchConfig, chunks: dict, base_sha: Optional[str], task_spec: Optional[dict]) -> dict:
    return {
        "format": FORMAT,
        "task": task.describe(),
        "task_spec": task_spec,
        "fingerprint": task.fingerprint(),
        "fingerprints": task.fingerprints(),
        "n": task.n,
        "steps": cfg.steps if cfg.steps is not None else task.steps,
        "config": asdict(cfg),
        "params": {k: list(v.shape) for k, v in task.init_params().items()},
        "direction_generator": "numpy PCG64(SeedSequence([seed, index, 0x5E7C])), complex Gaussian, unit norm",
        "versions": versions(),
        "base": base_sha,
        "chunks": chunks,
    }


def read_manifest(path: Path) -> dict:
    """The manifest of the sketch in directory ``path``, checked against :func:`validate_manifest`."""
    mpath = Path(path) / "manifest.json"
    if not mpath.exists():
        raise SketchError(f"{path}: no sketch here (manifest.json not found)")
    if not mpath.is_file():
        raise SketchError(f"{mpath}: not a file")
    try:
        man = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SketchError(f"{mpath}: manifest is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise SketchError(f"{mpath}: not a delsketch sketch manifest (format {man.get('format') if isinstance(man, dict) else None!r})")
    validate_manifest(man, mpath)
    return man


_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = re.compile(r"chunk-(\d{5})\.safetensors")


def _is_int(x, lo: Optional[int] = None, hi: Optional[int] = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and (lo is None or x >= lo) and (hi is None or x <= hi)


def validate_manifest(man: dict, where: Union[str, Path] = "manifest.json") -> None:
    """The schema of a manifest, checked before any field is used: the type and range of every field the
    library reads, and that every chunk record covers exactly the directions its index implies (an edited
    ``first`` or ``count`` is refused). Raises :class:`SketchError` naming the first bad field."""

    def bad(field: str, why: str):
        raise SketchError(f"{where}: invalid manifest: {field} {why}")

    for key, typ in (("fingerprint", str), ("n", int), ("steps", int), ("config", dict), ("params", dict),
                     ("chunks", dict)):
        if key not in man:
            bad(key, "is missing")
        if not isinstance(man[key], typ) or isinstance(man[key], bool):
            bad(key, f"must be {typ.__name__}, not {type(man[key]).__name__}")
    if not _is_int(man["n"], 1):
        bad("n", "must be at least 1")
    if not _is_int(man["steps"], 0):
        bad("steps", "must be at least 0")
    if man.get("task_spec") is not None and not isinstance(man["task_spec"], dict):
        bad("task_spec", "must be an object or null")
    cfg = man["config"]
    for key, lo, hi in (("directions", 1, None), ("degree", 1, 100), ("seed", None, None), ("chunk", 1, None)):
        if not _is_int(cfg.get(key), lo, hi):
            bad(f"config.{key}", f"must be an integer{'' if lo is None else f' >= {lo}'}{'' if hi is None else f' and <= {hi}'}")
    if cfg.get("steps") is not None and not _is_int(cfg["steps"], 0):
        bad("config.steps", "must be null or an integer >= 0")
    if set(cfg) != {"directions", "degree", "seed", "chunk", "steps"}:
        bad("config", f"has unexpected keys {sorted(set(cfg) - {'directions', 'degree', 'seed', 'chunk', 'steps'})}")
    for k, shape in man["params"].items():
        if not isinstance(shape, list) or not all(_is_int(d, 0) for d in shape):
            bad(f"params.{k}", "must be a list of sizes")
    if man.get("base") is not None and not (isinstance(man["base"], str) and _HEX64.fullmatch(man["base"])):
        bad("base", "must be null or a sha256 hex digest")
    if man["chunks"] and man.get("base") is None:
        bad("base", "is missing although chunks are recorded")
    M, C = cfg["directions"], cfg["chunk"]
    for name, rec in man["chunks"].items():
        mt = _CHUNK.fullmatch(name)
        if mt is None:
            bad(f"chunks.{name}", "is not a chunk file name")
        if not isinstance(rec, dict) or set(rec) != {"first", "count", "sha256"}:
            bad(f"chunks.{name}", "must hold exactly first, count and sha256")
        first = int(mt.group(1)) * C
        if first >= M or rec["first"] != first or not _is_int(rec["first"]):
            bad(f"chunks.{name}.first", f"must be {first} (chunk index x chunk size, below {M} directions)")
        if rec["count"] != min(C, M - first) or not _is_int(rec["count"]):
            bad(f"chunks.{name}.count", f"must be {min(C, M - first)}")
        if not (isinstance(rec["sha256"], str) and _HEX64.fullmatch(rec["sha256"])):
            bad(f"chunks.{name}.sha256", "must be a sha256 hex digest")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order): stored inside every chunk
    file, so that a chunk computed elsewhere (with no manifest record here) can still prove it is intact."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _header(path: Path) -> tuple[dict[str, list[int]], dict]:
    """Tensor shapes and metadata of a safetensors file, without reading the data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type for any malformed header
        raise SketchError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def check_headers(path: Path, man: dict) -> None:
    """Every stored tensor has the name and shape the manifest implies (the manifest itself carries no
    checksum, so an edited degree, n or parameter shape is caught here, before any arithmetic)."""
    params, K, n = man["params"], man["config"]["degree"], man["n"]
    shapes, _ = _header(path / "base.safetensors")
    if shapes != {k: list(v) for k, v in params.items()}:
        raise SketchError(f"{path / 'base.safetensors'}: tensors do not match the manifest's parameters")
    for name, rec in sorted(man["chunks"].items()):
        want = {"psi": [rec["count"], n, 2]}
        want.update({f"param.{k}": [rec["count"], K, *v, 2] for k, v in params.items()})
        shapes, _ = _header(path / name)
        if shapes != want:
            diff = sorted(k for k in set(shapes) | set(want) if shapes.get(k) != want.get(k))
            raise SketchError(f"{path / name}: tensor {diff[0]} is {shapes.get(diff[0])}, the manifest implies "
                              f"{want.get(diff[0])}")


class Sketch:
    """A stored sketch. ``Sketch.load(path, task)`` verifies checksums and that ``task`` matches."""

    def __init__(self, path: Path, manifest: dict, task: Task):
        self.path = Path(path)
        self.manifest = manifest
        self.task = task
        self.n = manifest["n"]
        self.degree = manifest["config"]["degree"]
        self._cache: dict = {}
        self._outputs: dict[str, Output] = {}
        self._chunks: dict[Path, dict[str, torch.Tensor]] = {}
        self._held = 0
        self._base: Optional[dict[str, torch.Tensor]] = None
        self._psi: Optional[torch.Tensor] = None
        self._loo_params: Optional[dict] = None  # the n leave-one-out runs' parameters (sketch.answer.loo_params)
        self._trained: Optional[dict] = None  # the plain run's parameters (sketch.answer.trained)

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Union[str, Path], task: Task) -> "Sketch":
        path = Path(path)
        man = read_manifest(path)
        fp = task.fingerprint()
        if man.get("fingerprint") != fp:
            stored, parts = man.get("fingerprints") or {}, task.fingerprints()
            differ = [k for k in ("data", "model", "loss", "recipe") if k in stored and stored[k] != parts.get(k)]
            which = f": the {', '.join(differ)} differ{'s' if len(differ) == 1 else ''}" if differ else ""
            raise SketchError(
                f"{path}: sketch was built for other data or another config{which} (fingerprint "
                f"{str(man.get('fingerprint'))[:12]} != {fp[:12]})"
            )
        if man["n"] != task.n:
            raise SketchError(f"{path}: sketch has n = {man['n']} training examples, the task {task.n}")
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
            if not p.is_file():
                raise SketchError(f"{p}: not a file")
            if sha256_file(p) != sha:
                raise SketchError(f"{p}: checksum mismatch (file corrupted or truncated)")
        check_headers(path, man)
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
            self._psi = torch.cat([real_to_complex(load_file(p)["psi"]) for p in self._chunk_files()])
        return self._psi

    #: chunk tensors up to this many bytes are kept in memory after the first read (an output evaluated later
    #: reads no file again); a larger sketch is streamed from disk chunk by chunk on every evaluation
    MEMORY_BUDGET = 2 << 30

    def _chunk_tensors(self, p: Path) -> dict[str, torch.Tensor]:
        if p in self._chunks:
            return self._chunks[p]
        t = load_file(p)
        size = sum(x.numel() * x.element_size() for x in t.values())
        if self._held + size <= self.MEMORY_BUDGET:
            self._chunks[p] = t
            self._held += size
        return t

    def chunk_params(self) -> Iterable[dict[str, taylor.Series]]:
        if self._base is None:
            self._base = self.base_params()
        for p in self._chunk_files():
            t = self._chunk_tensors(p)
            out = {}
            for k, b in self._base.items():
                hi = real_to_complex(t[f"param.{k}"])
                c = torch.cat([b.to(torch.complex128).expand(hi.shape[0], 1, *b.shape), hi], dim=1)
                out[k] = taylor.variable(c)
            yield out

    def output(self, query) -> Output:
        """The :class:`~delsketch.training.outputs.Output` for whatever the user passed (query strings resolved
        once, so their coefficients are cached)."""
        if isinstance(query, str):
            if query not in self._outputs:
                self._outputs[query] = as_output(self.task, query)
            return self._outputs[query]
        return as_output(self.task, query)

    @property
    def fingerprint(self) -> str:
        """The task's fingerprint, as verified against the manifest by :meth:`load` (not recomputed)."""
        return self.manifest["fingerprint"]

    def memo(self, kind: str, out: Output, compute):
        """``compute()`` once per (kind, output) for this Sketch: outputs are known by their ``cache_key`` (a query
        string, a ready-made output) or else by the callable itself (held, so its id is not reused)."""
        key = (kind, out.cache_key) if out.cache_key is not None else (kind, "fn", id(out.fn))
        hit = self._cache.get(key)
        if hit is not None and (out.cache_key is not None or hit[0] is out.fn):
            if out.parts is None:
                out.parts = hit[2]
            return hit[1]
        value = compute()
        self._cache[key] = (out.fn, value, out.parts)
        return value

    def coefficients(self, query) -> torch.Tensor:
        """c_r(psi_j) of an output for every direction: ``[m, K, P]`` complex (P = the output's size; one batched
        evaluation per chunk of directions). Cached per output (:meth:`memo`)."""
        out = self.output(query)

        def compute():
            parts = []
            for params in self.chunk_params():
                with taylor.module_context():
                    c = out.flat_coefficients(params, self.degree)
                parts.append(c.expand(next(iter(params.values())).m, *c.shape[1:]))
            return torch.cat(parts)

        return self.memo("coefficients", out, compute)

    # -- estimates --------------------------------------------------------------------------------
    def _scale(self) -> torch.Tensor:
        """C(n+r-1, r) for r = 0..k."""
        return torch.tensor([math.exp(log_binom(self.n, r)) for r in range(self.degree + 1)], dtype=torch.float64)

    def per_direction_terms(self, query, deletions: torch.Tensor) -> torch.Tensor:
        """Unbiased per-direction estimates of each degree's Taylor term.

        ``deletions``: [S, n] real (weights W 1_D per set). Returns [S, m, K, P] real."""
        c = self.coefficients(query)  # [m, K, P]
        s = deletions.to(torch.complex128) @ self.psi().conj().T  # [S, m]
        r = torch.arange(self.degree + 1)
        powers = s[..., None] ** r  # [S, m, K]
        return (self._scale()[:, None] * c[None] * powers[..., None]).real

    def lean(self, deletions: torch.Tensor) -> torch.Tensor:
        """How far each direction leans towards each deletion vector v: |<psi, v>|^2 / |v|^2, Beta(1, n-1)
        distributed (the control of :func:`control_variate_adjust`). ``deletions``: [S, n] real; returns [S, m]."""
        s = deletions.to(torch.complex128) @ self.psi().conj().T  # [S, m]
        return s.abs() ** 2 / (deletions**2).sum(1, keepdim=True)

    def predict(self, output, delete, weight: float = 1.0, delta: float = 0.05, degree: Optional[int] = None,
                tolerance: float = 0.05, control_variates: bool = False, method: str = "auto",
                budget_s: float = 30.0):
        """The answer to "what would ``output`` be had ``delete`` never been seen?".

        ``method="auto"`` (the default) picks the best answer delsketch has at the cost: real retraining when all
        the sets retrain within ``budget_s`` seconds, else the exact first-order term plus the sketch's higher
        terms where they lower the estimated error; ``"sketch"`` is the sketch estimator alone
        (:func:`delsketch.sketch.predict.predict`); see :mod:`delsketch.sketch.answer` for every method. The
        result says which method and degree answered, with its error bar and cost."""
        from .answer import answer

        return answer(self, output, delete, method=method, weight=weight, budget_s=budget_s, delta=delta,
                      degree=degree, tolerance=tolerance, control_variates=control_variates)

    def effects(self, output, weight: float = 1.0, degree: Optional[int] = None):
        """See :func:`delsketch.sketch.predict.effects`: ``[n, *out]``."""
        return effects_fn(self, output, weight=weight, degree=degree)

    def stability(self, output, tolerance: float = 0.05, confidence: float = 0.95, elements: bool = False) -> dict:
        """Stability diagnostics of an output: the full report (per-degree sizes with bootstrap intervals) for a
        scalar, a per-element summary (:func:`~delsketch.sketch.stability.vector_report`) for a vector;
        ``elements=True``: just the per-element safe sizes and decay as ``[P]`` tensors."""
        out = self.output(output)
        c = self.coefficients(out)
        if elements:
            return element_stability(c, self.n, tolerance)
        if out.size == 1:
            report = stability_report(c[:, :, 0], self.n, tolerance=tolerance, confidence=confidence)
        else:
            report = vector_report(c, self.n, out.element_names(), tolerance=tolerance)
        # a DP run's clipping boundary (duck-typed: the sketch layer does not import privacy)
        return fold_clipping(report, clipping_diagnostics(self.task, self.manifest["config"].get("steps")))
