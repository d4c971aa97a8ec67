"""Packing layout, collate padding, and packed rows training exactly like unpacked samples."""

from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.data import IGNORE_INDEX, PackedDataset, TokenizedDataset, build_dataset, collate
from finetune.data.demo import demo_path
from finetune.tokenizers import Tokenizer

X = IGNORE_INDEX


def small_dataset() -> TokenizedDataset:
    return TokenizedDataset(
        [
            ([1, 10, 11, 2], [X, 11, 2, X]),
            ([1, 20, 21, 22, 2], [X, X, 22, 2, X]),
            ([1, 30, 2], [X, 2, X]),
            ([1, 40, 41, 42, 43, 44, 2], [X, 41, 42, 43, 44, 2, X]),
        ]
    )


def test_packed_rows_layout() -> None:
    messages: list[str] = []
    packed = PackedDataset(small_dataset(), max_seq_len=10, pad_id=0, log=messages.append)
    assert len(packed) == 2
    assert packed[0] == {
        "tokens": [1, 10, 11, 2, 1, 20, 21, 22, 2, 0],
        "labels": [X, 11, 2, X, X, X, 22, 2, X, X],
        "position_ids": [0, 1, 2, 3, 0, 1, 2, 3, 4, 0],
        "document_ids": [0, 0, 0, 0, 1, 1, 1, 1, 1, 2],
    }
    assert packed[1] == {
        "tokens": [1, 30, 2, 1, 40, 41, 42, 43, 44, 2],
        "labels": [X, 2, X, X, 41, 42, 43, 44, 2, X],
        "position_ids": [0, 1, 2, 0, 1, 2, 3, 4, 5, 6],
        "document_ids": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
    }
    assert packed.efficiency == 19 / 20
    assert messages == [
        "packed 4 samples into 2 rows of 10 tokens; packing efficiency 95.0% (non-pad tokens / all tokens)"
    ]


def test_packing_rejects_a_sample_longer_than_a_row() -> None:
    with pytest.raises(ValueError, match="does not fit max_seq_len=6"):
        PackedDataset(small_dataset(), max_seq_len=6, pad_id=0)


def test_collate_pads_to_the_longest_sample() -> None:
    batch = collate([small_dataset()[0], small_dataset()[1]], pad_id=7)
    assert batch["tokens"].dtype == torch.long
    assert batch["tokens"].tolist() == [[1, 10, 11, 2, 7], [1, 20, 21, 22, 2]]
    assert batch["labels"].tolist() == [[X, 11, 2, X, X], [X, X, 22, 2, X]]
    assert set(batch) == {"tokens", "labels"}


def test_collate_keeps_packed_fields() -> None:
    packed = PackedDataset(small_dataset(), max_seq_len=10, pad_id=0)
    batch = collate([packed[0], packed[1]])
    assert batch["position_ids"].tolist() == [packed[0]["position_ids"], packed[1]["position_ids"]]
    assert batch["document_ids"].tolist() == [packed[0]["document_ids"], packed[1]["document_ids"]]
    short = {name: values[:5] for name, values in packed[1].items()}
    padded = collate([packed[0], short], pad_id=0)
    assert padded["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    assert padded["document_ids"][1].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]


class TinyDocumentLM(nn.Module):
    """One SDPA attention block that honours document_ids with a block-diagonal causal mask."""

    def __init__(self, vocab_size: int, dim: int = 32, max_positions: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_positions, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab_size)
        self.n_heads = 4

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        b, s = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(s).expand(b, s)
        if document_ids is None:
            document_ids = torch.zeros(b, s, dtype=torch.long)
        x = self.embed(tokens) + self.positions(position_ids)
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        mask = causal & (document_ids[:, :, None] == document_ids[:, None, :])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.head(x + self.out(y.transpose(1, 2).reshape(b, s, -1)))


def per_token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Losses of the trained-on positions, in row-major order."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs)
    losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=X, reduction="none")
    return losses[batch["labels"].flatten() != X]


@pytest.fixture(scope="module")
def demo_samples(sp_tokenizer: Tokenizer) -> TokenizedDataset:
    dataset = build_dataset(
        str(demo_path("heldout.jsonl")),
        dataset_type="instruct",
        tokenizer=sp_tokenizer,
        max_seq_len=64,
        template="plain",
        split="train[:24]",
    )
    assert isinstance(dataset, TokenizedDataset)
    return dataset


def packed_and_unpacked_losses(
    model: nn.Module, samples: TokenizedDataset, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    packed = PackedDataset(samples, max_seq_len=64, pad_id=pad_id)
    assert len(packed) < len(samples) // 2  # rows really hold several documents
    with torch.no_grad():
        packed_losses = per_token_losses(model, collate([packed[i] for i in range(len(packed))], pad_id))
        unpacked_losses = per_token_losses(model, collate([samples[i] for i in range(len(samples))], pad_id))
    return packed_losses, unpacked_losses


def test_packed_rows_give_the_same_per_token_loss(demo_samples: TokenizedDataset, sp_tokenizer: Tokenizer) -> None:
    torch.manual_seed(0)
    model = TinyDocumentLM(sp_tokenizer.vocab_size)
    packed, unpacked = packed_and_unpacked_losses(model, demo_samples, sp_tokenizer.pad_id)
    assert packed.shape == unpacked.shape
    assert packed.shape[0] == sum(
        sum(label != X for label in demo_samples[i]["labels"]) for i in range(len(demo_samples))
    )
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)


def test_packed_rows_with_the_real_model(demo_samples: TokenizedDataset, sp_tokenizer: Tokenizer) -> None:
    models = pytest.importorskip("finetune.models")
    if not hasattr(models, "build_model"):
        pytest.skip("finetune.models.build_model is not available")
    torch.manual_seed(0)
    model = models.build_model("tiny").eval()
    packed, unpacked = packed_and_unpacked_losses(model, demo_samples, sp_tokenizer.pad_id)
    torch.testing.assert_close(packed, unpacked, rtol=1e-4, atol=1e-4)


def test_build_dataset_packed(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    messages: list[str] = []
    packed = build_dataset(
        str(demo_path("heldout.jsonl")),
        dataset_type="instruct",
        tokenizer=sp_tokenizer,
        max_seq_len=64,
        template="plain",
        packed=True,
        log=messages.append,
    )
    assert isinstance(packed, PackedDataset)
    assert all(len(packed[i]["tokens"]) == 64 for i in range(len(packed)))
    assert messages[1] == (
        f"packed 200 samples into {len(packed)} rows of 64 tokens; packing efficiency "
        f"{packed.efficiency:.1%} (non-pad tokens / all tokens)"
    )
    unpacked = build_dataset(
        str(demo_path("heldout.jsonl")),
        dataset_type="instruct",
        tokenizer=sp_tokenizer,
        max_seq_len=64,
        template="plain",
    )
    real_tokens = sum(len(unpacked[i]["tokens"]) for i in range(len(unpacked)))
    assert packed.efficiency == real_tokens / (64 * len(packed))
    assert packed.efficiency > 0.8  # greedy packing of short samples wastes little
