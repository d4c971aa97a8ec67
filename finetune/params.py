"""Typed parameters for every recipe: one dataclass per recipe, validated on construction.

A Params object is the single source of truth for a run. It is filled by
`TuneArgumentParser` (CLI override > YAML config > the defaults here) or built directly in a
notebook; either way `__post_init__` checks it the same way, so a bad value fails before any
work starts. `to_yaml` / `from_yaml` round-trip exactly, which is how a run's `params.yaml`
re-runs the same job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from finetune.checkpointing.formats import CHECKPOINT_FORMATS
from finetune.config.paths import check_output_dir_apart, checked_resume_from
from finetune.data.dataset import DatasetType
from finetune.data.sources import parse_split
from finetune.data.templates import get_template
from finetune.models import MODEL_NAMES
from finetune.models.lora import ATTN_MODULES
from finetune.param_fields import (
    ParamsIO,
    check_choice,
    check_field_types,
    events_redis_channel_param,
    events_redis_url_param,
    events_webhook_param,
    field_names,
    heartbeat_param,
    param,
    require,
    resolve_path,
)
from finetune.quantization import GROUP_SIZES, SCHEMES
from finetune.training.distributed import DEVICES
from finetune.training.lr_schedule import SCHEDULES
from finetune.training.metrics import LOGGERS
from finetune.training.optim import OPTIMIZERS
from finetune.training.precision import DTYPES
from finetune.training.preference import LOSS_TYPES, REFERENCE_FREE

MODEL_HELP = "model: a registry name (e.g. llama3_1_8b, tiny) or auto to read it from the checkpoint"
RESUME_HELP = "true: continue from the newest complete step_<N> in output_dir; step_<N>: from that one"
ResumeFrom = Union[bool, str]

# Each choice list is defined once, beside the code that acts on it; the Literal types of the
# fields are built from those lists, so `--help`, the parser and the checks here read the same one.
CheckpointFormat = Literal[CHECKPOINT_FORMATS]  # type: ignore[valid-type]
Device = Literal[DEVICES]  # type: ignore[valid-type]
Dtype = Literal[DTYPES]  # type: ignore[valid-type]
LrScheduler = Literal[SCHEDULES]  # type: ignore[valid-type]
MetricLoggerType = Literal[LOGGERS]  # type: ignore[valid-type]
OptimizerName = Literal[OPTIMIZERS]  # type: ignore[valid-type]
LoraModule = Literal[ATTN_MODULES]  # type: ignore[valid-type]


@dataclass
class FullFinetuneParams(ParamsIO):
    """Everything a full fine-tune run needs."""

    # Model and files
    model: str = param("tiny", MODEL_HELP)
    checkpoint_dir: Optional[str] = param(None, "directory with HF or Meta weights; none = random init")
    checkpoint_format: CheckpointFormat = param("auto", "format of checkpoint_dir")
    tokenizer_path: Optional[str] = param(
        None, "tokenizer.model (or Llama 3 tokenizer.json) file or dir; none = checkpoint_dir"
    )
    # Data
    dataset: str = param("pkg:data/demo/train.jsonl", "local file or folder, or a HF dataset name")
    dataset_type: DatasetType = param("instruct", "how records are read")
    template: str = param("alpaca", "prompt template for instruct data (alpaca, plain, ...)")
    column_map: Optional[dict[str, str]] = param(None, "expected column -> your column, e.g. {output: answer}")
    dataset_subset: Optional[str] = param(
        None, "a Hub dataset's subset (configuration), e.g. main for openai/gsm8k, or of a local dataset folder"
    )
    split: str = param("train", "dataset split to train on")
    eval_dataset: Optional[str] = param(None, "held-out data for eval loss; none = no eval")
    eval_split: str = param("train", "split of eval_dataset, e.g. test, or train[90%:] beside split=train[:90%]")
    eval_every_n_steps: Optional[int] = param(None, "eval loss every N steps (and at the end)")
    eval_max_batches: Optional[int] = param(None, "cap on eval batches per evaluation")
    max_seq_len: int = param(512, "samples are truncated (or packed) to this many tokens")
    train_on_input: bool = param(False, "also train on prompt tokens (false: loss on responses only)")
    packed: bool = param(False, "pack samples into max_seq_len rows (no cross-document attention)")
    num_workers: int = param(0, "DataLoader worker processes")
    data_cache_dir: Optional[str] = param(
        "auto",
        "tokenized data is cached here and memory-mapped by later runs and every rank; "
        "auto = $XDG_CACHE_HOME/finetune/data or ~/.cache/finetune/data, none = tokenize in memory each run",
    )
    data_build_workers: int = param(0, "processes that tokenize data into the cache; 0 = every core")
    data_streaming: bool = param(
        False,
        "tokenize the training data while training, in its order, without the cache (data larger "
        "than the disk; Hub datasets are read over the network); needs max_steps_per_epoch",
    )
    # Loop
    seed: int = param(42, "random seed: same seed, same data order and loss curve")
    shuffle: bool = param(True, "shuffle the data each epoch")
    batch_size: int = param(2, "samples per micro-batch per process")
    epochs: int = param(1, "passes over the data")
    max_steps_per_epoch: Optional[int] = param(None, "stop an epoch after N optimizer steps")
    gradient_accumulation_steps: int = param(1, "micro-batches per optimizer step")
    optimizer: OptimizerName = param("adamw", "optimizer")
    lr: float = param(2e-5, "peak learning rate")
    weight_decay: float = param(0.01, "decoupled weight decay")
    lr_scheduler: LrScheduler = param("cosine", "schedule after warmup")
    warmup_steps: int = param(0, "linear warmup steps")
    clip_grad_norm: Optional[float] = param(1.0, "clip gradients to this global norm; none = off")
    # Hardware and memory
    device: Device = param("auto", "auto = cuda when available")
    dtype: Dtype = param("auto", "auto = bf16 on GPU, fp32 on CPU")
    enable_activation_checkpointing: bool = param(False, "recompute each layer in backward")
    enable_activation_offloading: bool = param(False, "keep saved activations in CPU memory")
    cpu_offload: bool = param(False, "FSDP: keep parameters, grads and optimizer state on CPU")
    reshard_after_forward: bool = param(True, "FSDP: free gathered weights after forward")
    compile: bool = param(False, "torch.compile each decoder layer")
    loss_chunks: int = param(
        0,
        "chunks for the cross-entropy, so fp32 logits never exist whole; "
        "0 = auto (each chunk's fp32 logits under 256 MiB)",
    )
    # Output
    output_dir: str = param("output", "where checkpoints, metrics and status.json go")
    resume_from_checkpoint: ResumeFrom = param(False, RESUME_HELP)
    save_every_n_steps: Optional[int] = param(None, "checkpoint every N steps (also each epoch end)")
    keep_last_n_checkpoints: Optional[int] = param(None, "delete older checkpoints; none = keep all")
    log_every_n_steps: int = param(1, "write metrics every N steps")
    metric_logger_type: MetricLoggerType = param("jsonl", "metrics.jsonl always; plus tensorboard or wandb")
    profile: bool = param(False, "write a torch.profiler trace to output_dir/profile")
    profile_wait_steps: int = param(1, "profiler: steps to skip first")
    profile_active_steps: int = param(2, "profiler: steps to record")
    heartbeat_interval_s: float = heartbeat_param()
    events_webhook: Optional[str] = events_webhook_param()
    events_redis_url: Optional[str] = events_redis_url_param()
    events_redis_channel: str = events_redis_channel_param()

    def __post_init__(self) -> None:
        check_field_types(self)
        self._validate_common()

    @classmethod
    def hint_for_unknown_key(cls, key: str) -> str:
        """What TuneArgumentParser adds when `key` is not ours: a LoRA setting names the LoRA recipe."""
        if key in field_names(LoraFinetuneParams) - field_names(cls):
            return (
                "it is a LoRA setting: run this config with tune lora_finetune "
                "(also named lora_finetune_single_device and lora_finetune_distributed)"
            )
        return ""

    def _validate_common(self) -> None:
        check_choice("model", self.model, (*MODEL_NAMES, "auto"))
        require(
            self.model != "auto" or self.checkpoint_dir is not None,
            "model=auto reads the architecture from the checkpoint, so set checkpoint_dir",
        )
        require(
            self.checkpoint_dir is not None or self.tokenizer_path is not None,
            "tokenizer_path is required when checkpoint_dir is not set (no tokenizer to find)",
        )
        for name in (
            "max_seq_len",
            "batch_size",
            "epochs",
            "gradient_accumulation_steps",
            "log_every_n_steps",
            "profile_active_steps",
        ):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        for name in ("num_workers", "data_build_workers", "warmup_steps", "profile_wait_steps", "loss_chunks"):
            require(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be 0 or more")
        for name in (
            "max_steps_per_epoch",
            "save_every_n_steps",
            "keep_last_n_checkpoints",
            "eval_every_n_steps",
            "eval_max_batches",
        ):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{name}={value} must be at least 1 (or none)")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr} must be positive and finite")
        require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be 0 or more")
        require(self.heartbeat_interval_s > 0, "heartbeat_interval_s must be positive")
        require(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            f"clip_grad_norm={self.clip_grad_norm} must be positive (or none to turn clipping off)",
        )
        require(
            not (self.enable_activation_offloading and self.compile),
            "enable_activation_offloading and compile cannot be combined: the offload hooks "
            "break compiled graphs; turn one off",
        )
        require(
            self.eval_every_n_steps is None or self.eval_dataset is not None,
            "eval_every_n_steps is set but eval_dataset is not; "
            "set eval_dataset, or eval_every_n_steps=none to turn eval off",
        )
        require(bool(self.output_dir.strip()), "output_dir must not be empty")
        parse_split(self.split)  # a malformed slice, or a percentage past 100%, before anything starts
        parse_split(self.eval_split, "eval_split")
        output_dir = resolve_path(self.output_dir)
        self.resume_from_checkpoint = checked_resume_from(self.resume_from_checkpoint, output_dir)
        sources = {key: getattr(self, key) for key in ("checkpoint_dir", "tokenizer_path", "dataset", "eval_dataset")}
        check_output_dir_apart(output_dir, {k: (v, resolve_path(v)) for k, v in sources.items() if v})
        require(
            not self.data_streaming or (self.max_steps_per_epoch is not None and not self.packed),
            "data_streaming=true needs max_steps_per_epoch (a stream's length is not known before it is read) "
            "and packed=false",
        )


@dataclass
class LoraFinetuneParams(FullFinetuneParams):
    """A full fine-tune's parameters plus the adapter's."""

    lr: float = param(3e-4, "peak learning rate")
    lora_attn_modules: list[LoraModule] = param(
        ["q_proj", "v_proj"],
        "attention projections given adapters",
        hint="PEFT's o_proj is output_proj here; gate_proj/up_proj/down_proj: apply_lora_to_mlp=true; "
        "lm_head: apply_lora_to_output=true",
    )
    apply_lora_to_mlp: bool = param(False, "also adapt the MLP projections")
    apply_lora_to_output: bool = param(False, "also adapt the output head")
    lora_rank: int = param(8, "adapter rank r")
    lora_alpha: float = param(16.0, "adapter scale numerator: scale = alpha / rank")
    lora_dropout: float = param(0.0, "dropout on the adapter input")
    use_dora: bool = param(False, "DoRA: learn a magnitude vector beside the LoRA direction")
    quantize_base: bool = param(False, "QLoRA: store frozen base weights as NF4")
    save_merged_model: bool = param(True, "also write the merged model (HF format) to step_<N>/merged")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lora_rank >= 1, f"lora_rank={self.lora_rank} must be at least 1")
        require(
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
            f"lora_alpha={self.lora_alpha} must be positive and finite",
        )
        require(0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        require(
            len(set(self.lora_attn_modules)) == len(self.lora_attn_modules),
            f"lora_attn_modules={self.lora_attn_modules} lists a module twice",
        )
        require(
            bool(self.lora_attn_modules) or self.apply_lora_to_mlp or self.apply_lora_to_output,
            "no module gets an adapter: set lora_attn_modules, apply_lora_to_mlp or apply_lora_to_output",
        )


PreferenceLossType = Literal[LOSS_TYPES]  # type: ignore[valid-type]


@dataclass
class DpoParams(LoraFinetuneParams):
    """Preference tuning (DPO, IPO, SimPO) of every weight or, with use_lora, of LoRA adapters:
    a fine-tune's parameters, the adapter's, and the preference loss's."""

    dataset: str = param("pkg:data/demo/preference_train.jsonl", "preference pairs: a local file or folder, or HF name")
    lr: float = param(1e-6, "peak learning rate (LoRA usually wants 10-100x more)")
    use_lora: bool = param(False, "train LoRA adapters; the reference is then the base with them off")
    loss_type: PreferenceLossType = param("sigmoid", "sigmoid (DPO), ipo, or simpo (no reference model)")
    beta: float = param(0.1, "how far the policy may move from the reference (simpo: the reward scale)")
    label_smoothing: float = param(0.0, "sigmoid, simpo: the chance a pair's preference is flipped (cDPO)")
    simpo_gamma: float = param(0.5, "simpo: the target reward margin")
    precompute_reference_logps: bool = param(
        False, "score every pair with the starting model once before training instead of keeping a reference model"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.dataset_type != "text",
            "dataset_type=text has no prompt and responses to compare; use instruct (text pairs) or chat "
            "(conversations)",
        )
        require(not self.train_on_input, "train_on_input=true: preference losses score responses only; unset it")
        require(not self.packed, "packed=true: preference pairs are not packed; unset it")
        require(math.isfinite(self.beta) and self.beta > 0, f"beta={self.beta} must be positive and finite")
        require(0 <= self.label_smoothing < 0.5, f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        require(
            self.label_smoothing == 0 or self.loss_type != "ipo",
            "label_smoothing applies to loss_type sigmoid and simpo, not ipo; set label_smoothing=0",
        )
        require(math.isfinite(self.simpo_gamma), f"simpo_gamma={self.simpo_gamma} must be finite")
        require(
            self.use_lora or not (self.quantize_base or self.use_dora),
            "quantize_base and use_dora are LoRA settings; set use_lora=true or unset them",
        )
        require(
            not (self.precompute_reference_logps and self.loss_type in REFERENCE_FREE),
            f"loss_type={self.loss_type} uses no reference; unset precompute_reference_logps",
        )


@dataclass
class DummyParams(ParamsIO):
    """The dummy recipe: fake training steps with no model, tokenizer or data, writing what a run
    writes (params.yaml, metrics.jsonl, status.json, step_<N>/). A fine-tuning config also runs
    under it: its keys for the model, data and hardware are read and ignored (see ignored_keys)."""

    output_dir: str = param("output/dummy", "where the fake checkpoint, metrics and status.json go")
    epochs: int = param(1, "passes of fake steps")
    max_steps_per_epoch: Optional[int] = param(None, "fake optimizer steps per epoch; none = 5 (there is no data)")
    batch_size: int = param(2, "recorded in the metrics as a real run's would be")
    lr: float = param(2e-5, "recorded in the metrics as a real run's would be")
    seed: int = param(42, "random seed")
    log_every_n_steps: int = param(1, "write metrics every N steps")
    save_every_n_steps: Optional[int] = param(None, "checkpoint every N steps (also at the end)")
    step_time_s: float = param(0.0, "seconds each fake step takes, to watch heartbeats or try a preemption")
    resume_from_checkpoint: ResumeFrom = param(False, RESUME_HELP)
    heartbeat_interval_s: float = heartbeat_param()
    events_webhook: Optional[str] = events_webhook_param()
    events_redis_url: Optional[str] = events_redis_url_param()
    events_redis_channel: str = events_redis_channel_param()
    device: Device = param("cpu", "where the fake loss is all-reduced: cpu (gloo) or cuda (nccl)")
    dtype: Dtype = param("fp32", "kept for start_run; the dummy has no weights")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("epochs", "batch_size", "log_every_n_steps"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        for name in ("max_steps_per_epoch", "save_every_n_steps"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{name}={value} must be at least 1 (or none)")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr} must be positive and finite")
        require(self.step_time_s >= 0, f"step_time_s={self.step_time_s} must be 0 or more")
        require(self.heartbeat_interval_s > 0, "heartbeat_interval_s must be positive")
        require(bool(self.output_dir.strip()), "output_dir must not be empty")
        self.resume_from_checkpoint = checked_resume_from(self.resume_from_checkpoint, resolve_path(self.output_dir))

    @property
    def steps_per_epoch(self) -> int:
        return self.max_steps_per_epoch or 5

    @classmethod
    def ignored_keys(cls) -> set[str]:
        """Keys of the fine-tuning configs the dummy reads and drops, so `tune dummy --config X` tries
        the pipeline of X's job; any other unknown key (a typo) is still an error."""
        return (field_names(FullFinetuneParams) | field_names(LoraFinetuneParams)) - field_names(cls)


@dataclass
class GenerateParams(ParamsIO):
    """Generate text from a checkpoint (optionally with a LoRA adapter), one prompt or a file of them."""

    # Model and files
    model: str = param("auto", MODEL_HELP)
    checkpoint_dir: Optional[str] = param(None, "directory with HF or Meta weights (required)")
    checkpoint_format: CheckpointFormat = param("auto", "format of checkpoint_dir")
    tokenizer_path: Optional[str] = param(
        None, "tokenizer.model (or Llama 3 tokenizer.json) file or dir; none = checkpoint_dir"
    )
    adapter_dir: Optional[str] = param(None, "PEFT-format LoRA adapter to apply on top; none = base model")
    # Prompts
    prompt: Optional[str] = param(None, "the text to continue (or set prompt_file)")
    prompt_file: Optional[str] = param(None, "one prompt per line, or a .jsonl of instruction/input records")
    chat: bool = param(False, "send each prompt as a user message in the tokenizer's chat format")
    system_prompt: Optional[str] = param(None, "system message for chat=true")
    template: str = param("alpaca", "instruct template for non-chat prompts (alpaca, plain, ...) or none = raw text")
    # Sampling
    max_new_tokens: int = param(256, "generate at most this many tokens per prompt")
    temperature: float = param(0.0, "0 = greedy; higher = more random")
    top_k: Optional[int] = param(None, "sample only from the k most likely tokens; none = all")
    top_p: Optional[float] = param(None, "sample only from the smallest set with this much probability; none = all")
    seed: Optional[int] = param(42, "sampling seed: same seed, same text; none = different every run")
    stop_strings: list[str] = param([], "also stop a response where one of these strings appears")
    # Hardware and output
    device: Device = param("auto", "auto = cuda when available")
    dtype: Dtype = param("auto", "auto = bf16 on GPU, fp32 on CPU")
    batch_size: int = param(8, "prompts generated together (left-padded); 1 prompt streams its text")
    output_file: Optional[str] = param(
        None, "also write each prompt and response to this .jsonl (replaced when all are done)"
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        check_choice("model", self.model, (*MODEL_NAMES, "auto"))
        require(
            self.checkpoint_dir is not None,
            "checkpoint_dir is required; set it to the directory with the model weights",
        )
        require(
            (self.prompt is None) != (self.prompt_file is None),
            "set exactly one of prompt and prompt_file"
            + (
                ", not both (to use prompt_file with a config that sets prompt, add prompt=none)"
                if self.prompt is not None
                else ", e.g. prompt='Tell me a joke'"
            ),
        )
        require(self.prompt_file is None or bool(self.prompt_file.strip()), "prompt_file must not be empty")
        require(
            self.system_prompt is None or self.chat,
            "system_prompt is only used in the chat format; set chat=true or remove system_prompt",
        )
        if self.template != "none" and not self.chat:
            get_template(self.template)
        require(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")
        require(self.temperature >= 0, f"temperature={self.temperature} must be 0 (greedy) or positive")
        require(self.top_k is None or self.top_k >= 1, f"top_k={self.top_k} must be at least 1 (or none)")
        require(self.top_p is None or 0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1] (or none)")
        require(all(self.stop_strings), "stop_strings holds an empty string, which would stop at once; remove it")


QuantizeScheme = Literal[SCHEMES]  # type: ignore[valid-type]


@dataclass
class QuantizeParams(ParamsIO):
    """Quantize a checkpoint's linear layers with torchao; report size and perplexity before and after."""

    # Model and files
    model: str = param("auto", MODEL_HELP)
    checkpoint_dir: Optional[str] = param(None, "directory with HF or Meta weights (required)")
    checkpoint_format: CheckpointFormat = param("auto", "format of checkpoint_dir")
    tokenizer_path: Optional[str] = param(
        None, "tokenizer.model (or Llama 3 tokenizer.json) file or dir; none = checkpoint_dir"
    )
    # Scheme
    scheme: QuantizeScheme = param(
        "int8_weight_only", "int8_weight_only, int8_dynamic (int8 activations too), int4_weight_only or gptq_int4"
    )
    group_size: int = param(128, "int4 schemes: consecutive input weights sharing one scale (32, 64, 128 or 256)")
    # Data: calibration (GPTQ) and held-out perplexity
    calibration_dataset: Optional[str] = param(
        None, "gptq_int4: your data, which the layers' outputs are kept close on"
    )
    calibration_samples: int = param(128, "gptq_int4: samples drawn from calibration_dataset")
    eval_dataset: Optional[str] = param(
        "pkg:data/demo/heldout.jsonl", "held-out data for perplexity before and after; none = skip"
    )
    eval_max_samples: Optional[int] = param(None, "perplexity on at most this many samples; none = all")
    dataset_type: DatasetType = param("instruct", "how calibration and eval records are read")
    template: str = param("alpaca", "prompt template for instruct data (alpaca, plain, ...)")
    max_seq_len: int = param(512, "calibration and eval samples are truncated to this many tokens")
    batch_size: int = param(8, "samples per batch when measuring perplexity")
    seed: int = param(42, "which calibration samples are drawn")
    # Hardware and output
    device: Device = param("auto", "auto = cuda when available")
    dtype: Dtype = param("auto", "auto = bf16 on GPU, fp32 on CPU")
    output_dir: str = param("output/quantized", "where the quantized checkpoint directory is written")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_choice("model", self.model, (*MODEL_NAMES, "auto"))
        require(
            self.checkpoint_dir is not None,
            "checkpoint_dir is required; set it to the directory with the model weights",
        )
        check_choice("group_size", self.group_size, GROUP_SIZES)
        require(
            self.scheme != "gptq_int4" or self.calibration_dataset is not None,
            "scheme=gptq_int4 calibrates on your data: set calibration_dataset (e.g. your training file)",
        )
        for name in ("calibration_samples", "max_seq_len", "batch_size"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        require(
            self.eval_max_samples is None or self.eval_max_samples >= 1,
            f"eval_max_samples={self.eval_max_samples} must be at least 1 (or none)",
        )
        if self.dataset_type == "instruct":
            get_template(self.template)
        require(bool(self.output_dir.strip()), "output_dir must not be empty")
        require(
            resolve_path(self.output_dir).resolve() != resolve_path(self.checkpoint_dir).resolve(),  # type: ignore[arg-type]
            "output_dir is checkpoint_dir: the quantized model would replace the original; choose another output_dir",
        )
        require(
            resolve_path(self.checkpoint_dir).resolve() not in resolve_path(self.output_dir).resolve().parents,  # type: ignore[arg-type]
            f"output_dir {self.output_dir} is inside checkpoint_dir={self.checkpoint_dir}: the quantized model would "
            "be written among the original's files; choose an output_dir outside it",
        )


@dataclass
class EvalParams(ParamsIO):
    """Score a checkpoint (plain, quantized, or with a LoRA adapter) on EleutherAI lm-eval tasks."""

    # Model and files
    model: str = param("auto", MODEL_HELP)
    checkpoint_dir: Optional[str] = param(None, "directory with HF or Meta weights, or a quantized one (required)")
    checkpoint_format: CheckpointFormat = param("auto", "format of checkpoint_dir")
    tokenizer_path: Optional[str] = param(
        None, "tokenizer.model (or Llama 3 tokenizer.json) file or dir; none = checkpoint_dir"
    )
    adapter_dir: Optional[str] = param(None, "PEFT-format LoRA adapter to apply on top; none = base model")
    # Tasks
    tasks: list[str] = param([], "harness task names, e.g. [hellaswag, arc_easy], or your own from include_path")
    include_path: Optional[str] = param(None, "folder of your own task YAMLs")
    limit: Optional[float] = param(None, "examples per task: a count, or a fraction below 1; none = all")
    num_fewshot: Optional[int] = param(None, "examples shown before each question; none = each task's default")
    max_gen_toks: int = param(256, "generation tasks: new tokens per answer unless the task sets its own")
    # Hardware and output
    batch_size: int = param(8, "requests scored or generated together")
    max_seq_len: Optional[int] = param(None, "longest context the model sees; none = the model's, at most 4096")
    device: Device = param("auto", "auto = cuda when available")
    dtype: Dtype = param("auto", "auto = bf16 on GPU, fp32 on CPU")
    output_path: Optional[str] = param(
        None, "also write the harness's results to this .json file, or results.json in this folder/"
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        check_choice("model", self.model, (*MODEL_NAMES, "auto"))
        require(
            self.checkpoint_dir is not None,
            "checkpoint_dir is required; set it to the directory with the model weights",
        )
        require(bool(self.tasks), "tasks is empty; name at least one task, e.g. tasks=[hellaswag]")
        require(all(t.strip() for t in self.tasks), "tasks holds an empty name; remove it")
        require(self.limit is None or self.limit > 0, f"limit={self.limit} must be positive (or none for all examples)")
        require(
            self.num_fewshot is None or self.num_fewshot >= 0,
            f"num_fewshot={self.num_fewshot} must be 0 or more (or none)",
        )
        require(self.max_gen_toks >= 1, f"max_gen_toks={self.max_gen_toks} must be at least 1")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")
        require(
            self.max_seq_len is None or self.max_seq_len >= 2,
            f"max_seq_len={self.max_seq_len} must be at least 2 (or none)",
        )
        require(self.output_path is None or bool(self.output_path.strip()), "output_path must not be empty (or none)")
