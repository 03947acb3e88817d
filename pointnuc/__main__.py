"""``python -m pointnuc``: the same CLI as the ``pointnuc`` command."""

from pointnuc.cli import main

main()
