"""``python -m delsketch ...`` is the ``delsketch`` command."""

from .apps.cli import entry

entry()
