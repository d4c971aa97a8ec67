"""Tokenizers for Llama-family models and their chat formats."""

from finetune.tokenizers.base import Tokenizer
from finetune.tokenizers.loader import load_tokenizer
from finetune.tokenizers.messages import Message, Role
from finetune.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from finetune.tokenizers.tiktoken_tokenizer import TikTokenTokenizer

__all__ = [
    "Message",
    "Role",
    "SentencePieceTokenizer",
    "TikTokenTokenizer",
    "Tokenizer",
    "load_tokenizer",
]
