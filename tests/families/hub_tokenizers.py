"""Hub-snapshot tokenizer folders of the Mistral, Qwen and Gemma kinds, built offline and seeded.

A tiny SentencePiece model (Mistral, Gemma) or a tiny byte-level BPE trained with `tokenizers`
(Qwen) is loaded by transformers' own tokenizer class with the family's chat template and saved
with `save_pretrained`, which writes what a Hub snapshot holds: tokenizer.json,
tokenizer_config.json and the chat template.
"""

import io
import json
from pathlib import Path

import sentencepiece as spm

from tests.tokenizer_fixtures import DEFAULT_TEXTS

TEXTS = DEFAULT_TEXTS + (
    "[INST] <start_of_turn> <|im_start|> tokens as words: im start, end of turn, model.",
    "    indented\n\tand tabbed\n\n\nthree newlines   three spaces",
    "for i in range(10):\n    if i % 2 == 0:\n        yield {'k': i}  # comment",
)

# The families' Hub chat templates, as their tokenizer_config.json files have them (tool calls
# and Qwen 2.5's default system message left out).
CHAT_TEMPLATES = {
    "qwen2": (
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim"
        " + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- set last_user = (loop_messages | selectattr('role', 'equalto', 'user') | list)[-1] %}"
        "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
        "{%- if message is sameas last_user and system_message is defined %}"
        "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] | trim + '[/INST]' }}"
        "{%- else %}{{- '[INST] ' + message['content'] | trim + '[/INST]' }}{%- endif %}"
        "{%- else %}{{- ' ' + message['content'] | trim + eos_token }}{%- endif %}{%- endfor %}"
    ),
    "gemma3": (
        "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' -%}"
        "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
        "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    ),
}
CHAT_TEMPLATES["qwen3"] = CHAT_TEMPLATES["qwen2"]

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _sentencepiece(path: Path, **special) -> None:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS),
        model_writer=out,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **special,
    )
    path.write_bytes(out.getvalue())


def _qwen_tokenizer_json(path: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS, trainer)
    tokenizer.save(str(path))


def make_hub_tokenizer(family: str, root: Path):
    """A snapshot folder for `family` and transformers' tokenizer loaded from it."""
    from transformers import AutoTokenizer

    source, snapshot = root / f"{family}_source", root / f"{family}_snapshot"
    source.mkdir(parents=True, exist_ok=True)
    config: dict = {"chat_template": CHAT_TEMPLATES[family]}
    if family == "mistral":
        _sentencepiece(
            source / "tokenizer.model", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=["[INST]", "[/INST]"]
        )
        config.update(
            tokenizer_class="LlamaTokenizer",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            add_bos_token=True,
            legacy=False,
            extra_special_tokens=["[INST]", "[/INST]"],
        )
    elif family == "gemma3":
        _sentencepiece(
            source / "tokenizer.model",
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            add_dummy_prefix=False,
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        )
        config.update(
            tokenizer_class="GemmaTokenizer",
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            add_bos_token=True,
            extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        )
    else:
        _qwen_tokenizer_json(source / "tokenizer.json")
        config.update(
            tokenizer_class="Qwen2Tokenizer",
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            errors="replace",
            add_prefix_space=False,
        )
    (source / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    AutoTokenizer.from_pretrained(source).save_pretrained(snapshot)
    return snapshot, AutoTokenizer.from_pretrained(snapshot)
