"""The sketch on disk: its manifest, its chunk files, and :class:`Sketch`, which loads and verifies them and
evaluates outputs on the stored series-valued parameters.

Layout of a sketch directory::

    manifest.json           config, fingerprints, versions, chunk checksums (no timestamps)
    base.safetensors        degree-0 parameters (= plain training), stored once
    chunk-00000.safetensors psi and degree 1..k coefficients of every parameter, for a range of directions
    timings.json            wall times (kept out of the manifest so files are reproducible byte for byte)
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from safetensors.torch import load_file

from .. import series as taylor
from ..io import sha256_file, versions
from ..training import Task
from .core import FORMAT, Query, SketchError, StabilityWarning, evaluate
from .estimate import log_binom
from .predict import effects as effects_fn
from .predict import predict as predict_fn
from .stability import stability_report

def complex_to_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.contiguous())


def real_to_complex(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(t.contiguous())


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
            if sha256_file(p) != sha:
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
            self._psi = torch.cat([real_to_complex(load_file(p)["psi"]) for p in self._chunk_files()])
        return self._psi

    def chunk_params(self) -> Iterable[dict[str, taylor.Series]]:
        base = self.base_params()
        for p in self._chunk_files():
            t = load_file(p)
            out = {}
            for k, b in base.items():
                hi = real_to_complex(t[f"param.{k}"])
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
        return torch.tensor([math.exp(log_binom(self.n, r)) for r in range(self.degree + 1)], dtype=torch.float64)

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

    def predict(self, queries, delete, weight: float = 1.0, delta: float = 0.05, degree: Optional[int] = None,
                tolerance: float = 0.05, control_variates: bool = False):
        """See :func:`delsketch.sketch.predict.predict`."""
        return predict_fn(self, queries, delete, weight=weight, delta=delta, degree=degree, tolerance=tolerance,
                       control_variates=control_variates)

    def effects(self, queries: Sequence[Query], weight: float = 1.0, degree: Optional[int] = None) -> torch.Tensor:
        """See :func:`delsketch.sketch.predict.effects`."""
        return effects_fn(self, queries, weight=weight, degree=degree)

    def stability(self, query: Query, tolerance: float = 0.05, confidence: float = 0.95) -> dict:
        return stability_report(self.coefficients(query), self.n, tolerance=tolerance, confidence=confidence)

