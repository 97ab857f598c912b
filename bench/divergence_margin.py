"""How far healthy runs stay from the divergence threshold: the largest batch loss over every step of the
built-in presets' runs, divided by max(1, the loss at step 0) (the quantity the check compares with
DIVERGENCE_FACTOR), and where a too-large learning rate first crosses it.

    python bench/divergence_margin.py
"""

from __future__ import annotations

import torch

from delsketch.tasks import get_preset
from delsketch.training import DIVERGENCE_FACTOR, first_steps, train


def ratios(task) -> list[float]:
    losses: list[float] = []
    train(task, callback=lambda s, l: losses.append(abs(float(l))), check_finite=False)
    ref = max(losses[0], 1.0)
    return [x / ref for x in losses]


def main() -> None:
    torch.set_num_threads(1)
    healthy = {
        "digits (SGD)": get_preset("digits")(),
        "digits (Adam)": get_preset("digits")(optimizer="adam"),
        "digits (full batch)": get_preset("digits")(batch=None),
        "names (first 150 steps)": first_steps(get_preset("names")(), 150),
    }
    print(f"threshold: loss > {DIVERGENCE_FACTOR:g} x max(1, loss at step 0)")
    for name, task in healthy.items():
        r = ratios(task)
        print(f"{name:26} {len(r):4} steps  largest ratio {max(r):.3g}")
    for lr in (1e4, 1e2, 10.0):
        r = ratios(get_preset("digits")(n_train=100, lr=lr))
        first = next((s for s, x in enumerate(r) if x > DIVERGENCE_FACTOR), None)
        print(f"digits n_train=100 lr={lr:g}: largest ratio {max(r):.3g}, stopped at step {first}")


if __name__ == "__main__":
    main()
