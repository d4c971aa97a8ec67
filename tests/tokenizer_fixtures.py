"""Small real tokenizer files built offline, for tests that need a Llama 2 or Llama 3 tokenizer.

    from tests.tokenizer_fixtures import train_sentencepiece, write_llama3_ranks
    tok = load_tokenizer(write_llama3_ranks(tmp_path / "tokenizer.model"))

Both builders are deterministic and cache the trained model in memory, so repeated calls
cost only a file write. Passing a directory writes `tokenizer.model` inside it.
"""

import base64
import collections
import functools
import io
from pathlib import Path
from typing import Optional, Sequence, Union

import regex
import sentencepiece as spm

from finetune.tokenizers.tiktoken_tokenizer import LLAMA3_PATTERN

DEFAULT_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "You are a helpful assistant. Answer the user's question briefly.",
    "The user asks a question and the assistant gives an answer.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea, the sky and the wind.",
    "Fine-tuning a language model on your own data makes it follow instructions.",
    "Numbers like 12345, 2024 and 3.14159 appear in text too.",
    "Grüße aus Köln: café, naïve, résumé, déjà vu, Zürich.",
    "Русский текст и 中文文本 and ελληνικά appear in the data.",
    "def main():\n    print('hello world')\n    return 0\n",
    "system user assistant ipython tool call result",
    "She said: \"it's done, we're ready, they'll come, I'd go, you've won.\"",
    "Lists:\n- one\n- two\n- three\n\nTables | have | pipes |",
)


def _target(path: Union[str, Path]) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=8)
def _sentencepiece_bytes(texts: tuple[str, ...], vocab_size: int) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        # Normalisation as in Llama 2's own model: text is kept verbatim.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def train_sentencepiece(path: Union[str, Path], texts: Optional[Sequence[str]] = None, vocab_size: int = 512) -> Path:
    """Train a Llama 2-style SentencePiece BPE model (byte fallback, <unk>=0 <s>=1 </s>=2,
    no pad) and write it to `path`. Returns the file written."""
    path = _target(path)
    corpus = tuple(texts) if texts is not None else DEFAULT_TEXTS
    path.write_bytes(_sentencepiece_bytes(corpus, vocab_size))
    return path


def _merge(parts: list[bytes], pair: tuple[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            out.append(parts[i] + parts[i + 1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


@functools.lru_cache(maxsize=8)
def learn_bpe_ranks(texts: tuple[str, ...], vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE over Llama 3's pre-tokenized words: all 256 bytes, then merges.

    Ties between equally frequent pairs go to the smaller pair, so the result depends only
    on the corpus. Stops early when the corpus has nothing left to merge.
    """
    ranks = {bytes([b]): b for b in range(256)}
    counts = collections.Counter(w for t in texts for w in regex.findall(LLAMA3_PATTERN, t))
    words = [([bytes([b]) for b in w.encode("utf-8")], n) for w, n in counts.items()]
    while len(ranks) < vocab_size:
        pairs: collections.Counter = collections.Counter()
        for parts, n in words:
            for pair in zip(parts, parts[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        ranks.setdefault(best[0] + best[1], len(ranks))
        words = [(_merge(parts, best), n) for parts, n in words]
    return ranks


def write_llama3_ranks(path: Union[str, Path], texts: Optional[Sequence[str]] = None, vocab_size: int = 512) -> Path:
    """Write a Llama 3-format ranks file (`<base64 token> <rank>` per line) with at most
    `vocab_size` base tokens learned on `texts`. Returns the file written.

    The special tokens follow the base ranks, so `<|begin_of_text|>` gets id `vocab_size`
    (when the corpus yields that many merges) instead of 128000.
    """
    path = _target(path)
    corpus = tuple(texts) if texts is not None else DEFAULT_TEXTS
    ranks = learn_bpe_ranks(corpus, vocab_size)
    lines = (
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    )
    path.write_text("".join(lines))
    return path


# Llama 3 Instruct's chat template, without the 3.1 date/tool preamble.
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def save_llama3_fast_tokenizer(ranks_path: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Save the Hugging Face fast tokenizer of a Llama 3 ranks file into `out_dir`, as a Hub
    checkpoint ships it (tokenizer.json, tokenizer_config.json, chat template). Needs transformers."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from finetune.tokenizers.tiktoken_tokenizer import SPECIAL_TOKENS

    backend = TikTokenConverter(vocab_file=str(ranks_path), pattern=LLAMA3_PATTERN).converted()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return Path(out_dir)
