"""``python -m selftrain``: the same command line as the ``selftrain`` script."""

from selftrain.cli import main

main()
