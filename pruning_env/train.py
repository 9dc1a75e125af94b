"""Entry point of ``python -m pruning_env.train`` (the CLI lives in :mod:`pruning_env.cli.train`)."""

import sys

from pruning_env.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
