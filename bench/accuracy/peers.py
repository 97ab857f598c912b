"""Peer attribution libraries, each turned into "predicted change of query q when training example i is deleted".

Every peer returns ``{"scores": [len(pool), Q] array (the visited examples), "rank_only": bool, "settings": {...}}``; the benchmark predicts
the change for a set D as ``scores[D].sum(0)`` (the standard additive approximation). Scale and sign follow
from each method's own definition (nothing is fitted on the truth):

* influence functions (dattri IF-CG, kronfluence EK-FAC): upweighting example i by eps changes the query's
  loss by -eps g_q^T H^-1 g_i with H the Hessian (or GGN) of the *mean* training loss; deletion is
  eps = -1/n, so the predicted change is + g_q^T H^-1 g_i / n.
* TracIn (captum TracInCP, dattri TracIn): deleting i removes the step -lr_t/b * g_i(theta_t) from every step
  that used i (b = batch size, fixed normalization); TracIn's estimate of the rise of the query's loss is
  sum_t lr_t/b * g_q . g_i, with checkpoints standing for the steps between them (TracInCP). This is TracIn's own
  definition (the learning rate as the checkpoint weight); momentum is ignored, as in TracIn (counting each
  gradient with its total momentum weight lr/(1 - beta) would multiply the scores by 10 on digits). For Adam
  (names, paper) the step is not lr * g, so TracIn there is only rank-meaningful.
* TRAK (dattri): scores are in units of the model-output function (margin), not of the loss: rank-only.

The orientation of every method is checked in the run itself (deleting training example j must raise the loss
of example j; see ``orientation_self_deletion_positive`` in the results).
"""

from __future__ import annotations

import importlib
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from delsketch import training as run

PEERS_MODULES = {
    "captum TracInCP": "captum",
    "dattri IF-CG": "dattri",
    "dattri TracIn": "dattri",
    "dattri TRAK": "dattri",
    "kronfluence EK-FAC": "kronfluence",
}


def importable(name: str) -> bool:
    try:
        importlib.import_module(PEERS_MODULES[name])
        return True
    except Exception:  # noqa: BLE001
        return False


def why_unavailable(name: str) -> str:
    try:
        importlib.import_module(PEERS_MODULES[name])
        return "not requested"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def versions() -> dict:
    out = {}
    for mod in sorted(set(PEERS_MODULES.values())):
        try:
            out[mod] = importlib.metadata.version(mod)
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


# ------------------------------------------------------------------------------------------------ helpers


def checkpoints(bt, count: int) -> list[tuple[int, dict]]:
    """(step, parameters) after ``count`` evenly spaced segments of the run (the last one = the trained model)."""
    T = bt.task.steps
    if bt.training["batch"] < bt.task.n and not bt.training["adam"]:
        per_epoch = math.ceil(bt.task.n / bt.training["batch"])
        ends = list(range(per_epoch, T + 1, per_epoch))  # epoch ends
        if ends[-1] != T:
            ends.append(T)
    else:
        ends = sorted(set(round(T * (c + 1) / count) for c in range(count)))
    return [(s, run.train(bt.task, steps=s)) for s in ends]


def tracin_weights(bt, ends: list[int]) -> list[float]:
    """Weight of each checkpoint: sum over the steps it stands for of lr_t / b times the chance that an
    example is in a step's batch (TracIn's learning-rate weight; momentum ignored, as TracIn does)."""
    opt = bt.task.optimizer
    b = bt.training["batch"]
    w, prev = [], 0
    for e in ends:
        # every example is used once per epoch (minibatch) or every step (full batch); per example:
        steps = range(prev, e)
        per_step_use = b / len(bt.pool)  # probability that an example is in a step's batch
        w.append(sum(opt.lr_at(s) for s in steps) * per_step_use / b)
        prev = e
    return w


def _train(bt):
    """The training examples the run visits (all of them unless the run was cut with first_steps)."""
    return bt.train_x[bt.pool], bt.train_y[bt.pool]


def final_params(bt) -> dict:
    return run.train(bt.task)


def _load_into(model: nn.Module, params: dict) -> nn.Module:
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
    return model


# ------------------------------------------------------------------------------------------------ captum


class _LossModel(nn.Module):
    """model(x) -> logits; captum computes per-example gradients of loss_fn(model(x), y)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, x):
        return self.inner(x)


def captum_tracincp(bt) -> dict:
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    ckpts = checkpoints(bt, 5)
    weights = tracin_weights(bt, [s for s, _ in ckpts])
    model = _LossModel(bt.model)
    tmp = Path(tempfile.mkdtemp(prefix="captum-ckpt-"))
    paths = []
    for (s, p), w in zip(ckpts, weights):
        path = tmp / f"ckpt-{s:05d}.pt"
        torch.save({"params": {f"inner.{k}": v for k, v in p.items()}, "learning_rate": w}, path)
        paths.append(str(path))

    def load(model_, path):
        blob = torch.load(path)
        _load_into(model_, blob["params"])
        return blob["learning_rate"]

    class PerExampleLoss(nn.Module):
        reduction = "none"

        def forward(self, logits, y):
            return _per_example_ce(logits, y)

    ds = TensorDataset(*_train(bt))
    tr = TracInCP(model, ds, checkpoints=paths, checkpoints_load_func=load, loss_fn=PerExampleLoss(),
                  batch_size=64, sample_wise_grads_per_batch=False)
    infl = tr.influence((bt.test_x, bt.test_y), show_progress=False)  # [Q, n]
    scores = infl.detach().double().numpy().T
    return {"scores": scores, "rank_only": bool(bt.training["adam"]),
            "settings": {"checkpoints_at_steps": [s for s, _ in ckpts], "checkpoint_weights": weights,
                         "layers": "all parameters", "loss_fn": "per-example (reduction='none')",
                         "sample_wise_grads_per_batch": False,
                         "scale": "checkpoint weight = sum of lr_t/b over the steps it stands for (per example)"}}


# ------------------------------------------------------------------------------------------------ dattri


def _dattri_loss(bt):
    def loss_func(params, data):
        x, y = data
        if x.dim() == bt.train_x.dim() - 1:  # a single example
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return bt.loss(params, x, y).mean()

    return loss_func


def _loaders(bt, batch=None, test_batch=None):
    from torch.utils.data import DataLoader, TensorDataset

    tr = DataLoader(TensorDataset(*_train(bt)), batch_size=batch or len(bt.pool), shuffle=False)
    te = DataLoader(TensorDataset(bt.test_x, bt.test_y), batch_size=test_batch or len(bt.test_x), shuffle=False)
    return tr, te


IF_REGULARIZATION = 1e-2
IF_MODE = "rev-rev"  # dattri's default
IF_HESSIAN_EXAMPLES = {"digits": None, "names": 64, "paper": 64}  # None: all; text tasks: a fixed random subsample
# (with all 300 names in the Hessian batch dattri's CG exceeded 14 GB of memory, even for one test vector)


def dattri_if_cg(bt) -> dict:
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.task import AttributionTask

    p = final_params(bt)
    model = _load_into(bt.model, p)
    task = AttributionTask(loss_func=_dattri_loss(bt), model=model, checkpoints=model.state_dict())
    attr = IFAttributorCG(task=task, max_iter=10, regularization=IF_REGULARIZATION, mode=IF_MODE)
    # one batch: the Hessian is that of the mean training loss; test vectors 5 at a time (dattri vmaps the CG
    # solves over a test batch: all 25 at once took > 23 GB on names)
    full, test = _loaders(bt, test_batch=5)
    h = IF_HESSIAN_EXAMPLES.get(bt.key.split("-")[0])
    if h is not None and h < len(bt.pool):
        from torch.utils.data import DataLoader, TensorDataset

        sub = torch.randperm(len(bt.pool), generator=torch.Generator().manual_seed(0))[:h]
        x, y = _train(bt)
        hess = DataLoader(TensorDataset(x[sub], y[sub]), batch_size=h, shuffle=False)
    else:
        hess = full
    attr.cache(hess)
    # one training batch too: dattri redoes the CG solves for every training batch
    s = attr.attribute(full, test)  # [n, Q] = g_i^T (H + reg I)^-1 g_q
    return {"scores": s.detach().double().numpy() / len(bt.pool), "rank_only": False,
            "settings": {"max_iter": 10, "tol": 1e-7, "mode": IF_MODE, "regularization": IF_REGULARIZATION,
                         "hessian": "mean training loss at the trained parameters, one batch of "
                                    + (f"{h} random training examples" if h is not None and h < len(bt.pool) else "all training examples"),
                         "scale": "score / n"}}


def dattri_tracin(bt) -> dict:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    ckpts = checkpoints(bt, 5)
    weights = tracin_weights(bt, [s for s, _ in ckpts])
    model = bt.model
    states = [{k: v.clone() for k, v in p.items()} for _, p in ckpts]
    task = AttributionTask(loss_func=_dattri_loss(bt), model=model, checkpoints=states)
    attr = TracInAttributor(task=task, weight_list=torch.tensor(weights, dtype=torch.float64),
                            normalized_grad=False, projector_kwargs={"proj_dim": 512, "proj_max_batch_size": 32,
                                                                     "proj_seed": 0, "device": "cpu"})
    # dattri always projects (its default projector kwargs); 512 dims is its default
    train, test = _loaders(bt, batch=64)
    s = attr.attribute(train, test)
    return {"scores": s.detach().double().numpy(), "rank_only": bool(bt.training["adam"]),
            "settings": {"checkpoints_at_steps": [s_ for s_, _ in ckpts], "weight_list": weights,
                         "normalized_grad": False, "projection": "random, proj_dim 512 (dattri default)",
                         "scale": "checkpoint weight = sum of lr_t/b over the steps it stands for (per example)"}}


def dattri_trak(bt) -> dict:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    p = final_params(bt)
    model = _load_into(bt.model, p)
    def logp_correct(params, data):  # mean log-probability of the correct tokens/class (a scalar)
        x, y = data
        if x.dim() == bt.train_x.dim() - 1:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return -bt.loss(params, x, y).mean()

    def margin(params, data):  # TRAK's output function: log(p / (1 - p)) of the correct label
        lp = logp_correct(params, data)
        return lp - torch.log1p(-torch.exp(lp))

    # a task may bring its own margin(params, x, y) (bench/own_model: the logit difference of a binary
    # classifier, where p rounds to 1 in float64 and the formula above is infinite); the tasks here do not
    own_margin = getattr(bt, "margin", None)
    if own_margin is not None:
        def margin(params, data):  # noqa: F811
            x, y = data
            if x.dim() == bt.train_x.dim() - 1:
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            return own_margin(params, x, y).mean()

    def correct_probability(params, data):
        return torch.exp(logp_correct(params, data))

    # TRAK's features are gradients of the model-output function (the margin) for training and test examples
    # alike (dattri takes the training features from loss_func): pass the margin as both
    task = AttributionTask(loss_func=margin, model=model, checkpoints=[model.state_dict()], target_func=margin)
    attr = TRAKAttributor(task=task, correct_probability_func=correct_probability,
                          projector_kwargs={"proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0,
                                            "device": "cpu"}, regularization=0.0)
    full, test = _loaders(bt, batch=64)
    attr.cache(full)
    s = attr.attribute(test)  # [n, Q]: positive = supports the correct output (deleting it raises the loss)
    return {"scores": s.detach().double().numpy(), "rank_only": True,
            "settings": {"checkpoints": "the trained model only (one run; TRAK's ensembles need retrained models)",
                         "output_function": getattr(bt, "margin_description", None)
                                            or "margin log(p/(1-p)) of the correct class (digits) / of the "
                                               "geometric-mean token probability (names)",
                         "projection": "proj_dim 512 (dattri default)", "regularization": 0.0,
                         "scale": "rank-only (scores are in margin units)"}}


# ------------------------------------------------------------------------------------------------ kronfluence


class LinearMicroGPT(nn.Module):
    """delsketch's microgpt with its matrices as nn.Linear(bias=False) modules (same arithmetic), so that
    kronfluence, which factors nn.Linear / nn.Conv2d modules only, can see them. The embeddings stay plain
    parameters (not factored, as usual for EK-FAC)."""

    def __init__(self, ref: nn.Module):
        super().__init__()
        from delsketch.tasks.microgpt import rmsnorm

        self.rmsnorm = rmsnorm
        cfg = ref.cfg
        V, C = cfg.vocab_size, cfg.n_embd
        self.cfg = cfg
        self.wte = nn.Parameter(torch.empty(V, C, dtype=torch.float64))
        self.wpe = nn.Parameter(torch.empty(cfg.block_size, C, dtype=torch.float64))
        self.lm_head = nn.Linear(C, V, bias=False, dtype=torch.float64)
        lin = lambda i, o: nn.Linear(i, o, bias=False, dtype=torch.float64)  # noqa: E731
        self.blocks = nn.ModuleList()
        for _ in range(cfg.n_layer):
            b = nn.Module()
            b.attn_wq, b.attn_wk, b.attn_wv, b.attn_wo = lin(C, C), lin(C, C), lin(C, C), lin(C, C)
            b.mlp_fc1, b.mlp_fc2 = lin(C, 4 * C), lin(4 * C, C)
            self.blocks.append(b)
        self.n_head, self.head_dim = cfg.n_head, C // cfg.n_head
        self.scale = 1.0 / (self.head_dim ** 0.5)
        T = cfg.block_size
        self.register_buffer("future", torch.ones(T, T, dtype=torch.bool).triu(1), persistent=False)

    def load(self, params: dict) -> "LinearMicroGPT":
        with torch.no_grad():
            self.wte.copy_(params["wte"])
            self.wpe.copy_(params["wpe"])
            self.lm_head.weight.copy_(params["lm_head"])
            for li, b in enumerate(self.blocks):
                for k in ("attn_wq", "attn_wk", "attn_wv", "attn_wo", "mlp_fc1", "mlp_fc2"):
                    getattr(b, k).weight.copy_(params[f"layer{li}.{k}"])
        return self

    def forward(self, tokens):
        import torch.nn.functional as F

        B, T = tokens.shape
        H, hd = self.n_head, self.head_dim
        x = self.rmsnorm(F.embedding(tokens, self.wte) + self.wpe[:T])
        future = self.future[:T, :T]
        for b in self.blocks:
            res = x
            h = self.rmsnorm(x)
            q = (b.attn_wq(h) * self.scale).reshape(B, T, H, hd).transpose(1, 2)
            k = b.attn_wk(h).reshape(B, T, H, hd).transpose(1, 2)
            v = b.attn_wv(h).reshape(B, T, H, hd).transpose(1, 2)
            att = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(future, float("-inf")), dim=-1)
            x = b.attn_wo((att @ v).transpose(1, 2).reshape(B, T, -1)) + res
            res = x
            x = b.mlp_fc2(F.gelu(b.mlp_fc1(self.rmsnorm(x)), approximate="none")) + res
        return self.lm_head(x)


def _per_example_ce(logits, y):
    logp = torch.log_softmax(logits, -1)
    if y.dim() == 1:
        return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    mask = (y >= 0).to(logp.dtype)
    nll = -logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(-1) / mask.sum(-1)


def kronfluence_ekfac(bt) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask
    from torch.utils.data import TensorDataset

    p = final_params(bt)
    ported = not any(isinstance(m, nn.Linear) for m in bt.model.modules())
    if ported:  # microgpt: raw parameters with F.linear -> the same model with nn.Linear modules
        model = LinearMicroGPT(bt.model).load(p)
        with torch.no_grad():
            diff = (_per_example_ce(model(bt.train_x[:20]), bt.train_y[:20])
                    - bt.loss(p, bt.train_x[:20], bt.train_y[:20])).abs().max()
        assert diff < 1e-10, f"ported microgpt differs from the preset's by {diff}"
    else:
        model = _load_into(bt.model, p)
    linear_names = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)]  # before prepare_model wraps them

    class KT(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model (padded positions stay padded)
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), -1)
                    yy = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(y.shape)
                    y = torch.where(y >= 0, yy, y)
            return _per_example_ce(logits, y).sum()

        def compute_measurement(self, batch, model):
            x, y = batch
            return _per_example_ce(model(x), y).sum()

        def get_attention_mask(self, batch):
            x, y = batch
            return (y >= 0).to(torch.long) if y.dim() == 2 else None

    model = prepare_model(model, KT())
    out = Path(tempfile.mkdtemp(prefix="kronfluence-"))
    an = Analyzer(analysis_name="bench", model=model, task=KT(), cpu=True, disable_tqdm=True, output_dir=str(out))
    fargs = FactorArguments(strategy="ekfac")
    train = TensorDataset(*_train(bt))
    test = TensorDataset(bt.test_x, bt.test_y)
    an.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=64, factor_args=fargs,
                       overwrite_output_dir=True)
    sargs = ScoreArguments(damping_factor=None)
    an.compute_pairwise_scores(scores_name="s", factors_name="ekfac", query_dataset=test, train_dataset=train,
                               per_device_query_batch_size=len(test), per_device_train_batch_size=64,
                               score_args=sargs, overwrite_output_dir=True)
    s = an.load_pairwise_scores("s")["all_modules"]  # [Q, n]
    return {"scores": s.detach().double().numpy().T / len(bt.pool), "rank_only": False,
            "settings": {"strategy": "ekfac", "damping_factor": "None (kronfluence heuristic: 0.1 x mean eigenvalue)",
                         "train loss": "summed per-example loss (kronfluence convention), true Fisher (sampled labels)",
                         "modules": ("the 7 matrices of microgpt, ported to nn.Linear (checked equal to the preset's "
                                     "loss); embeddings not factored") if ported else
                                    f"all nn.Linear ({', '.join(linear_names)})",
                         "scale": "score / n"}}


PEERS = {
    "captum TracInCP": captum_tracincp,
    "dattri IF-CG": dattri_if_cg,
    "dattri TracIn": dattri_tracin,
    "dattri TRAK": dattri_trak,
    "kronfluence EK-FAC": kronfluence_ekfac,
}
