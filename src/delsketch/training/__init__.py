"""Training runs: the :class:`Task` (what determines a run), the loop that executes it on plain tensors or
on power series, and functional optimizers whose update runs on both."""

from .loop import DIVERGENCE_FACTOR, DivergenceError, batch_loss, deletion_weights, retrain, train
from .from_module import FromModuleWarning, batches, from_module
from .optim import SGD, Adam, AdamW, Optimizer, constant, cosine, differentiable, linear_decay, warmup
from .task import NORMALIZATIONS, NonFiniteError, Task, first_steps

__all__ = [
    "Task", "from_module", "FromModuleWarning", "batches", "NonFiniteError", "NORMALIZATIONS", "first_steps", "train",
    "retrain", "deletion_weights", "batch_loss", "DivergenceError", "DIVERGENCE_FACTOR",
    "SGD", "Adam", "AdamW", "Optimizer", "constant", "cosine", "linear_decay", "warmup", "differentiable",
]
