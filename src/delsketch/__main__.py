"""``python -m delsketch ...`` is the ``delsketch`` command."""

from .cli import entry

entry()
