"""``python -m corral``: the ``corral`` command."""

from corral.cli import main

main()
