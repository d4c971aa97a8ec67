"""`python -m finetune.cli ...` is `tune ...` (torchrun's workers start a user's recipe file this way)."""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
