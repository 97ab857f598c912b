"""delsketch: predict what a trained PyTorch model would do had it never seen some training examples."""

from . import _alloc  # noqa: F401  (first: it asks for huge pages before torch is imported)
from .version import __version__  # noqa: E402,F401

from .series import Series, SeriesDomainError, UnsupportedOpError  # noqa: E402
from .sketch import Prediction, Sketch, SketchError, StabilityWarning, exact_series, first_order, precompute  # noqa: E402
from .training import SGD, Adam, AdamW, Task, constant, cosine, first_steps, linear_decay, retrain, train, warmup  # noqa: E402

__all__ = [
    "Task", "train", "retrain", "first_steps", "SGD", "Adam", "AdamW", "constant", "cosine", "linear_decay", "warmup",
    "precompute", "Sketch", "Prediction", "SketchError", "StabilityWarning", "exact_series", "first_order",
    "Series", "SeriesDomainError", "UnsupportedOpError",
]
