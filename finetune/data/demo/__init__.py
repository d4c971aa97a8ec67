"""Demo data shipped with finetune: small rule-based instruction tasks and their tokenizer.

`train.jsonl` and `heldout.jsonl` hold alpaca-format records; `tokenizer.model` is a
512-piece SentencePiece BPE model trained on them. `make_demo_data` regenerates all three.
"""

from pathlib import Path

from finetune.errors import UserError

DEMO_DIR = Path(__file__).parent


def demo_path(name: str) -> Path:
    """Path of a demo file: "train.jsonl", "heldout.jsonl" or "tokenizer.model"."""
    path = DEMO_DIR / name
    if not path.is_file():
        raise UserError(
            f"demo file {path} does not exist; generate it with python -m finetune.data.demo.make_demo_data"
        )
    return path
