"""Our decoder and tokenizer behind EleutherAI lm-evaluation-harness's model interface.

`HarnessModel` answers the harness's three request kinds (`loglikelihood`,
`loglikelihood_rolling`, `generate_until`), each batched. lm-eval is optional
(`pip install "finetune[eval]"`): without it the class still imports, on a plain base class,
and the recipe that needs the harness says how to install it.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from finetune.errors import UserError
from finetune.models import TransformerDecoder
from finetune.models.generation import TextStream, generate
from finetune.tokenizers import Tokenizer

try:  # optional: only eleuther_eval needs it, and it says how to install it when missing
    from lm_eval.api.model import LM as _HarnessLM
except ImportError:
    _HarnessLM = object  # type: ignore[assignment,misc]

DEFAULT_MAX_SEQ_LEN = 4096  # rolling perplexity over a 128k context would not fit in memory
_LOGIT_CHUNK = 1024  # positions projected to the vocabulary at once


class HarnessModel(_HarnessLM):
    """A `TransformerDecoder` and its tokenizer as an lm-eval model.

    Every context starts with BOS, as in training. Scoring runs `batch_size` requests per
    forward, longest first so that padding stays small; right padding cannot reach real
    tokens under the causal mask. Generation is greedy unless a task asks for sampling.
    """

    def __init__(
        self,
        model: TransformerDecoder,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 8,
        max_seq_len: Optional[int] = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, model.args.max_seq_len)
        self.max_gen_toks = max_gen_toks
        self.seed = seed

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ----- tokenization -----

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False, add_eos=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (BOS first) and continuation ids, split where the joined text's ids split,
        so the continuation is tokenized as it would be in running text."""
        if not context:
            return [self.tokenizer.bos_id], self._encode(continuation)
        # A context's trailing spaces belong to the continuation's first word.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        return [self.tokenizer.bos_id] + context_ids, whole[len(context_ids) :]

    # ----- the harness's interface -----

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request.args) for request in requests]
        results = self.score(pairs, disable_tqdm=disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        # Late: lm-eval is optional and only installed with finetune[eval].
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            tokens = self._encode(request.args[0])
            # Each token is predicted once; windows after the first keep the most context that fits.
            for window in get_rolling_token_windows(tokens, self.tokenizer.bos_id, self.max_seq_len, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            sampled = bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 1.0)) if sampled else 0.0
            budget = self.max_seq_len - max_new
            if budget < 1:
                raise UserError(
                    f"a task asks for {max_new} new tokens but max_seq_len is {self.max_seq_len}; raise max_seq_len"
                )
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                prompts = [([self.tokenizer.bos_id] + self._encode(requests[i].args[0]))[-budget:] for i in batch]
                texts = self._generate(prompts, max_new, until, temperature)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return [r if r is not None else "" for r in results]

    # ----- computation -----

    @torch.inference_mode()
    def score(
        self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
        for each (context ids, continuation ids) pair. Contexts too long for max_seq_len lose
        their oldest tokens."""
        # An empty continuation is certain: log 1 = 0, and greedy decoding trivially "produces" it.
        results: list[Optional[tuple[float, bool]]] = [None if pair[1] else (0.0, True) for pair in pairs]
        order = sorted(
            (i for i, pair in enumerate(pairs) if pair[1]), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1]))
        )
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=disable_tqdm):
            batch = order[start : start + self.batch_size]
            rows = []
            for i in batch:
                context, continuation = pairs[i]
                if len(continuation) > self.max_seq_len:
                    raise UserError(
                        f"a continuation has {len(continuation)} tokens, more than max_seq_len={self.max_seq_len}; "
                        "raise max_seq_len"
                    )
                rows.append((context + continuation)[-(self.max_seq_len + 1) :][:-1])
            tokens = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                tokens[r, : len(row)] = torch.tensor(row)
            hidden = self.model(tokens.to(self.device), return_hidden=True)
            for r, i in enumerate(batch):
                continuation = pairs[i][1]
                end = len(rows[r])
                target = torch.tensor(continuation, device=self.device)
                logprob, greedy = 0.0, True
                # Only the positions that predict the continuation are projected to the vocabulary.
                predicting = hidden[r, end - len(continuation) : end]
                for h, y in zip(predicting.split(_LOGIT_CHUNK), target.split(_LOGIT_CHUNK)):
                    logprobs = F.log_softmax(self.model.output(h).float(), dim=-1)
                    logprob += logprobs.gather(-1, y[:, None]).sum().item()
                    greedy = greedy and bool((logprobs.argmax(-1) == y).all())
                results[i] = (logprob, greedy)
        return results  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], temperature: float) -> list[str]:
        streams = [TextStream(self.tokenizer.decode, until) for _ in prompts]

        def on_token(row: int, token: int) -> bool:
            streams[row].push(token)
            return streams[row].stopped  # a stop string ends the row early

        generate(
            self.model,
            prompts,
            max_new_tokens=max_new,
            stop_tokens=self.tokenizer.stop_tokens,
            temperature=temperature,
            seed=self.seed,
            pad_id=self.tokenizer.pad_id,
            on_token=on_token,
        )
        return [stream.text for stream in streams]
