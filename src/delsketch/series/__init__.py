"""Truncated power series: the kernels (``kernels``, pure functions on ``[m, K, *shape]`` complex stacks) and
the ``Series`` tensor that carries them through ordinary PyTorch code (``tensor``). Imports nothing else of
delsketch."""

from . import kernels
from .registry import KINDS, register_rule, registered, use_torch_decomposition
from .kernels import SeriesDomainError
from .tensor import (
    NonAnalyticWarning,
    Series,
    UnsupportedOpError,
    all_finite,
    coefficients,
    is_series,
    lift,
    module_context,
    variable,
)
from .check import check_rule

__all__ = [
    "kernels", "Series", "SeriesDomainError", "UnsupportedOpError", "NonAnalyticWarning", "all_finite",
    "coefficients", "is_series", "lift", "module_context", "variable",
    "register_rule", "use_torch_decomposition", "registered", "KINDS", "check_rule",
]
