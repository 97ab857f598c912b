"""``paper``: the paper's reference microgpt experiment, reproduced exactly.

Setting (see ``docs`` / the design notes):

1. ``rng = random.Random(42)`` (same stream as ``random.seed(42)``);
2. ``docs`` = the non-empty stripped lines of the data file; ``chars = sorted(set(''.join(docs)))``;
   BOS = ``len(chars)``;
3. ``rng.shuffle(docs)``;
4. parameters drawn with ``rng.gauss(0, 0.08)`` in the order ``wte, wpe, lm_head,
   layer0.{attn_wq, attn_wk, attn_wv, attn_wo, mlp_fc1, mlp_fc2}``, each ``[nout][nin]`` row by row;
5. training on ``docs[:n]`` (n = 1000), step ``s`` on document ``s % n``, ``steps`` = 1000;
   Adam(lr 0.01, linear decay over ``steps``, betas (0.85, 0.99), eps 1e-3 inside the sqrt).

Overrides: ``n`` (training documents), ``steps`` (default ``n``; also the decay horizon),
``normalization`` (default ``"fixed"``; irrelevant with one document per step except for
all-deleted steps).  Any override makes the run differ from the paper's.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import torch

from ..training.optim import Adam, linear_decay
from ..training import Task
from .microgpt import (
    QUERY_HELP,
    SELECT_HELP,
    MicroGPT,
    MicroGPTConfig,
    TextCorpus,
    gauss_init,
    param_shapes,
)

__all__ = ["build", "PARAM_ORDER", "load_docs", "flat_params"]

SEED = 42
N_TRAIN = 1000
CONFIG = MicroGPTConfig(vocab_size=27, n_embd=16, n_head=4, n_layer=1, block_size=16, init_std=0.08)
#: parameter names in the reference's drawing order (``init_params.json`` concatenates them)
PARAM_ORDER: list[str] = [name for name, _ in param_shapes(CONFIG)]


def load_docs(path: str | os.PathLike) -> tuple[list[str], bytes]:
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as text-mode open()
    docs = [line.strip() for line in text.split("\n") if line.strip()]
    return docs, raw


def flat_params(params: dict[str, torch.Tensor], order: list[str] | None = None) -> list[float]:
    """Concatenate parameters row by row in ``order`` (default :data:`PARAM_ORDER`)."""
    out: list[float] = []
    for name in order or PARAM_ORDER:
        out.extend(params[name].detach().reshape(-1).tolist())
    return out


def build(data: str | None = None, steps: int | None = None, n: int = N_TRAIN,
          normalization: str = "fixed") -> Task:
    if data is None:
        raise ValueError(
            "the 'paper' preset needs the names data file: pass --data PATH (data=PATH in Python) to names.txt "
            "(32,032 names, one per line; e.g. ../shared/data/names.txt)"
        )
    if not Path(data).is_file():
        raise ValueError(f"the 'paper' preset: data file {str(data)!r} does not exist")
    docs, raw = load_docs(data)
    rng = random.Random(SEED)
    chars = sorted(set("".join(docs)))
    if len(chars) + 1 != CONFIG.vocab_size:
        raise ValueError(
            f"the 'paper' preset expects 26 distinct characters in {data!r}, found {len(chars)}"
        )
    rng.shuffle(docs)
    init = gauss_init(CONFIG, rng)  # drawn once, copied on every call
    n = int(n)
    if not 1 <= n <= len(docs):
        raise ValueError(f"n must lie in [1, {len(docs)}], got {n}")
    steps = n if steps is None else int(steps)
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")

    train_docs = docs[:n]
    model = MicroGPT(CONFIG)
    corpus = TextCorpus(train_docs, chars, model)
    opt = Adam(lr=0.01, betas=(0.85, 0.99), eps=1e-3, eps_inside_sqrt=True, schedule=linear_decay(steps))

    def init_params() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in init.items()}

    config = {
        "preset": "paper",
        "data_sha256": hashlib.sha256(raw).hexdigest(),
        "data_docs": len(docs),
        "seed": SEED,
        "n": n,
        "steps": steps,
        "chars": "".join(chars),
        "model": {"kind": "microgpt", **CONFIG.to_dict()},
        "param_order": PARAM_ORDER,
        "batch": 1,
        "normalization": normalization,
    }
    return Task(
        name="paper",
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
        default_queries=["max", "emma"],
        model=model,
    )
