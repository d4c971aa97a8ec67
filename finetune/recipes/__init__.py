"""Recipes: one readable file per job, each a class satisfying `Recipe` plus a `main(argv)`."""

from typing import Any, Callable, Optional, Protocol, Sequence

from finetune.config import TuneArgumentParser, recipe_entry_point


class Recipe(Protocol):
    """What every recipe class offers; recipes share blocks, never a base class."""

    def setup(self) -> None: ...

    def train(self) -> None: ...

    def save_checkpoint(self) -> None: ...

    def cleanup(self) -> None: ...


def run_recipe(recipe: "RunnableRecipe") -> int:
    """setup, train, cleanup; a failure is recorded in the job status before it propagates.

    Ctrl-C ends with exit status 130 (the recipe saved a checkpoint on its way out).
    """
    try:
        recipe.setup()
        recipe.train()
    except KeyboardInterrupt as exc:
        recipe.fail(exc)
        return 130
    except BaseException as exc:
        recipe.fail(exc)
        raise
    finally:
        recipe.cleanup()
    return 0


class RunnableRecipe(Recipe, Protocol):
    """A training recipe that can also record its own failure in the job status."""

    def fail(self, error: BaseException) -> None: ...


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
