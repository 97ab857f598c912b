"""The unlearning methods, one small module each; importing this package registers them in
:data:`delsketch.unlearn.core.METHODS` (in this order)."""

from . import retrain, finetune, gradient_ascent, neggrad_plus, scrub, newton, synthetic, sketch  # noqa: F401
