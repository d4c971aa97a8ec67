"""Throughput, peak memory and MFU of our fine-tuning recipes, side by side with torchtune.

    python benchmarks/bench_finetune.py --model 100m --method full --batch-size 2 --seq-len 256 \
        --steps 4 --warmup-steps 1 --repeats 3 --torchtune-python .venv-torchtune/bin/python \
        --docs docs/benchmarks.md

What is compared
    Both libraries train the same model from the same random weights (written once as a Hugging
    Face safetensors checkpoint and read by each library's own HF loader), on the same synthetic
    alpaca-format file, with the same batch size, sequence length, dtype, optimizer (torch AdamW,
    foreach implementation, weight decay 0.01), gradient clipping at 1.0, a cosine schedule without warm-up,
    a chunked cross-entropy in 8 chunks, no compile, no activation checkpointing, no shuffling.
    Each run is a fresh process running the library's stock recipe (ours: `full_finetune` /
    `lora_finetune`; torchtune: `full_finetune_single_device` / `lora_finetune_single_device`),
    and the libraries alternate (ours, torchtune, ours, torchtune, ...) so that slow phases of a
    shared machine hit both alike. Results are medians over the repeats.

How tokens are counted (the same for both)
    Every record's response is longer than the sequence length, so every sample of both
    libraries is truncated to exactly `seq_len` tokens: a step processes `batch_size x seq_len`
    tokens, none of them padding. The benchmark checks this before timing by tokenizing the file
    with each library's own dataset code (ours in this process, torchtune's in its venv).
    Throughput is `batch_size x seq_len x timed steps / sum of timed step times`.

How steps are timed
    From each library's own per-step log, not from process wall time, so that start-up (imports,
    tokenizing, loading weights) and the final checkpoint write are excluded. Both libraries time
    a step the same way: a perf_counter from before the batch is fetched from the DataLoader to
    after the optimizer step, logging excluded. Both log tokens/s rather than seconds, each with
    its own token count, so the benchmark turns it back into seconds with that library's count:
    ours divides non-pad tokens (= batch x seq_len here), torchtune divides trained labels
    (= batch x (seq_len - 1) here: labels are shifted, the last position of a sample has none;
    the dataset check confirms the number). The first `--warmup-steps` steps are excluded
    (allocator warm-up, first-touch page faults, lazy init); one untimed step follows the timed
    ones so the memory reading below cannot overlap the checkpoint write.

How memory is measured
    CPU: the training process's peak resident set (VmHWM in /proc/<pid>/status), read by the
    benchmark the moment the last timed step appears in the log, so it covers loading and the
    timed steps but not the final checkpoint save; the whole-process peak (ru_maxrss from wait4,
    save included) is recorded too. GPU: each library's own logged `torch.cuda.max_memory_allocated`,
    the largest over the timed steps (torchtune resets it every step, ours keeps a running max).

MFU
    model FLOPs per token / measured peak matmul rate, with
        full:  6 x N + 12 x n_layers x dim x seq_len
        LoRA:  4 x N + 6 x N_adapter + 12 x n_layers x dim x seq_len
    where N is the parameter count of every matmul weight (attention, MLP and output head; the
    embedding table is a lookup, norms are negligible), 6 = 2 forward + 2 input-gradient + 2
    weight-gradient FLOPs per weight (frozen LoRA base weights skip the weight gradient), and the
    last term is attention's QK^T and AV matmuls, forward and backward, counted without the causal
    saving (PaLM's convention). The peak is the best of several square matmuls of the training
    dtype run by this process with the same thread count the recipes get, measured before and
    after the runs; the better of the two counts (other jobs on a shared machine depress one).

Model sizes: `tiny` (our registry's 3.4M-parameter test model with the 512-piece demo tokenizer),
`100m` (dim 768, 12 layers, 12 heads, SwiGLU 2048, vocab 32000 with a 32000-piece SentencePiece
BPE tokenizer trained here on the synthetic text: 134M parameters, 85M outside the embedding and
output head), and on GPU the shapes of `llama3_2_1b` and `llama3_1_8b` with a byte-level tiktoken
file (random weights; tokenization quality does not matter for speed).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import io
import json
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from finetune.models import ModelArgs, build_model, model_args  # noqa: E402

DEMO_TOKENIZER = REPO_ROOT / "finetune" / "data" / "demo" / "tokenizer.model"
LIBRARIES = ("ours", "torchtune")
POLL_S = 0.2  # the untimed tail step lasts far longer than this
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
            vocab_size=32_000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048,
            max_seq_len=4096, family="llama2",
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
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, num_threads=1,
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


def write_dataset(path: Path, num_records: int, seq_len: int, seed: int) -> None:
    """Alpaca records whose response has `seq_len` words: at least one token per word in any
    tokenizer, so every sample is truncated to exactly `seq_len` tokens."""
    rng = random.Random(seed)
    draw = zipf_sampler(rng, synthetic_words(rng, 20_000))
    with path.open("w") as f:
        for i in range(num_records):
            record = {"instruction": f"Continue the story number {i}.", "input": "", "output": " ".join(draw(seq_len))}
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


def check_our_dataset(cfg: RunConfig, data: Path, tokenizer: Path) -> None:
    from finetune.data import build_dataset
    from finetune.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer, family=cfg.spec.args.family)
    dataset = build_dataset(
        str(data), dataset_type="instruct", tokenizer=tok, max_seq_len=cfg.seq_len, template="alpaca",
        train_on_input=True,
    )
    lengths = {len(dataset[i]["tokens"]) for i in range(len(dataset))}
    pad = {int(t == tok.pad_id) for i in range(len(dataset)) for t in dataset[i]["tokens"][1:]}
    if lengths != {cfg.seq_len}:
        raise SystemExit(f"error: our samples have lengths {sorted(lengths)}, expected all {cfg.seq_len}")
    if 1 in pad:
        print("note: a sample contains the pad id as a real token; our non-pad count would be off", file=sys.stderr)


_TORCHTUNE_CHECK = """
import json, sys
from torchtune import config
from omegaconf import OmegaConf
cfg = OmegaConf.load(sys.argv[1])
tokenizer = config.instantiate(cfg.tokenizer)
dataset = config.instantiate(cfg.dataset, tokenizer)
lengths, trained = set(), set()
for sample in dataset:
    lengths.add(len(sample["tokens"]))
    # The recipe shifts labels left by one and appends the ignore index.
    trained.add(sum(1 for label in sample["labels"][1:] if label != -100))
print(json.dumps({"lengths": sorted(lengths), "trained": sorted(trained)}))
"""


def check_torchtune_dataset(cfg: RunConfig, python: str, config_path: Path, env: dict[str, str]) -> int:
    """Tokenize with torchtune's own dataset; return trained labels per sample (what its log divides)."""
    out = subprocess.run(
        [python, "-c", _TORCHTUNE_CHECK, str(config_path)], env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"error: torchtune dataset check failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["lengths"] != [cfg.seq_len] or len(result["trained"]) != 1:
        raise SystemExit(f"error: torchtune samples are not all {cfg.seq_len} tokens: {result}")
    return result["trained"][0]


# ----------------------------------------------------------------------------------------------
# Configs for each library
# ----------------------------------------------------------------------------------------------


def our_config(cfg: RunConfig, ckpt: Path, tokenizer: Path, data: Path, out: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": "auto", "checkpoint_dir": str(ckpt), "tokenizer_path": str(tokenizer),
        "dataset": str(data), "dataset_type": "instruct", "template": "alpaca", "train_on_input": True,
        "max_seq_len": cfg.seq_len, "packed": False, "shuffle": False, "batch_size": cfg.batch_size,
        "epochs": 1, "max_steps_per_epoch": cfg.total_steps, "gradient_accumulation_steps": 1,
        "optimizer": "adamw", "lr": cfg.lr, "weight_decay": 0.01, "lr_scheduler": "cosine",
        "warmup_steps": 0, "clip_grad_norm": 1.0, "device": cfg.device, "dtype": cfg.dtype,
        "enable_activation_checkpointing": cfg.activation_checkpointing, "enable_activation_offloading": False,
        "compile": False, "loss_chunks": 8, "output_dir": str(out), "log_every_n_steps": 1,
    }
    if cfg.is_lora:
        config.update(
            lora_attn_modules=list(cfg.lora.modules), apply_lora_to_mlp=cfg.lora.mlp,
            apply_lora_to_output=cfg.lora.output, lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
            lora_dropout=0.0, quantize_base=cfg.method == "qlora",
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
            "vocab_size": a.vocab_size, "num_layers": a.n_layers, "num_heads": a.n_heads,
            "num_kv_heads": a.n_kv_heads, "embed_dim": a.dim, "max_seq_len": a.max_seq_len,
            "intermediate_dim": a.hidden_dim, "norm_eps": a.norm_eps,
        }
        if not lora:
            model["rope_base"] = a.rope_theta
        if cfg.method == "qlora":
            model["quantize_base"] = True
    if lora:
        model.update(
            lora_attn_modules=list(cfg.lora.modules), apply_lora_to_mlp=cfg.lora.mlp,
            apply_lora_to_output=cfg.lora.output, lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
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
            "_component_": "torchtune.datasets.alpaca_dataset", "source": "json", "data_files": str(data),
            "split": "train", "train_on_input": True, "packed": False,
        },
        "seed": 42, "shuffle": False,
        "model": torchtune_model(cfg),
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(ckpt),
            "checkpoint_files": files, "recipe_checkpoint": None, "output_dir": str(out / "checkpoints"),
            "model_type": cfg.spec.torchtune_model_type,
        },
        "resume_from_checkpoint": False,
        "batch_size": cfg.batch_size, "epochs": 1, "max_steps_per_epoch": cfg.total_steps,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "_component_": "torch.optim.AdamW", "lr": cfg.lr, "weight_decay": 0.01,
            **({"fused": True} if on_gpu else {"foreach": True}),
        },
        "lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
            "num_warmup_steps": 0,
        },
        "optimizer_in_bwd": False, "clip_grad_norm": 1.0,
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss", "num_output_chunks": 8},
        "compile": False, "device": cfg.device, "dtype": cfg.dtype,
        "enable_activation_checkpointing": cfg.activation_checkpointing, "enable_activation_offloading": False,
        "metric_logger": {
            "_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs"),
            "filename": "log.txt",
        },
        "log_every_n_steps": 1, "log_peak_memory_stats": on_gpu,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }
    if cfg.is_lora:
        # Ours writes the adapter and the merged model; so does torchtune with this off.
        config["save_adapter_weights_only"] = False
    return config


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# Running one recipe and reading its log
# ----------------------------------------------------------------------------------------------


@dataclass
class StepLog:
    step: int
    tokens_per_second: float  # as the library logged it, with its own token count
    loss: float
    peak_memory_gb: Optional[float] = None  # the library's own reading, when it logs one


def read_our_steps(metrics: Path) -> list[StepLog]:
    if not metrics.exists():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if "tokens_per_second" in record:
            steps.append(StepLog(record["step"], record["tokens_per_second"], record["loss"], record.get("peak_memory_gb")))
    return steps


_TT_FIELD = re.compile(r"(\w+):(?:tensor\()?([-+0-9.eE]+|nan|inf)\)?")


def read_torchtune_steps(log: Path) -> list[StepLog]:
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        if not line.startswith("Step ") or not line.endswith(" "):
            continue  # DiskLogger ends a complete line with a space before the newline
        step = int(line.split()[1])
        fields = {k: float(v) for k, v in _TT_FIELD.findall(line.split("|", 1)[1])}
        if "tokens_per_second_per_gpu" in fields:
            steps.append(StepLog(step, fields["tokens_per_second_per_gpu"], fields.get("loss", float("nan")),
                                 fields.get("peak_memory_alloc")))
    return steps


def proc_status_kib(pid: int, key: str) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class RunResult:
    library: str
    repeat: int
    step_times_s: list[float]
    tokens_per_second: float
    peak_memory_gb: float  # CPU: VmHWM at the end of the timed steps; GPU: logged max allocated
    process_peak_rss_gb: float  # whole process, final checkpoint save included
    wall_s: float
    outside_steps_s: float  # wall time not spent in logged steps: start-up, tokenizing, loading, final save
    first_loss: float
    self_reported_peak_gb: Optional[float]


def run_recipe(
    library: str, repeat: int, cmd: list[str], env: dict[str, str], log_file: Path,
    read_steps: Callable[[], list[StepLog]], cfg: RunConfig, library_tokens_per_step: int,
) -> RunResult:
    """Run one training process; watch its log to read its peak memory at the end of the timed steps."""
    last_timed = cfg.warmup_steps + cfg.timed_steps
    started = time.perf_counter()
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        hwm_kib: Optional[int] = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if hwm_kib is None and len(read_steps()) >= last_timed:
                hwm_kib = proc_status_kib(proc.pid, "VmHWM")
            time.sleep(POLL_S)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-40:])
        raise SystemExit(f"error: {library} run failed (exit {code}); see {log_file}:\n{tail}")
    steps = read_steps()
    timed = [s for s in steps if cfg.warmup_steps < s.step <= last_timed]
    if len(timed) != cfg.timed_steps:
        raise SystemExit(f"error: {library} logged {len(steps)} steps, expected {cfg.total_steps}; see {log_file}")
    step_times = [library_tokens_per_step / s.tokens_per_second for s in timed]
    # torchtune resets CUDA peak stats every step, ours keeps a running max: the max over the
    # timed steps is the training peak for both.
    logged = [s.peak_memory_gb for s in timed if s.peak_memory_gb is not None]
    logged_peak = max(logged) if logged else None
    if cfg.device == "cuda":
        peak = logged_peak if logged_peak is not None else float("nan")
    else:
        peak = (hwm_kib or 0) / 2**20
    return RunResult(
        library=library, repeat=repeat, step_times_s=step_times,
        tokens_per_second=cfg.tokens_per_step * len(step_times) / sum(step_times),
        peak_memory_gb=peak, process_peak_rss_gb=usage.ru_maxrss / 2**20, wall_s=wall,
        outside_steps_s=wall - sum(library_tokens_per_step / s.tokens_per_second for s in steps),
        first_loss=steps[0].loss, self_reported_peak_gb=logged_peak,
    )


# ----------------------------------------------------------------------------------------------
# FLOPs, peak rate, machine
# ----------------------------------------------------------------------------------------------


def matmul_params(args: ModelArgs) -> int:
    """Weights that take part in a matmul: q/k/v/o, the three MLP projections, the output head."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    mlp = 3 * args.dim * args.hidden_dim
    return args.n_layers * (attn + mlp) + args.dim * args.vocab_size


def total_params(args: ModelArgs) -> int:
    embeddings = args.vocab_size * args.dim
    norms = (2 * args.n_layers + 1) * args.dim
    head = 0 if args.tie_embeddings else args.dim * args.vocab_size
    return matmul_params(args) - args.dim * args.vocab_size + head + embeddings + norms


def lora_params(cfg: RunConfig) -> int:
    a, r = cfg.spec.args, cfg.lora.rank
    out_dims = {"q_proj": a.n_heads * a.head_dim, "k_proj": a.n_kv_heads * a.head_dim,
                "v_proj": a.n_kv_heads * a.head_dim, "output_proj": a.dim}
    in_dims = {"q_proj": a.dim, "k_proj": a.dim, "v_proj": a.dim, "output_proj": a.n_heads * a.head_dim}
    per_layer = sum(r * (in_dims[m] + out_dims[m]) for m in cfg.lora.modules)
    if cfg.lora.mlp:
        per_layer += 3 * r * (a.dim + a.hidden_dim)
    head = r * (a.dim + a.vocab_size) if cfg.lora.output else 0
    return a.n_layers * per_layer + head


def flops_per_token(cfg: RunConfig) -> float:
    a = cfg.spec.args
    attention = 12 * a.n_layers * a.dim * cfg.seq_len
    if cfg.is_lora:
        return 4 * matmul_params(a) + 6 * lora_params(cfg) + attention
    return 6 * matmul_params(a) + attention


def peak_matmul_flops(device: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of square matmuls in the training dtype: the MFU denominator."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for trial in range(12):
        sync()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        if trial >= 2:  # the first trials warm up caches and clocks
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def machine_description(device: str) -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except FileNotFoundError:
        model = platform.processor() or model
    text = (f"{os.cpu_count()} CPU cores ({model}), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, Python {platform.python_version()}")
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


@dataclass
class Summary:
    library: str
    tokens_per_second: float
    step_time_s: float
    best_step_tokens_per_second: float  # the fastest timed step of all runs: least disturbed by other jobs
    peak_memory_gb: float
    process_peak_rss_gb: float
    outside_steps_s: float
    mfu: float
    first_loss: float
    runs: list[RunResult] = field(default_factory=list)


def summarise(results: list[RunResult], cfg: RunConfig, peak_flops: float) -> dict[str, Summary]:
    out = {}
    for library in LIBRARIES:
        runs = [r for r in results if r.library == library]
        if not runs:
            continue
        tps = statistics.median(r.tokens_per_second for r in runs)
        out[library] = Summary(
            library=library, tokens_per_second=tps,
            step_time_s=statistics.median(t for r in runs for t in r.step_times_s),
            best_step_tokens_per_second=cfg.tokens_per_step / min(t for r in runs for t in r.step_times_s),
            peak_memory_gb=statistics.median(r.peak_memory_gb for r in runs),
            process_peak_rss_gb=statistics.median(r.process_peak_rss_gb for r in runs),
            outside_steps_s=statistics.median(r.outside_steps_s for r in runs),
            mfu=tps * flops_per_token(cfg) / peak_flops, first_loss=runs[0].first_loss, runs=runs,
        )
    return out


def markdown_report(
    cfg: RunConfig, summaries: dict[str, Summary], command: str, machine: str, peak_flops: float,
    load: tuple[float, float], ours_set: Sequence[str] = (),
) -> str:
    a = cfg.spec.args
    memory_label = "peak GPU memory allocated" if cfg.device == "cuda" else "peak RSS to end of timed steps"
    lines = [
        f"### {cfg.spec.name}, {cfg.method}, batch {cfg.batch_size} x seq {cfg.seq_len}, {cfg.dtype} on {cfg.device}"
        + (f", what-if: ours with {', '.join(ours_set)}" if ours_set else "")
        + f" ({datetime.date.today().isoformat()})",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine}; measured peak {cfg.dtype} matmul {peak_flops / 1e9:.1f} GFLOP/s; "
        f"1-minute load average {load[0]:.1f} before and {load[1]:.1f} after the runs (other users' jobs)",
        f"- Model: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.n_kv_heads} kv), SwiGLU {a.hidden_dim}, "
        f"vocab {a.vocab_size}: {total_params(a) / 1e6:.1f}M parameters, {matmul_params(a) / 1e6:.1f}M in matmuls; "
        f"{flops_per_token(cfg) / 1e6:.1f} MFLOP per token"
        + (f"; LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.modules)}, {lora_params(cfg) / 1e6:.2f}M adapter parameters"
           if cfg.is_lora else ""),
        f"- {cfg.warmup_steps} warm-up step(s) excluded, {cfg.timed_steps} timed steps per run, "
        f"{len(next(iter(summaries.values())).runs)} run(s) per library, alternating; medians shown",
        "",
        f"| library | tokens/s (median of runs) | median s/step | tokens/s of best step | {memory_label} (GiB) "
        "| whole-process peak RSS (GiB) | MFU (median run) | s outside steps | step-1 loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries.values():
        lines.append(
            f"| {s.library} | {s.tokens_per_second:,.0f} | {s.step_time_s:.3f} | {s.best_step_tokens_per_second:,.0f} | "
            f"{s.peak_memory_gb:.3f} | "
            f"{s.process_peak_rss_gb:.3f} | {100 * s.mfu:.1f}% | {s.outside_steps_s:.1f} | {s.first_loss:.4f} |"
        )
    lines += ["", "Per run (tokens/s, in run order): " + "; ".join(
        f"{s.library} " + " / ".join(f"{r.tokens_per_second:,.0f}" for r in s.runs) for s in summaries.values()
    )]
    if "ours" in summaries and "torchtune" in summaries:
        o, t = summaries["ours"], summaries["torchtune"]
        lines += [
            "",
            f"**ours / torchtune: {o.tokens_per_second / t.tokens_per_second:.2f}x tokens/s "
            f"({o.best_step_tokens_per_second / t.best_step_tokens_per_second:.2f}x on the best steps), "
            f"{o.peak_memory_gb / t.peak_memory_gb:.2f}x peak memory** "
            f"(whole-process peak RSS {o.process_peak_rss_gb / t.process_peak_rss_gb:.2f}x).",
        ]
    lines.append("")
    return "\n".join(lines)


def print_table(summaries: dict[str, Summary]) -> None:
    print(f"\n{'library':<10} {'tokens/s':>10} {'s/step':>8} {'best t/s':>9} {'peak GiB':>9} {'proc GiB':>9} "
          f"{'MFU':>7} {'loss@1':>8}")
    for s in summaries.values():
        print(f"{s.library:<10} {s.tokens_per_second:>10,.0f} {s.step_time_s:>8.3f} {s.best_step_tokens_per_second:>9,.0f} "
              f"{s.peak_memory_gb:>9.3f} "
              f"{s.process_peak_rss_gb:>9.3f} {100 * s.mfu:>6.1f}% {s.first_loss:>8.4f}")
    if "ours" in summaries and "torchtune" in summaries:
        o, t = summaries["ours"], summaries["torchtune"]
        print(f"ours/torchtune: tokens/s {o.tokens_per_second / t.tokens_per_second:.2f}x "
              f"(best steps {o.best_step_tokens_per_second / t.best_step_tokens_per_second:.2f}x), "
              f"peak memory {o.peak_memory_gb / t.peak_memory_gb:.2f}x")


def append_docs(path: Path, section: str) -> None:
    if not path.exists():
        path.write_text("# Benchmarks\n\nSections below are appended by `benchmarks/bench_finetune.py`.\n\n")
    with path.open("a") as f:
        f.write("\n" + section)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=("tiny", "100m", "llama3_2_1b", "llama3_1_8b"))
    p.add_argument("--method", default="full", choices=("full", "lora", "qlora"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--repeats", type=int, default=3, help="runs per library (alternating)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--activation-checkpointing", action="store_true", help="both libraries recompute each layer")
    p.add_argument("--threads", type=int, help="OMP/MKL threads for every training process (default: torch's)")
    p.add_argument("--torchtune-python", help="python of a venv with torchtune (benchmarks/setup_torchtune.sh)")
    p.add_argument("--skip-ours", action="store_true", help="only run torchtune")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a what-if: override one of our recipe's keys (e.g. loss_chunks=1); repeatable")
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench")
    p.add_argument("--docs", type=Path, help="append a markdown section with the results to this file")
    p.add_argument("--json", type=Path, help="also write every run's numbers to this file")
    return p.parse_args(argv)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings to a dict, values read as YAML (so 1 is an int, true a bool)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --ours-set {pair!r} is not KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def child_env(work: Path, threads: Optional[int]) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"  # silences torchao's CUDA-extension warnings
    env["HF_HOME"] = str(work / "hf_home")  # datasets' cache for torchtune's json loading
    env["TQDM_MININTERVAL"] = "1"
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bf16" if device == "cuda" else "fp32") if args.dtype == "auto" else args.dtype
    spec = model_spec(args.model)
    cfg = RunConfig(spec, args.method, args.batch_size, args.seq_len, args.warmup_steps, args.steps, device, dtype,
                    LoraSpec(rank=args.lora_rank), args.activation_checkpointing)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    work = args.work_dir / spec.name
    work.mkdir(parents=True, exist_ok=True)
    cell = work / (f"{cfg.method}_b{cfg.batch_size}_s{cfg.seq_len}" + ("_ac" if cfg.activation_checkpointing else "")
                   + "".join(f"_{o}" for o in args.ours_set))
    cell.mkdir(exist_ok=True)
    env = child_env(work, args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)  # the peak-rate measurement uses what the recipes get
    print(f"preparing tokenizer, data and weights in {work}", flush=True)
    tokenizer = prepare_tokenizer(spec, work)
    data = cell / "train.jsonl"
    write_dataset(data, num_records=cfg.batch_size * cfg.total_steps + cfg.batch_size, seq_len=cfg.seq_len, seed=SEED)
    ckpt = work / f"checkpoint_{dtype}"
    files = write_checkpoint(spec, tokenizer, ckpt, torch_dtype, device)

    commands: dict[str, list[str]] = {}
    readers: dict[str, Callable[[Path], list[StepLog]]] = {}
    library_tokens: dict[str, int] = {}
    if not args.skip_ours:
        check_our_dataset(cfg, data, tokenizer)
        recipe = "lora_finetune" if cfg.is_lora else "full_finetune"
        commands["ours"] = [sys.executable, "-m", "finetune.cli", recipe, "--config"]
        readers["ours"] = lambda out: read_our_steps(out / "metrics.jsonl")
        library_tokens["ours"] = cfg.tokens_per_step  # non-pad tokens, no padding here
    if args.torchtune_python:
        tt_probe = write_yaml(cell / "torchtune_probe.yaml", torchtune_config(cfg, ckpt, files, tokenizer, data, cell / "probe"))
        trained = check_torchtune_dataset(cfg, args.torchtune_python, tt_probe, env)
        recipe = "lora_finetune_single_device" if cfg.is_lora else "full_finetune_single_device"
        commands["torchtune"] = [args.torchtune_python, "-m", "torchtune._cli.tune", "run", recipe, "--config"]
        readers["torchtune"] = lambda out: read_torchtune_steps(out / "logs" / "log.txt")
        library_tokens["torchtune"] = cfg.batch_size * trained
    if not commands:
        raise SystemExit("error: nothing to run: pass --torchtune-python or drop --skip-ours")

    machine = machine_description(device)
    peak_before = peak_matmul_flops(device, torch_dtype)
    print(f"{machine}; peak {dtype} matmul {peak_before / 1e9:.1f} GFLOP/s", flush=True)

    load_before = os.getloadavg()[0]
    results: list[RunResult] = []
    for repeat in range(args.repeats):
        for library, cmd in commands.items():
            out = cell / f"{library}_run{repeat}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir()
            make = our_config if library == "ours" else (
                lambda c, k, t, d, o: torchtune_config(c, k, files, t, d, o))
            config = make(cfg, ckpt, tokenizer, data, out)
            if library == "ours":
                config.update(parse_overrides(args.ours_set))
            config_path = write_yaml(out / "config.yaml", config)
            reader = readers[library]
            result = run_recipe(
                library, repeat, [*cmd, str(config_path)], env, out / "stdout.log",
                lambda reader=reader, out=out: reader(out), cfg, library_tokens[library],
            )
            results.append(result)
            print(f"  {library} run {repeat}: {result.tokens_per_second:,.0f} tokens/s, "
                  f"step times {', '.join(f'{t:.3f}' for t in result.step_times_s)} s, "
                  f"peak {result.peak_memory_gb:.3f} GiB, wall {result.wall_s:.1f} s", flush=True)

    # Other jobs can depress one measurement: the better of two, before and after, is the peak.
    peak_flops = max(peak_before, peak_matmul_flops(device, torch_dtype))
    summaries = summarise(results, cfg, peak_flops)
    print_table(summaries)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).relative_to(REPO_ROOT)
                                                              if Path(sys.argv[0]).is_absolute() else sys.argv[0]),
                                                             *(sys.argv[1:] if argv is None else argv)])
    report = markdown_report(cfg, summaries, command, machine, peak_flops, (load_before, os.getloadavg()[0]),
                             args.ours_set)
    if args.docs:
        append_docs(args.docs, report)
        print(f"appended results to {args.docs}")
    if args.json:
        args.json.write_text(json.dumps({
            "config": {"model": spec.name, "method": cfg.method, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                       "warmup_steps": cfg.warmup_steps, "timed_steps": cfg.timed_steps, "device": device, "dtype": dtype},
            "machine": machine, "peak_flops": peak_flops, "flops_per_token": flops_per_token(cfg),
            "runs": [dataclasses.asdict(r) for r in results],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
