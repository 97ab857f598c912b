"""``names``: the paper's microgpt recipe on US-census first names (no external data needed).

The names come from the ``names`` package (a dependency): the first column of its
``dist.male.first`` and ``dist.female.first`` files, lower-cased, deduplicated, sorted, then
shuffled with ``random.Random(seed)`` (5,163 names).  Vocabulary: the 26 letters + BOS (id 26).
The parameters are then drawn from the same ``rng`` with ``gauss(0, 0.08)`` in the paper's
order and layout.

Training: the first ``n`` shuffled names, one name per step (step ``s`` on name ``s % n``),
``steps`` steps (default ``n``), Adam(lr, linear decay over ``steps``, betas (0.85, 0.99),
eps 1e-3 inside the sqrt) - the paper's recipe on a smaller, ring-friendly budget.

Overrides: ``n`` (300), ``steps`` (n), ``seed`` (42), ``lr`` (0.01), ``normalization``
("fixed").  Default queries: the first three held-out names (those after the first ``n``).
"""

from __future__ import annotations

import hashlib
import random
import string
from pathlib import Path

import torch

from ..training.optim import Adam, linear_decay
from ..training import Task
from .microgpt import QUERY_HELP, SELECT_HELP, MicroGPT, MicroGPTConfig, TextCorpus, gauss_init

__all__ = ["build", "census_names"]

CONFIG = MicroGPTConfig(vocab_size=27, n_embd=16, n_head=4, n_layer=1, block_size=16, init_std=0.08)
CHARS = list(string.ascii_lowercase)
_FILES = ("dist.male.first", "dist.female.first")


def _names_dir() -> Path:
    import names as names_pkg

    return Path(names_pkg.__file__).resolve().parent


def census_names() -> tuple[list[str], str]:
    """Sorted, deduplicated, lower-cased census first names and the sha256 of the source files."""
    d = _names_dir()
    h = hashlib.sha256()
    out: set[str] = set()
    for fname in _FILES:
        raw = (d / fname).read_bytes()
        h.update(raw)
        for line in raw.decode("utf-8").splitlines():
            parts = line.split()
            if parts:
                out.add(parts[0].lower())
    names = sorted(out)
    bad = [x for x in names if not set(x) <= set(CHARS)]
    if bad:
        raise ValueError(f"unexpected characters in census names, e.g. {bad[0]!r}")
    return names, h.hexdigest()


def build(data: str | None = None, steps: int | None = None, n: int = 300, seed: int = 42,
          lr: float = 0.01, normalization: str = "fixed") -> Task:
    if data is not None:
        raise ValueError(
            "the 'names' preset uses the census names shipped with the 'names' package and takes no data file"
        )
    all_names, data_sha = census_names()
    rng = random.Random(int(seed))
    docs = list(all_names)
    rng.shuffle(docs)
    init = gauss_init(CONFIG, rng)
    n = int(n)
    if not 1 <= n <= len(docs):
        raise ValueError(f"n must lie in [1, {len(docs)}], got {n}")
    steps = n if steps is None else int(steps)
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")

    train_docs = docs[:n]
    held_out = docs[n : n + 3]
    model = MicroGPT(CONFIG)
    corpus = TextCorpus(train_docs, CHARS, model)
    opt = Adam(lr=float(lr), betas=(0.85, 0.99), eps=1e-3, eps_inside_sqrt=True, schedule=linear_decay(steps))

    def init_params() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in init.items()}

    config = {
        "preset": "names",
        "data": "names package census first names (male + female)",
        "data_sha256": data_sha,
        "data_docs": len(docs),
        "seed": int(seed),
        "n": n,
        "steps": steps,
        "lr": float(lr),
        "chars": "".join(CHARS),
        "model": {"kind": "microgpt", **CONFIG.to_dict()},
        "batch": 1,
        "normalization": normalization,
    }
    return Task(
        name="names",
        n=n,
        init_params=init_params,
        example_losses=corpus.example_losses,
        schedule=[[s % n] for s in range(steps)],
        optimizer=opt,
        normalization=normalization,
        query=corpus.query,
        validate_query=corpus.validate_query,
        select=corpus.select,
        examples=train_docs,
        config=config,
        query_help=QUERY_HELP,
        select_help=SELECT_HELP,
        default_queries=held_out,
        model=model,
    )
