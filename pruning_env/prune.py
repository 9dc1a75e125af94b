"""Entry point of ``python -m pruning_env.prune`` (the CLI lives in :mod:`pruning_env.cli.prune`)."""

import sys

from pruning_env.cli.prune import main

if __name__ == "__main__":
    sys.exit(main())
