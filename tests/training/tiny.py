"""A tiny decoder-shaped model for the training-block tests.

It has what the blocks rely on (`tok_embeddings`, `layers`, `norm`, `output`, optionally tied),
with a causal token mix so that positions interact, and optional dropout to exercise RNG replay.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TinyLayer(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        h = self.norm(x)
        # Causal mix: position i sees the running mean of positions <= i.
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
        x = x + self.mix(h.cumsum(dim=1) / steps)
        h = F.silu(self.up(self.norm(x)))
        h = F.dropout(h, p=self.dropout, training=self.training)
        return x + scale * self.down(h)


class TinyDecoder(nn.Module):
    def __init__(
        self, vocab: int = 64, dim: int = 32, n_layers: int = 3, *, tied: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(TinyLayer(dim, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, *, return_hidden: bool = False) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, scale=0.5)
        h = self.norm(h)
        return h if return_hidden else self.output(h)


def make_batch(seed: int, batch: int = 4, seq: int = 16, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and shifted labels, with some labels ignored (-100) as prompt masking would."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[:, : seq // 4] = -100
    labels[0, -3:] = -100
    return tokens[:, :-1], labels
