"""``python -m errands``: the same as the ``errands`` command."""

from errands.cli import main

main()
