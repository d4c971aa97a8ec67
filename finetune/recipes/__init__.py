"""Recipes: one readable file per job, each a class satisfying `Recipe` plus a `main(argv)`."""

from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

from finetune.config import TuneArgumentParser, recipe_entry_point
from finetune.training.guards import PREEMPTED_EXIT_STATUS, STOPPED_EXIT_STATUS, Preempted, preempt_on_sigterm

if TYPE_CHECKING:  # for the annotation only: importing it here would load the training stack for every recipe
    from finetune.training.run import RunContext


class Recipe(Protocol):
    """What every recipe class offers; recipes share blocks, never a base class."""

    def setup(self) -> None: ...

    def train(self) -> None: ...

    def save_checkpoint(self) -> None: ...

    def cleanup(self) -> None: ...


def run_recipe(recipe: "TrainingRecipe") -> int:
    """setup, train, cleanup; how the run ended is recorded in the job status.

    Ctrl-C ends with exit status 130 (STOPPED_EXIT_STATUS) and SIGTERM, which schedulers send
    before preempting a job, with 143 (PREEMPTED_EXIT_STATUS): in training both save a checkpoint
    after the step in progress first; in setup there is nothing to save yet. Any other error is
    recorded as a failure and propagates.
    """
    restore_sigterm = preempt_on_sigterm()
    try:
        recipe.setup()
        recipe.train()
    except KeyboardInterrupt as exc:
        _record_end(recipe, exc)
        return STOPPED_EXIT_STATUS
    except Preempted as exc:
        _record_end(recipe, exc)
        return PREEMPTED_EXIT_STATUS
    except BaseException as exc:
        _record_end(recipe, exc)
        raise
    finally:
        recipe.cleanup()
        restore_sigterm()
    return 0


class TrainingRecipe(Recipe, Protocol):
    """A training recipe: its run (None until setup starts one) is where the job status lives."""

    run: Optional["RunContext"]


def _record_end(recipe: TrainingRecipe, error: BaseException) -> None:
    """Ctrl-C as stopped, SIGTERM as preempted, anything else as failed (see RunContext.fail)."""
    if recipe.run is not None:
        recipe.run.fail(error)


def run_once(recipe: Any, work: Callable[[], object]) -> int:
    """setup, the recipe's one piece of work (generate, quantize, evaluate), cleanup also after a failure."""
    try:
        recipe.setup()
        work()
    finally:
        recipe.cleanup()
    return 0


def recipe_main(params_class: type, prog: str, run: Callable[[Any], int]) -> Callable[[Optional[Sequence[str]]], int]:
    """A recipe module's `main(argv)`: parse argv into `params_class` and `run` it; an input error
    anywhere ends as one `error:` line and exit status 2."""

    def parse_and_run(argv: Sequence[str]) -> int:
        return run(TuneArgumentParser(params_class, prog=prog).parse_args(argv))

    return recipe_entry_point(parse_and_run)
