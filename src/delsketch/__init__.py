"""delsketch: predict what a trained PyTorch model would do had it never seen some training examples."""

__version__ = "0.1.0"
