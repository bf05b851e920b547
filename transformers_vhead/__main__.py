"""`python -m transformers_vhead`: the `transformers-vhead` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
