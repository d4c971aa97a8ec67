"""The chat message type shared by tokenizers and datasets."""

from dataclasses import dataclass
from typing import Literal, Optional

Role = Literal["system", "user", "assistant", "ipython"]

ROLES: tuple[str, ...] = ("system", "user", "assistant", "ipython")


@dataclass
class Message:
    """One turn of a conversation.

    `masked` decides whether the turn is excluded from the loss. Left as None, only
    assistant turns are trained on, which is what chat fine-tuning wants by default.
    """

    role: Role
    content: str
    masked: Optional[bool] = None

    @property
    def is_masked(self) -> bool:
        if self.masked is None:
            return self.role != "assistant"
        return self.masked
