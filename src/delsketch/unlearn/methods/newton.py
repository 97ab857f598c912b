"""``newton``: one Newton step with the full Hessian of the retained-data loss at the trained point (the
classical certified-removal update, Guo et al. 2020). Small models only: the Hessian has P x P entries, so a model
with more than ``max_params`` parameters is refused.

With ``L_R = (1/n) sum_{i not in F} loss_i`` (F: everything forgotten so far) and ``H = Hessian of L_R`` at the
trained parameters ``theta``:

* ``form="removal"`` (default): ``theta + (H + damping I)^-1 (1/n) sum_{i in F} grad loss_i`` - the shift of the
  minimum when F's terms leave the objective; at an exact minimum of the full loss this equals the Newton step;
* ``form="newton"``: ``theta - (H + damping I)^-1 grad L_R`` - a full Newton step on the retained loss.

``H + damping I`` must be positive definite; where it is not (a non-convex model), the eigenvalues are replaced by
``max(|lambda|, damping)`` and the record says so. The Hessian is assembled row by row from batched
Hessian-vector products (double backward)."""

from __future__ import annotations

import torch

from ..access import UnlearnError
from ..core import Method, register

FORMS = ("removal", "newton")


def _flat(params, names):
    return torch.cat([params[k].reshape(-1) for k in names])


def _unflat(vec, params, names):
    out, o = {}, 0
    for k in names:
        n = params[k].numel()
        out[k] = vec[o:o + n].reshape(params[k].shape)
        o += n
    return out


def retained_hessian(task, params, retain, n, access=None, block=256):
    """The gradient ``[P]`` and Hessian ``[P, P]`` of ``(1/n) sum_{i in retain} loss_i`` at ``params``."""
    names = list(params)
    theta = _flat(params, names).detach().requires_grad_(True)
    idx = torch.tensor(retain, dtype=torch.long)
    with torch.enable_grad():
        p = _unflat(theta, params, names)
        losses = access.losses(p, idx) if access is not None else task.example_losses(p, idx)
        L = losses.sum() / n
        (g,) = torch.autograd.grad(L, theta, create_graph=True)
        P = theta.numel()
        rows = []
        eye = torch.eye(P, dtype=theta.dtype)
        for lo in range(0, P, block):
            (h,) = torch.autograd.grad(g, theta, grad_outputs=eye[lo:lo + block], is_grads_batched=True,
                                       retain_graph=True)
            rows.append(h.detach())
    H = torch.cat(rows)
    return g.detach(), 0.5 * (H + H.T)


def run(task, params, access, sketch=None, damping=1e-2, form="removal", max_params=5000):
    if form not in FORMS:
        raise UnlearnError(f"newton: unknown form {form!r} (choose from: {', '.join(FORMS)})")
    names = list(params)
    P = sum(params[k].numel() for k in names)
    if P > int(max_params):
        raise UnlearnError(f"newton: the model has {P} parameters, above the limit max_params={max_params} "
                           f"(the Hessian would hold {P * P:,} entries); use another method or raise max_params")
    if not float(damping) >= 0:
        raise UnlearnError(f"newton: damping must be >= 0, got {damping}")
    n = task.n
    g_r, H = retained_hessian(task, params, access.retain, n, access)
    access.examples += len(access.retain) * P  # one Hessian-vector product over the retained set per row
    if form == "removal":
        names_ = list(params)
        theta = _flat(params, names_).detach().requires_grad_(True)
        with torch.enable_grad():
            L_f = access.losses(_unflat(theta, params, names_), torch.tensor(access.forget)).sum() / n
            (g_f,) = torch.autograd.grad(L_f, theta)
        rhs = g_f  # theta_new = theta + H^-1 rhs
        sign = 1.0
    else:
        rhs, sign = g_r, -1.0
    evals, evecs = torch.linalg.eigh(H)
    shifted = evals + float(damping)
    indefinite = bool((shifted <= 0).any())
    lam = torch.where(shifted > 0, shifted, torch.clamp(evals.abs(), min=float(damping) if damping > 0 else 1e-12))
    step = evecs @ ((evecs.T @ rhs) / lam)
    theta_new = _flat(params, names).detach() + sign * step
    info = {"parameters": P, "form": form, "min_eigenvalue": float(evals[0]), "max_eigenvalue": float(evals[-1]),
            "indefinite": indefinite, "step_norm": float(step.norm())}
    if indefinite:
        info["note"] = ("H + damping I was not positive definite: eigenvalues replaced by max(|lambda|, damping)")
    return _unflat(theta_new, params, names), info


register(Method("newton", run, "retain+forget", {"damping": 1e-2, "form": "removal", "max_params": 5000},
                "one Newton step with the retained-data Hessian (small models)",
                "the retained data (Hessian) and the forget set (its gradient)"))
