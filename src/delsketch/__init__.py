"""delsketch: predict what a trained PyTorch model would do had it never seen some training examples."""

__version__ = "0.1.0"

from .optim import SGD, Adam, AdamW, constant, cosine, linear_decay, warmup  # noqa: E402
from .run import Task, first_steps, retrain, train  # noqa: E402
from .sketch import Prediction, Sketch, SketchError, StabilityWarning, exact_series, first_order, precompute  # noqa: E402
from .taylor import Series, SeriesDomainError, UnsupportedOpError  # noqa: E402

__all__ = [
    "Task", "train", "retrain", "first_steps", "SGD", "Adam", "AdamW", "constant", "cosine", "linear_decay", "warmup",
    "precompute", "Sketch", "Prediction", "SketchError", "StabilityWarning", "exact_series", "first_order",
    "Series", "SeriesDomainError", "UnsupportedOpError",
]
