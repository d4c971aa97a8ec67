"""What the benchmark trains and how each library is told to train it: model shapes, the
tokenizer, the synthetic data, the random weights, the per-sample token counts each library's own
dataset code sees, and the two recipe configs. Used by bench_finetune.py."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from finetune.models import ModelArgs, build_model, model_args  # noqa: E402

DEMO_TOKENIZER = REPO_ROOT / "finetune" / "data" / "demo" / "tokenizer.model"
SEED = 1234


# ----------------------------------------------------------------------------------------------
# What is trained
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: its architecture and how torchtune builds the same one."""

    name: str
    args: ModelArgs
    tokenizer: str  # "demo", "sentencepiece32k" or "tiktoken_bytes"
    torchtune_builder: Optional[str]  # a named torchtune builder, or None for the generic llama2()
    torchtune_model_type: str


def model_spec(name: str) -> ModelSpec:
    if name == "tiny":
        return ModelSpec(name, model_args("tiny"), "demo", None, "LLAMA2")
    if name == "100m":
        args = ModelArgs(
            vocab_size=32_000,
            dim=768,
            n_layers=12,
            n_heads=12,
            n_kv_heads=12,
            hidden_dim=2048,
            max_seq_len=4096,
            family="llama2",
        )
        return ModelSpec(name, args, "sentencepiece32k", None, "LLAMA2")
    if name == "llama3_2_1b":
        return ModelSpec(name, model_args(name), "tiktoken_bytes", "torchtune.models.llama3_2.llama3_2_1b", "LLAMA3_2")
    if name == "llama3_1_8b":
        return ModelSpec(name, model_args(name), "tiktoken_bytes", "torchtune.models.llama3_1.llama3_1_8b", "LLAMA3")
    raise SystemExit(f"error: unknown --model {name!r}; use tiny, 100m, llama3_2_1b or llama3_1_8b")


@dataclass(frozen=True)
class LoraSpec:
    """The adapter settings both libraries get (our LoraFinetuneParams defaults)."""

    modules: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    mlp: bool = False
    output: bool = False


@dataclass(frozen=True)
class RunConfig:
    """One benchmark cell: everything that must be equal between the libraries."""

    spec: ModelSpec
    method: str
    batch_size: int
    seq_len: int
    warmup_steps: int
    timed_steps: int
    device: str
    dtype: str
    lora: LoraSpec = LoraSpec()
    activation_checkpointing: bool = False
    data: str = "uniform"  # "uniform" (every sample seq_len tokens, all trained) or "instruct"
    compile: bool = False  # torch.compile in both (each library compiles its own way: per layer, and its loss)

    @property
    def is_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def total_steps(self) -> int:
        # One extra untimed step after the timed ones: memory is read while it runs.
        return self.warmup_steps + self.timed_steps + 1

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def lr(self) -> float:
        return 3e-4 if self.is_lora else 2e-5


# ----------------------------------------------------------------------------------------------
# Inputs: tokenizer, data, weights
# ----------------------------------------------------------------------------------------------

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def synthetic_words(rng: random.Random, count: int) -> list[str]:
    """Pronounceable made-up words, so a BPE tokenizer has plenty of distinct text to merge."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    syllables += [c + v + e for c in _CONSONANTS[:8] for v in _VOWELS for e in "nrst"]
    return ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(count)]


def zipf_sampler(rng: random.Random, words: list[str]) -> Callable[[int], list[str]]:
    """Draw words with Zipf-like frequencies (cumulative weights computed once: much faster)."""
    cumulative, total = [], 0.0
    for rank in range(len(words)):
        total += 1.0 / (rank + 1)
        cumulative.append(total)
    return lambda k: rng.choices(words, cum_weights=cumulative, k=k)


def train_sentencepiece(path: Path, vocab_size: int, seed: int) -> None:
    """A Llama 2-style BPE model (byte fallback, <unk>=0, <s>=1, </s>=2, no pad) on synthetic text."""
    import sentencepiece as spm

    rng = random.Random(seed)
    draw = zipf_sampler(rng, synthetic_words(rng, 80_000))
    lines = [" ".join(draw(20)) for _ in range(40_000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    path.write_bytes(model.getvalue())


def write_byte_tiktoken(path: Path) -> None:
    """A valid Llama 3-format ranks file holding the 256 single bytes plus letter pairs.

    Llama 3 shapes need a tiktoken tokenizer; the real 128k ranks are not needed to measure speed
    (the model's vocabulary is still 128256), and every multi-byte token here is reachable by a
    merge of two lower-ranked ones.
    """
    tokens = [bytes([b]) for b in range(256)]
    letters = [bytes([c]) for c in b" abcdefghijklmnopqrstuvwxyz"]
    tokens += [a + b for a in letters for b in letters]
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    path.write_text("\n".join(lines) + "\n")


def prepare_tokenizer(spec: ModelSpec, work: Path) -> Path:
    path = work / "tokenizer.model"
    if path.exists():
        return path
    if spec.tokenizer == "demo":
        path.write_bytes(DEMO_TOKENIZER.read_bytes())
    elif spec.tokenizer == "sentencepiece32k":
        train_sentencepiece(path, spec.args.vocab_size, SEED)
    else:
        write_byte_tiktoken(path)
    return path


def write_dataset(path: Path, num_records: int, seq_len: int, seed: int, kind: str) -> None:
    """Alpaca records. "uniform": the response has `seq_len` words (at least one token per word in
    any tokenizer), so every sample is truncated to exactly `seq_len` tokens. "instruct": lengths
    vary as in instruction data (an instruction of 5-40 words, an input of 5-80 words on half the
    records, a response of 8 to seq_len words), so batches hold prompts and padding."""
    rng = random.Random(seed)
    draw = zipf_sampler(rng, synthetic_words(rng, 20_000))
    with path.open("w") as f:
        for i in range(num_records):
            if kind == "uniform":
                record = {
                    "instruction": f"Continue the story number {i}.",
                    "input": "",
                    "output": " ".join(draw(seq_len)),
                }
            else:
                record = {
                    "instruction": " ".join(draw(rng.randint(5, 40))),
                    "input": " ".join(draw(rng.randint(5, 80))) if rng.random() < 0.5 else "",
                    "output": " ".join(draw(rng.randint(8, seq_len))),
                }
            f.write(json.dumps(record) + "\n")


def write_checkpoint(spec: ModelSpec, tokenizer: Path, out_dir: Path, dtype: torch.dtype, device: str) -> list[str]:
    """Seeded random weights in HF format; returns the safetensors file names. Initialised on the
    benchmark's device (an 8B model initialises in seconds on a GPU, minutes on CPU)."""
    from finetune.checkpointing import save_hf_checkpoint

    if not (out_dir / "config.json").exists():
        torch.manual_seed(SEED)
        model = build_model(spec.args, dtype=dtype, device=device)
        state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
        del model
        save_hf_checkpoint(state, spec.args, out_dir, tokenizer_files=[tokenizer])
        del state
    return sorted(p.name for p in out_dir.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------
# Checking the token count each library sees
# ----------------------------------------------------------------------------------------------


def check_our_dataset(cfg: RunConfig, data: Path, tokenizer: Path) -> list[int]:
    """Tokenize with our dataset code; return each sample's token count (its non-pad tokens)."""
    from finetune.data import build_dataset
    from finetune.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer, family=cfg.spec.args.family)
    dataset = build_dataset(
        str(data),
        dataset_type="instruct",
        tokenizer=tok,
        max_seq_len=cfg.seq_len,
        template="alpaca",
        train_on_input=cfg.data == "uniform",
    )
    samples = [dataset[i] for i in range(len(dataset))]
    lengths = [len(sample["tokens"]) for sample in samples]
    if cfg.data == "uniform" and set(lengths) != {cfg.seq_len}:
        raise SystemExit(f"error: our samples have lengths {sorted(set(lengths))}, expected all {cfg.seq_len}")
    if any(t == tok.pad_id for sample in samples for t in sample["tokens"][1:]):
        print("note: a sample contains the pad id as a real token; our non-pad count would be off", file=sys.stderr)
    return lengths


_TORCHTUNE_CHECK = """
import json, sys
from torchtune import config
from omegaconf import OmegaConf
cfg = OmegaConf.load(sys.argv[1])
tokenizer = config.instantiate(cfg.tokenizer)
dataset = config.instantiate(cfg.dataset, tokenizer)
lengths, trained = [], []
for sample in dataset:
    lengths.append(len(sample["tokens"]))
    # The recipe shifts labels left by one and appends the ignore index.
    trained.append(sum(1 for label in sample["labels"][1:] if label != -100))
print(json.dumps({"lengths": lengths, "trained": trained}))
"""


def check_torchtune_dataset(
    cfg: RunConfig, python: str, config_path: Path, env: dict[str, str]
) -> tuple[list[int], list[int]]:
    """Tokenize with torchtune's own dataset; return each sample's token count (non-pad tokens)
    and trained labels (what its log divides by)."""
    out = subprocess.run(
        [python, "-c", _TORCHTUNE_CHECK, str(config_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"error: torchtune dataset check failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if cfg.data == "uniform" and set(result["lengths"]) != {cfg.seq_len}:
        raise SystemExit(f"error: torchtune samples are not all {cfg.seq_len} tokens: {sorted(set(result['lengths']))}")
    return result["lengths"], result["trained"]


# ----------------------------------------------------------------------------------------------
# Configs for each library
# ----------------------------------------------------------------------------------------------


def our_config(cfg: RunConfig, ckpt: Path, tokenizer: Path, data: Path, out: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": "auto",
        "checkpoint_dir": str(ckpt),
        "tokenizer_path": str(tokenizer),
        "dataset": str(data),
        "dataset_type": "instruct",
        "template": "alpaca",
        "train_on_input": cfg.data == "uniform",
        "max_seq_len": cfg.seq_len,
        "packed": False,
        "shuffle": False,
        "batch_size": cfg.batch_size,
        "epochs": 1,
        "max_steps_per_epoch": cfg.total_steps,
        "gradient_accumulation_steps": 1,
        "optimizer": "adamw",
        "lr": cfg.lr,
        "weight_decay": 0.01,
        "lr_scheduler": "cosine",
        "warmup_steps": 0,
        "clip_grad_norm": 1.0,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "enable_activation_checkpointing": cfg.activation_checkpointing,
        "enable_activation_offloading": False,
        # loss_chunks is left at our default (auto), as torchtune keeps its configs' 8 chunks.
        "compile": cfg.compile,
        "output_dir": str(out),
        "log_every_n_steps": 1,
    }
    if cfg.is_lora:
        config.update(
            lora_attn_modules=list(cfg.lora.modules),
            apply_lora_to_mlp=cfg.lora.mlp,
            apply_lora_to_output=cfg.lora.output,
            lora_rank=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=0.0,
            quantize_base=cfg.method == "qlora",
        )
    return config


def torchtune_model(cfg: RunConfig) -> dict[str, Any]:
    spec, a = cfg.spec, cfg.spec.args
    lora = cfg.is_lora
    prefix = {"full": "", "lora": "lora_", "qlora": "qlora_"}[cfg.method]
    if spec.torchtune_builder is not None:
        module, _, fn = spec.torchtune_builder.rpartition(".")
        model: dict[str, Any] = {"_component_": f"{module}.{prefix}{fn}"}
    else:
        model = {
            # The generic builder has no qlora_ variant: its LoRA builder takes quantize_base.
            "_component_": f"torchtune.models.llama2.{'lora_' if lora else ''}llama2",
            "vocab_size": a.vocab_size,
            "num_layers": a.n_layers,
            "num_heads": a.n_heads,
            "num_kv_heads": a.n_kv_heads,
            "embed_dim": a.dim,
            "max_seq_len": a.max_seq_len,
            "intermediate_dim": a.hidden_dim,
            "norm_eps": a.norm_eps,
        }
        if not lora:
            model["rope_base"] = a.rope_theta
        if cfg.method == "qlora":
            model["quantize_base"] = True
    if lora:
        model.update(
            lora_attn_modules=list(cfg.lora.modules),
            apply_lora_to_mlp=cfg.lora.mlp,
            apply_lora_to_output=cfg.lora.output,
            lora_rank=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=0.0,
        )
    return model


def torchtune_config(
    cfg: RunConfig, ckpt: Path, files: list[str], tokenizer: Path, data: Path, out: Path
) -> dict[str, Any]:
    if cfg.spec.tokenizer == "tiktoken_bytes":
        tok: dict[str, Any] = {"_component_": "torchtune.models.llama3.llama3_tokenizer"}
    else:
        tok = {"_component_": "torchtune.models.llama2.llama2_tokenizer"}
    tok.update(path=str(tokenizer), max_seq_len=cfg.seq_len, prompt_template=None)
    on_gpu = cfg.device == "cuda"
    config: dict[str, Any] = {
        "output_dir": str(out),
        "tokenizer": tok,
        "dataset": {
            "_component_": "torchtune.datasets.alpaca_dataset",
            "source": "json",
            "data_files": str(data),
            "split": "train",
            "train_on_input": cfg.data == "uniform",
            "packed": False,
        },
        "seed": 42,
        "shuffle": False,
        "model": torchtune_model(cfg),
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(ckpt),
            "checkpoint_files": files,
            "recipe_checkpoint": None,
            "output_dir": str(out / "checkpoints"),
            "model_type": cfg.spec.torchtune_model_type,
        },
        "resume_from_checkpoint": False,
        "batch_size": cfg.batch_size,
        "epochs": 1,
        "max_steps_per_epoch": cfg.total_steps,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "_component_": "torch.optim.AdamW",
            "lr": cfg.lr,
            "weight_decay": 0.01,
            **({"fused": True} if on_gpu else {"foreach": True}),
        },
        "lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
            "num_warmup_steps": 0,
        },
        "optimizer_in_bwd": False,
        "clip_grad_norm": 1.0,
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss", "num_output_chunks": 8},
        "compile": cfg.compile,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "enable_activation_checkpointing": cfg.activation_checkpointing,
        "enable_activation_offloading": False,
        "metric_logger": {
            "_component_": "torchtune.training.metric_logging.DiskLogger",
            "log_dir": str(out / "logs"),
            "filename": "log.txt",
        },
        "log_every_n_steps": 1,
        "log_peak_memory_stats": on_gpu,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }
    if cfg.is_lora:
        # Ours writes the adapter and the merged model; so does torchtune with this off.
        config["save_adapter_weights_only"] = False
    return config


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
