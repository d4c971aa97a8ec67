"""Recipes: one readable file per job, each a class satisfying `Recipe` plus a `main(argv)`."""

from typing import Protocol


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
