"""Pick and build the right tokenizer for a `tokenizer.model` / `tokenizer.json` file or checkpoint directory."""

from pathlib import Path
from typing import Optional, Union

from finetune.errors import UserError
from finetune.tokenizers.base import Tokenizer
from finetune.tokenizers.chat_formats import CHAT_FORMATS
from finetune.tokenizers.hub_tokenizer import HubTokenizer
from finetune.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer, parse_model
from finetune.tokenizers.tiktoken_tokenizer import TikTokenTokenizer, is_ranks_file
from finetune.tokenizers.tokenizer_json import is_json, read_tokenizer_json_ranks

FAMILIES = ("llama2", "llama3")
_KIND = {
    "llama2": "a SentencePiece model (Llama 2)",
    "llama3": "a tiktoken ranks file (Llama 3)",
}
# Where checkpoint directories keep the tokenizer; Hugging Face Llama 3 repos put Meta's
# file under original/, and some ship only the fast tokenizer's tokenizer.json.
_CANDIDATES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json")


def normalize_family(family: str) -> str:
    """Map a family or model name ("llama3_1_8b", "Llama-3.2") to "llama2" or "llama3"."""
    key = family.lower().replace("-", "").replace("_", "").replace(".", "")
    for name in FAMILIES:
        if key.startswith(name):
            return name
    raise UserError(f"unknown tokenizer family {family!r}; use one of {', '.join(FAMILIES)}")


def resolve_tokenizer_path(path: Union[str, Path], family: Optional[str] = None) -> Path:
    """The tokenizer file itself, looking inside `path` when it is a directory (for the Mistral,
    Qwen and Gemma families: its tokenizer.json)."""
    path = Path(path).expanduser()
    if path.is_dir() and family in CHAT_FORMATS:
        if (path / "tokenizer.json").is_file():
            return path / "tokenizer.json"
        raise UserError(
            f"no tokenizer.json in directory {path}; a {family} model reads the tokenizer.json and "
            "tokenizer_config.json of its Hub snapshot, point the tokenizer path at them"
        )
    if path.is_dir():
        for name in _CANDIDATES:
            if (path / name).is_file():
                return path / name
        raise UserError(
            f"no tokenizer.model or tokenizer.json in directory {path}; point the tokenizer path at the "
            "tokenizer file of the checkpoint"
        )
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist; check the tokenizer path in your config")
    return path


def detect_family(path: Path, data: bytes) -> str:
    """ "llama3" for a tiktoken ranks file, "llama2" for a SentencePiece model.

    SentencePiece files are binary protobuf with no magic number, so the tiktoken text
    format is recognised first and SentencePiece itself judges the rest.
    """
    if is_ranks_file(data):
        return "llama3"
    if parse_model(data) is not None:
        return "llama2"
    raise UserError(
        f"{path} is neither {_KIND['llama2']} nor {_KIND['llama3']}; point the tokenizer "
        "path at the tokenizer.model that ships with the checkpoint"
    )


def load_tokenizer(path: Union[str, Path], family: Optional[str] = None) -> Tokenizer:
    """Load a Llama 2 (SentencePiece) or Llama 3 (tiktoken) tokenizer from a file or a
    checkpoint directory.

    The kind is read from the file's content. Given `family` (or a model name starting with
    it), a file of the other kind is refused with a message naming both, rather than
    training with the wrong vocabulary.
    """
    file = resolve_tokenizer_path(path)
    data = file.read_bytes()
    ranks = read_tokenizer_json_ranks(file, data) if is_json(data) else None
    kind = "llama3" if ranks is not None else detect_family(file, data)
    if family is not None:
        wanted = normalize_family(family)
        if wanted != kind:
            raise UserError(
                f"{file} is {_KIND[kind]} but a {wanted} model needs {_KIND[wanted]}; use "
                f"the tokenizer.model that ships with the {wanted} checkpoint"
            )
    if kind == "llama3":
        return TikTokenTokenizer(file, data=data, ranks=ranks)
    return SentencePieceTokenizer(file, data=data)


def load_tokenizer_for_model(path: Union[str, Path], family: str, vocab_size: int) -> Tokenizer:
    """The tokenizer at `path`, checked against the model it will feed.

    A Llama model's family is inferred from its vocabulary size, and only Llama 3's 128k vocabulary
    pins it down: small custom models may pair with either tokenizer kind. The other families read
    their Hub snapshot's tokenizer.json. Any tokenizer must fit the model's vocabulary, though.
    """
    if family in CHAT_FORMATS:
        tokenizer: Tokenizer = HubTokenizer(resolve_tokenizer_path(path, family), family)
    else:
        tokenizer = load_tokenizer(path, family=family if family == "llama3" else None)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model only {vocab_size}; "
            "use the tokenizer that ships with the checkpoint"
        )
    return tokenizer
