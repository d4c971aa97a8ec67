"""A state dict whose tensors are made only when a writer reads them.

Writing a model needs every tensor's shape and dtype first (shards, the index, the safetensors
header) but each tensor's values only while that tensor is written. A `LazyStateDict` knows the
former up front and makes the latter on demand, so a writer holds one tensor at a time: a merged
LoRA model, say, is merged, copied to the host and written weight by weight instead of being
held whole in host memory.
"""

from collections.abc import Iterator, Mapping
from typing import Callable, Optional, Union

import torch

Spec = tuple[tuple[int, ...], torch.dtype]  # shape, dtype


class LazyStateDict(Mapping):
    """Named tensors made by `make(name)` each time they are read; `spec(name)` without making it."""

    def __init__(self, specs: dict[str, Spec], make: Callable[[str], torch.Tensor]) -> None:
        self.specs, self.make = specs, make

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self.make(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def spec(self, name: str) -> Spec:
        return self.specs[name]

    def select(self, names: list[str], rename: Optional[Callable[[str], str]] = None) -> "LazyStateDict":
        """The entries `names` (in that order), optionally under new names; still lazy."""
        rename = rename or (lambda name: name)
        source = {rename(name): name for name in names}
        return LazyStateDict({new: self.specs[old] for new, old in source.items()}, lambda new: self.make(source[new]))

    def cast(self, dtype: Optional[torch.dtype]) -> "LazyStateDict":
        """Floating-point entries converted to `dtype` when read (None: as they are)."""

        def stored(spec: Spec) -> Spec:
            shape, own = spec
            return shape, dtype if dtype is not None and own.is_floating_point else own

        return LazyStateDict(
            {name: stored(spec) for name, spec in self.specs.items()},
            lambda name: self.make(name).to(stored(self.specs[name])[1]),
        )


def lazy(tensors: Union[Mapping[str, torch.Tensor], LazyStateDict]) -> LazyStateDict:
    """`tensors` as a LazyStateDict: itself, or a view of a plain mapping (no copy)."""
    if isinstance(tensors, LazyStateDict):
        return tensors
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    return LazyStateDict(specs, tensors.__getitem__)


def nbytes(spec: Spec) -> int:
    shape, dtype = spec
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize
