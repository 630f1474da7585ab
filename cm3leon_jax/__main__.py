"""`python -m cm3leon_jax <command>`: see cm3leon_jax/cli.py."""

import sys

from cm3leon_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
