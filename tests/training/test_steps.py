"""loss_sum: skipping the positions after each row's last trained label changes nothing."""

import pytest
import torch

from finetune.models import ModelArgs, build_model
from finetune.models.transformer import LivePositions, live_positions
from finetune.training import steps


def _padded_batch(lengths: list[int], seq_len: int = 16, prompt: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 96, (len(lengths), seq_len), generator=generator)
    labels = tokens.roll(-1, dims=1)
    for row, length in enumerate(lengths):
        tokens[row, length:] = 0
        labels[row, length - 1 :] = -100
        labels[row, :prompt] = -100
    return {"tokens": tokens, "labels": labels}


@pytest.mark.parametrize("use_lora", [False, True])
def test_skipping_dead_positions_keeps_the_loss_and_gradients(monkeypatch, use_lora):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    model = build_model(args)
    if use_lora:
        from finetune.models.lora import apply_lora, set_trainable_params

        apply_lora(model, attn_modules=["q_proj", "v_proj"], mlp=True, output=False, rank=4, alpha=8)
        for module in model.modules():
            if hasattr(module, "lora_b"):
                torch.nn.init.normal_(module.lora_b.weight, std=0.02)  # not a no-op adapter
        set_trainable_params(model)
    batch = _padded_batch([16, 9, 12, 5])
    assert steps.worth_skipping(live_positions(batch["labels"]))

    def loss_and_grads(min_share: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(steps, "MIN_SKIPPED_SHARE", min_share)
        model.zero_grad(set_to_none=True)
        loss = steps.loss_sum(model, batch, loss_chunks=0)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    every_position, every_grads = loss_and_grads(2.0)  # never worth it: the padded computation
    live_only, live_grads = loss_and_grads(0.0)
    torch.testing.assert_close(live_only, every_position, rtol=1e-6, atol=1e-5)
    assert len(live_grads) == len(every_grads) > 0
    for got, want in zip(live_grads, every_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_few_dead_positions_are_not_worth_the_gathering():
    # 64 positions: skipping 1 (under 1/32) is not worth the per-layer gather and scatter, 2 is.
    assert not steps.worth_skipping(LivePositions(torch.arange(63), 4, 16))
    assert steps.worth_skipping(LivePositions(torch.arange(62), 4, 16))
    # A full batch of 64-token rows: only each row's final position (no label) is dead, 1/64.
    assert not steps.worth_skipping(live_positions(_padded_batch([64] * 4, seq_len=64, prompt=0)["labels"]))
