"""``python -m relay``: the same as the ``relay`` console script."""

from relay.cli import main

main()
