"""Unlearning: remove training examples from a trained model without retraining it, and measure how close it
came to retraining.

``unlearn(task, forget, method, ...)`` runs one of :data:`METHODS` (``retrain``, ``finetune``,
``gradient_ascent``, ``neggrad_plus``, ``scrub``, ``newton``, ``synthetic``, ``sketch``), ``save``/``load`` store
the result (safetensors + checksummed manifest), ``verify`` compares it with retraining, ``unlearn_sequence``
applies requests one after another."""

from .access import AVAILABLE, UnlearnError
from .core import FORMAT, METHODS, Method, Unlearned, _methods, load, save, unlearn
from .parallel import references, retrain_many
from .sequence import unlearn_sequence
from .verify import Reference, format_table, reference, verify

_methods()

__all__ = ["unlearn", "save", "load", "verify", "reference", "references", "retrain_many", "Reference", "unlearn_sequence", "format_table",
           "Unlearned", "Method", "METHODS", "AVAILABLE", "UnlearnError", "FORMAT"]
