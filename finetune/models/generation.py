"""Autoregressive generation for a `TransformerDecoder`: sampling, batched KV-cached decoding and
incremental detokenization with stop strings.

Prompts of different lengths share a batch by LEFT padding: every row's last prompt token sits
in the same column, so one forward per step extends all rows at once. Each row's rotary
positions start at 0 at its first real token and the attention mask hides its padding, so a
row generates exactly what it would generate alone. `use_cache=False` recomputes the whole
sequence every step; it is slow and exists as the reference the cache is tested against.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from finetune.errors import UserError
from finetune.models.transformer import TransformerDecoder

# on_token(row, token) is called for every token a row generates, its stop token included.
# Returning True ends that row (the recipe uses this for stop strings).
TokenCallback = Callable[[int, int], Optional[bool]]


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick one token per row from logits [b, vocab] -> LongTensor [b].

    temperature == 0 is greedy (argmax). Otherwise the logits are scaled by 1 / temperature,
    cut to the `top_k` most likely tokens and then to the smallest set whose probability
    reaches `top_p` (the most likely token always survives), and sampled with `generator`.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be 0 (greedy) or positive")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the more likely ones already reach top_p on their own.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_prompt_lengths(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int) -> None:
    """UserError when a prompt is empty or a prompt plus `max_new_tokens` exceeds the context."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {i} has no tokens; give every prompt some text")
        if len(prompt) + max_new_tokens > max_seq_len:
            raise UserError(
                f"prompt {i} has {len(prompt)} tokens and max_new_tokens={max_new_tokens}, "
                f"{len(prompt) + max_new_tokens} in all, more than the model's context of {max_seq_len} tokens; "
                "shorten the prompt or lower max_new_tokens"
            )


def left_padded(
    prompts: Sequence[Sequence[int]], total_len: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token buffer [b, total_len] with each prompt right-aligned at the longest prompt's end,
    and the number of padding tokens in front of each row [b]."""
    prompt_len = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), total_len), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) : prompt_len] = torch.tensor(list(prompt), dtype=torch.long)
    pad_counts = torch.tensor([prompt_len - len(p) for p in prompts], dtype=torch.long, device=device)
    return tokens, pad_counts


def padded_causal_mask(pad_counts: torch.Tensor, total_len: int) -> torch.Tensor:
    """[b, total_len, total_len] bool, True = may attend: causal, and never onto a row's padding.

    A padding position attends to itself only. Its output is never used, but depending on the
    attention kernel a query that may attend to nothing gives NaN, and NaN in the cached values
    of a hidden position would still poison real rows (0 * NaN is NaN in the attention product).
    """
    index = torch.arange(total_len, device=pad_counts.device)
    causal = index[None, :] <= index[:, None]
    real_key = index[None, None, :] >= pad_counts[:, None, None]
    itself = torch.eye(total_len, dtype=torch.bool, device=pad_counts.device)
    return causal[None] & (real_key | itself[None])


@torch.inference_mode()
def generate(
    model: TransformerDecoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    pad_id: int,
    use_cache: bool = True,
    on_token: Optional[TokenCallback] = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    Returns the new tokens of each row, ending with the stop token when one was generated.
    Rows stop independently; the loop ends when every row has stopped. Sampling draws from a
    generator seeded with `seed` (None = nondeterministic), so the same seed and batch give the
    same tokens. The model should be in eval mode; any KV cache it had is removed afterwards.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if not prompts:
        return []
    check_prompt_lengths(prompts, max_new_tokens, model.args.max_seq_len)
    device = model.tok_embeddings.weight.device
    batch = len(prompts)
    prompt_len = max(len(p) for p in prompts)
    total_len = prompt_len + max_new_tokens
    tokens, pad_counts = left_padded(prompts, total_len, pad_id, device)
    positions = (torch.arange(total_len, device=device)[None, :] - pad_counts[:, None]).clamp(min=0)
    mask = padded_causal_mask(pad_counts, total_len)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    stop = set(int(t) for t in stop_tokens)

    def next_logits(start: int, end: int) -> torch.Tensor:
        """Logits at column end - 1, after feeding columns [start, end)."""
        hidden = model(
            tokens[:, start:end],
            position_ids=positions[:, start:end],
            mask=mask[:, start:end, : total_len if use_cache else end],
            input_pos=torch.arange(start, end, device=device) if use_cache else None,
            return_hidden=True,
        )
        # Only the last position is sampled from: skip the vocabulary projection of the rest.
        return model.output(hidden[:, -1])

    outputs: list[list[int]] = [[] for _ in range(batch)]
    active = [True] * batch
    model.remove_caches()  # caches sized for another call would not fit this batch
    if use_cache:
        model.setup_caches(batch, total_len)
    try:
        logits = next_logits(0, prompt_len)
        for column in range(prompt_len, total_len):
            chosen = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            # Finished rows keep decoding padding, which no other row can see.
            finished = torch.tensor([not a for a in active], device=device)
            tokens[:, column] = chosen.masked_fill(finished, pad_id)
            for row, token in enumerate(chosen.tolist()):
                if not active[row]:
                    continue
                outputs[row].append(token)
                ended_by_caller = on_token(row, token) if on_token is not None else False
                if token in stop or ended_by_caller:
                    active[row] = False
            if not any(active) or column + 1 == total_len:
                break
            logits = next_logits(column, column + 1) if use_cache else next_logits(0, column + 1)
    finally:
        if use_cache:
            model.remove_caches()
    return outputs


class TextStream:
    """Turns one row's tokens into text as they arrive, and watches for stop strings.

    The whole sequence is decoded each time, because SentencePiece writes a piece's leading
    space only in context. Text that may still change is held back: a trailing replacement
    character (a multi-byte character cut in half) and a tail that could begin a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        cut = self._first_stop_string()
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._emit(len(self.text))
        return self._emit(self._safe_end())

    def flush(self) -> str:
        """The rest of the text once generation is over."""
        return self._emit(len(self.text))

    def _first_stop_string(self) -> Optional[int]:
        found = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
        return min(found) if found else None

    def _safe_end(self) -> int:
        text = self.text.rstrip("\ufffd")
        held = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return max(len(text) - held, self.emitted)

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        new = self.text[self.emitted : end]
        self.emitted = end
        return new
