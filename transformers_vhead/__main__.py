"""`python -m transformers_vhead`: the `transformers-vhead` command (slower to start: it imports the package first)."""

import sys

from transformers_vhead_cli import main

if __name__ == "__main__":
    sys.exit(main())
