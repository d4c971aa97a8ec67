"""finetune: native-PyTorch fine-tuning for Llama-family language models."""

__version__ = "0.1.0"
