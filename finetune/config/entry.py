"""The error exit every entry point shares: a UserError becomes one `error: ...` line and status 2.

Recipes wrap their `main` with `recipe_entry_point`; the `tune` launcher wraps its own with
`report_user_errors`. Under torchrun the ranks usually hit the same input error, so they agree
through torchrun's rendezvous store that one line per node is printed, and a rank whose
collective broke because a peer stopped on such an error stays quiet instead of adding a traceback.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from finetune.errors import UserError

if TYPE_CHECKING:
    from torch.distributed import Store


def report_user_errors(main: Callable[[Sequence[str]], Optional[int]], argv: Sequence[str]) -> int:
    """Run `main(argv)`; a UserError becomes one `error:` line and exit status 2."""
    under_torchrun = os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1")
    try:
        return main(argv) or 0
    except UserError as exc:
        # The ranks usually hit the same input error: one line per node is enough.
        if under_torchrun and not first_to_report_user_error():
            return 2
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception:
        # A rank whose collective broke because a peer stopped on an input error: the peer's
        # line says what to fix, and this rank's traceback would only bury it.
        if under_torchrun and peer_stopped_on_user_error():
            return 2
        raise


def recipe_entry_point(main: Callable[[Sequence[str]], Optional[int]]) -> Callable[[Optional[Sequence[str]]], int]:
    """Wrap a recipe's main so it exits 2 with one line on a UserError."""

    def run(argv: Optional[Sequence[str]] = None) -> int:
        return report_user_errors(main, list(sys.argv[1:] if argv is None else argv))

    return run


# torchrun's rendezvous store lives in the launcher, not in a worker, so it outlasts a worker that
# stopped on an input error; workers use it to print that error once and to stay quiet after it.
# The store outlives a restart of the workers (torchrun --max_restarts), so each attempt has its key.
def _user_error_key() -> str:
    return f"finetune/user_error/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _launcher_store() -> Optional[Store]:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    # torch takes seconds to import and only a torchrun worker gets here: `tune ls` and `--help` stay instant.
    import torch.distributed as dist

    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=10)
        )
    except (KeyError, ValueError, RuntimeError):
        return None


def first_to_report_user_error() -> bool:
    """Record that this process stops on an input error; True for the first such process on
    its node, which prints it (every rank usually hits the same error). Outside torchrun:
    local rank 0 prints."""
    store = _launcher_store()
    if store is None:
        return os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        store.add(_user_error_key(), 1)
        return store.add(f"{_user_error_key()}/node{os.environ.get('GROUP_RANK', '0')}", 1) == 1
    except RuntimeError:
        return os.environ.get("LOCAL_RANK", "0") == "0"


def peer_stopped_on_user_error() -> bool:
    """Whether another worker of this torchrun job stopped on an input error (and reported it):
    a collective failing in this process afterwards is a consequence, not a second problem."""
    store = _launcher_store()
    if store is None:
        return False
    try:
        return store.check([_user_error_key()])
    except RuntimeError:
        return False
