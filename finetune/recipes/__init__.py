"""Recipes: one readable file per job, each a class satisfying `Recipe` plus a `main(argv)`."""

from typing import Protocol


class Recipe(Protocol):
    """What every recipe class offers; recipes share blocks, never a base class."""

    def setup(self) -> None: ...

    def train(self) -> None: ...

    def save_checkpoint(self) -> None: ...

    def cleanup(self) -> None: ...
