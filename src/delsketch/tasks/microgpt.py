"""The microgpt character model (as in the paper's experiments), as an ``nn.Module``.

One transformer layer by default: token + position embeddings, rmsnorm (no learned scale,
eps 1e-5 inside the root), causal multi-head attention with a max-subtracted softmax, a GELU
(exact erf form) MLP, residual connections, an lm_head without final norm.  No biases.
Linear weights are stored as ``[nout, nin]`` and applied as ``y = x @ W.T`` (``F.linear``).

The module is evaluated with ``torch.func.functional_call(model, params, (tokens,))`` so that
the parameters can be plain tensors or power series.  All positions of a document are
processed in one causal pass; a batch of documents is padded at the end (padding after the
last real position cannot influence earlier positions, and padded positions are excluded from
the loss).

Text helpers (tokenization, queries, predicates) shared by the ``paper`` and ``names`` presets
live here too.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

__all__ = [
    "MicroGPTConfig",
    "MicroGPT",
    "param_shapes",
    "gauss_init",
    "TextCorpus",
]


@dataclass(frozen=True)
class MicroGPTConfig:
    vocab_size: int = 27
    n_embd: int = 16
    n_head: int = 4
    n_layer: int = 1
    block_size: int = 16
    init_std: float = 0.08

    def to_dict(self) -> dict:
        return asdict(self)


def param_shapes(cfg: MicroGPTConfig) -> list[tuple[str, tuple[int, int]]]:
    """Parameter names and ``[nout, nin]`` shapes in the reference's drawing order."""
    V, C = cfg.vocab_size, cfg.n_embd
    out = [("wte", (V, C)), ("wpe", (cfg.block_size, C)), ("lm_head", (V, C))]
    for li in range(cfg.n_layer):
        p = f"layer{li}."
        out += [
            (p + "attn_wq", (C, C)),
            (p + "attn_wk", (C, C)),
            (p + "attn_wv", (C, C)),
            (p + "attn_wo", (C, C)),
            (p + "mlp_fc1", (4 * C, C)),
            (p + "mlp_fc2", (C, 4 * C)),
        ]
    return out


def gauss_init(cfg: MicroGPTConfig, rng: random.Random) -> dict[str, Tensor]:
    """Draw every parameter with ``rng.gauss(0, init_std)``, matrix by matrix, row by row.

    With ``rng`` in the state the reference leaves it in (seed, then the shuffle), this
    reproduces the reference initialization bit for bit.
    """
    params: dict[str, Tensor] = {}
    for name, (nout, nin) in param_shapes(cfg):
        rows = [[rng.gauss(0, cfg.init_std) for _ in range(nin)] for _ in range(nout)]
        params[name] = torch.tensor(rows, dtype=torch.float64)
    return params


def rmsnorm(x: Tensor) -> Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5)


class _Block(nn.Module):
    def __init__(self, cfg: MicroGPTConfig):
        super().__init__()
        C = cfg.n_embd
        e = lambda *s: nn.Parameter(torch.empty(*s, dtype=torch.float64))  # noqa: E731
        self.attn_wq = e(C, C)
        self.attn_wk = e(C, C)
        self.attn_wv = e(C, C)
        self.attn_wo = e(C, C)
        self.mlp_fc1 = e(4 * C, C)
        self.mlp_fc2 = e(C, 4 * C)
        self.n_head = cfg.n_head
        self.head_dim = C // cfg.n_head
        # multiply q by this before q k^T: exact (a power of two) for head_dim 4
        self.scale = 1.0 / (self.head_dim**0.5)

    def forward(self, x: Tensor, future: Tensor) -> Tensor:
        B, T, C = x.shape
        H, hd = self.n_head, self.head_dim
        # attention
        res = x
        x = rmsnorm(x)
        q = F.linear(x, self.attn_wq) * self.scale
        k = F.linear(x, self.attn_wk)
        v = F.linear(x, self.attn_wv)
        q = q.reshape(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.reshape(B, T, H, hd).transpose(1, 2)
        v = v.reshape(B, T, H, hd).transpose(1, 2)
        att = q @ k.transpose(-1, -2)  # [B, H, T, T]
        att = att.masked_fill(future, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = F.linear(y, self.attn_wo) + res
        # MLP
        res = x
        x = rmsnorm(x)
        x = F.linear(F.gelu(F.linear(x, self.mlp_fc1), approximate="none"), self.mlp_fc2) + res
        return x


class MicroGPT(nn.Module):
    """microgpt; ``forward(tokens [B, T] long) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: MicroGPTConfig = MicroGPTConfig()):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        self.cfg = cfg
        V, C = cfg.vocab_size, cfg.n_embd
        self.wte = nn.Parameter(torch.empty(V, C, dtype=torch.float64))
        self.wpe = nn.Parameter(torch.empty(cfg.block_size, C, dtype=torch.float64))
        self.lm_head = nn.Parameter(torch.empty(V, C, dtype=torch.float64))
        for li in range(cfg.n_layer):
            self.add_module(f"layer{li}", _Block(cfg))
        T = cfg.block_size
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        self.register_buffer("future", future, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        B, T = tokens.shape
        x = F.embedding(tokens, self.wte) + self.wpe[:T]
        x = rmsnorm(x)
        future = self.future[:T, :T]
        for li in range(self.cfg.n_layer):
            x = getattr(self, f"layer{li}")(x, future)
        return F.linear(x, self.lm_head)


class TextCorpus:
    """Tokenized documents for a character model: ``[BOS] + chars + [BOS]``, truncated so that
    at most ``block_size`` positions are predicted (``n = min(block_size, len(tokens) - 1)``).

    Provides the per-example loss, text queries and ``contains:``-style predicates.
    """

    def __init__(self, docs: Sequence[str], chars: Sequence[str], model: MicroGPT):
        self.docs = list(docs)
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.bos = len(self.chars)
        self.model = model
        self.block_size = model.cfg.block_size
        if model.cfg.vocab_size != len(self.chars) + 1:
            raise ValueError("vocab_size must be len(chars) + 1 (BOS)")
        inp, tgt, lens = [], [], []
        for d in self.docs:
            x, y = self.encode(d)
            lens.append(len(x))
            pad = self.block_size - len(x)
            inp.append(x + [self.bos] * pad)
            tgt.append(y + [self.bos] * pad)
        self.inputs = torch.tensor(inp, dtype=torch.long).reshape(len(self.docs), self.block_size)
        self.targets = torch.tensor(tgt, dtype=torch.long).reshape(len(self.docs), self.block_size)
        self.lengths = lens

    # -- tokens -------------------------------------------------------------------------------
    def bad_chars(self, text: str) -> list[str]:
        return sorted(set(c for c in text if c not in self.stoi))

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        toks = [self.bos] + [self.stoi[c] for c in text] + [self.bos]
        n = min(self.block_size, len(toks) - 1)
        return toks[:n], toks[1 : n + 1]

    # -- losses -------------------------------------------------------------------------------
    def _loss(self, params, inputs: Tensor, targets: Tensor, lengths: list[int]) -> Tensor:
        logits = functional_call(self.model, params, (inputs,))
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
        T = inputs.shape[1]
        if all(n == T for n in lengths):
            return nll.mean(-1)
        mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
        denom = torch.tensor(lengths, dtype=torch.float64)
        return (nll * mask).sum(-1) / denom

    def example_losses(self, params, idx: Tensor) -> Tensor:
        rows = idx.tolist()
        lengths = [self.lengths[r] for r in rows]
        T = max(lengths)
        return self._loss(params, self.inputs[idx, :T], self.targets[idx, :T], lengths)

    # -- queries ------------------------------------------------------------------------------
    def validate_query(self, q: str) -> None:
        if not isinstance(q, str) or q == "":
            raise ValueError("a query is a non-empty text, e.g. 'emma'")
        bad = self.bad_chars(q)
        if bad:
            raise ValueError(
                f"query {q!r} has characters outside the vocabulary: {''.join(bad)!r} "
                f"(allowed: {''.join(self.chars)!r})"
            )

    def query(self, params, q: str) -> Tensor:
        """Mean next-token loss of document ``q`` (0-dim tensor)."""
        self.validate_query(q)
        x, y = self.encode(q)
        inp = torch.tensor([x], dtype=torch.long)
        tgt = torch.tensor([y], dtype=torch.long)
        return self._loss(params, inp, tgt, [len(x)])[0]

    # -- predicates ---------------------------------------------------------------------------
    def select(self, predicate: str) -> list[int]:
        kind, sep, arg = predicate.partition(":")
        if not sep or arg == "":
            raise ValueError(
                f"bad predicate {predicate!r} (use contains:TEXT, startswith:TEXT, endswith:TEXT or equals:TEXT)"
            )
        tests = {
            "contains": lambda d: arg in d,
            "startswith": lambda d: d.startswith(arg),
            "endswith": lambda d: d.endswith(arg),
            "equals": lambda d: d == arg,
        }
        if kind not in tests:
            raise ValueError(
                f"unknown predicate {kind!r} in {predicate!r} (choose from: {', '.join(tests)})"
            )
        f = tests[kind]
        return [i for i, d in enumerate(self.docs) if f(d)]


QUERY_HELP = "a text (e.g. 'emma'): the model's mean next-token loss on [BOS]+text+[BOS], truncated to the block size"
SELECT_HELP = "contains:TEXT | startswith:TEXT | endswith:TEXT | equals:TEXT (over the training documents)"
