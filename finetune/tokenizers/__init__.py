"""Tokenizers for Llama, Mistral, Qwen and Gemma models and their chat formats."""

from finetune.tokenizers.base import Tokenizer
from finetune.tokenizers.hub_tokenizer import HubTokenizer
from finetune.tokenizers.loader import load_tokenizer
from finetune.tokenizers.messages import Message, Role
from finetune.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from finetune.tokenizers.tiktoken_tokenizer import TikTokenTokenizer

__all__ = [
    "HubTokenizer",
    "Message",
    "Role",
    "SentencePieceTokenizer",
    "TikTokenTokenizer",
    "Tokenizer",
    "load_tokenizer",
]
