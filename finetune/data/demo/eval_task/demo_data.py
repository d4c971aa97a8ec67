"""The held-out demo records as an lm-eval dataset, found next to this file from any working directory."""

from pathlib import Path
from typing import Any

HELDOUT = Path(__file__).resolve().parent.parent / "heldout.jsonl"


def load_heldout(**_: Any) -> dict[str, Any]:
    """{"test": the held-out records}; the harness passes the task's metadata, which is not needed."""
    import datasets  # lm-eval brings it; imported when the harness loads the task, not when this file is found

    return {"test": datasets.Dataset.from_json(str(HELDOUT))}
