"""`python -m fastkd.demo [options]`: the same as `fastkd demo [options]`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
