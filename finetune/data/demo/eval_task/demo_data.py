"""The held-out demo records as an lm-eval dataset, found from any working directory and from a
copy of this folder: a `heldout.jsonl` beside this file is read first (put your own records
there), else the demo's own file in the installed finetune package."""

from pathlib import Path
from typing import Any

import finetune  # the harness imports this file by path, outside any package

HERE = Path(__file__).resolve().parent


def heldout_file() -> Path:
    beside = HERE / "heldout.jsonl"
    if beside.is_file():
        return beside
    return Path(finetune.__file__).resolve().parent / "data" / "demo" / "heldout.jsonl"


def load_heldout(**_: Any) -> dict[str, Any]:
    """{"test": the held-out records}; the harness passes the task's metadata, which is not needed."""
    import datasets  # lm-eval brings it; imported when the harness loads the task, not when this file is found

    return {"test": datasets.Dataset.from_json(str(heldout_file()))}
