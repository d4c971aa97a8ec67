"""Quantize a Llama-family checkpoint with torchao and measure what it costs.

Read it top to bottom: `setup` reads the architecture, the tokenizer and the data (so bad
input fails before any weight is read), `quantize` loads the model, measures perplexity on
held-out data, quantizes the linear layers (int8 weight-only, int8 dynamic activations with
int8 weights, int4 weight-only, or GPTQ int4 calibrated on the user's data), measures again,
and writes a self-describing quantized checkpoint that `tune generate` and `tune eleuther_eval`
load. The report gives size on disk and perplexity before and after.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import torch

from finetune.checkpointing import load_model
from finetune.checkpointing.atomic import atomic_directory
from finetune.checkpointing.model_configs import resolve_model_args
from finetune.checkpointing.quantized import (
    is_quantized_checkpoint,
    read_quantization_record,
    save_quantized_checkpoint,
    weights_size,
)
from finetune.checkpointing.writers import hf_output_extras
from finetune.data import build_dataset
from finetune.errors import UserError
from finetune.evaluation.perplexity import perplexity
from finetune.inference import tokenizer_location
from finetune.models import num_params
from finetune.params import QuantizeParams, resolve_path
from finetune.quantization import GROUPED_SCHEMES, check_scheme_device, quantize_model
from finetune.recipes import recipe_main, run_once
from finetune.tokenizers.loader import load_tokenizer_for_model, resolve_tokenizer_path
from finetune.training.distributed import resolve_device
from finetune.training.precision import resolve_run_dtype

PARAMS_CLASS = QuantizeParams


class QuantizeRecipe:
    """Load a checkpoint, quantize it, measure it, save it."""

    def __init__(self, params: QuantizeParams) -> None:
        self.params = params

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        p = self.params
        p.check()  # a notebook may have changed a field since the params were built
        self.device = resolve_device(p.device)
        self.dtype = resolve_run_dtype(p.dtype, self.device)
        self.checkpoint_dir = resolve_path(p.checkpoint_dir)  # type: ignore[arg-type]
        if is_quantized_checkpoint(self.checkpoint_dir):
            scheme = read_quantization_record(self.checkpoint_dir)["scheme"]
            raise UserError(
                f"checkpoint_dir {self.checkpoint_dir} is already quantized ({scheme}); "
                "quantize the original checkpoint instead"
            )
        check_scheme_device(p.scheme, self.device, self.dtype)
        self.output_dir = resolve_path(p.output_dir)
        self._check_output_dir()
        self.model_args = resolve_model_args(self.params.model, self.checkpoint_dir, self.params.checkpoint_format)
        self.tokenizer_file = resolve_tokenizer_path(tokenizer_location(p.tokenizer_path, self.checkpoint_dir))
        self.tokenizer = load_tokenizer_for_model(
            self.tokenizer_file, self.model_args.family, self.model_args.vocab_size
        )
        self.eval_samples = self._eval_samples()
        self.calibration = self._calibration_samples()

    def _check_output_dir(self) -> None:
        out = self.output_dir
        # The directory is replaced whole: never an unrelated one (say, a training run's output).
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_quantized_checkpoint(out))):
            raise UserError(
                f"output_dir {out} exists and is not a quantized checkpoint; choose a new directory or delete it"
            )

    def _dataset(self, source: str, train_on_input: bool) -> Any:
        p = self.params
        return build_dataset(
            str(resolve_path(source)) if source.startswith("pkg:") else source,
            dataset_type=p.dataset_type,
            tokenizer=self.tokenizer,
            template=p.template,
            max_seq_len=min(p.max_seq_len, self.model_args.max_seq_len),
            train_on_input=train_on_input,
            log=self.log,
        )

    def _eval_samples(self) -> list[dict[str, list[int]]]:
        p = self.params
        if p.eval_dataset is None:
            return []
        # Responses only for instruct and chat data: the same tokens a fine-tune's eval loss counts.
        dataset = self._dataset(p.eval_dataset, train_on_input=False)
        count = len(dataset) if p.eval_max_samples is None else min(len(dataset), p.eval_max_samples)
        return [dataset[i] for i in range(count)]

    def _calibration_samples(self) -> list[torch.Tensor]:
        p = self.params
        if p.scheme != "gptq_int4":
            return []
        assert p.calibration_dataset is not None  # params validation guarantees it
        # Prompts too: GPTQ needs the inputs the layers see, not what the loss is taken on.
        dataset = self._dataset(p.calibration_dataset, train_on_input=True)
        generator = torch.Generator().manual_seed(p.seed)
        order = torch.randperm(len(dataset), generator=generator)[: p.calibration_samples].tolist()
        if len(order) < p.calibration_samples:
            self.log(
                f"calibration_dataset has {len(order)} samples, "
                f"fewer than calibration_samples={p.calibration_samples}: using all"
            )
        return [torch.tensor(dataset[i]["tokens"], device=self.device) for i in order]

    # ------------------------------------------------------------------------------------------
    # Quantization
    # ------------------------------------------------------------------------------------------

    def quantize(self) -> dict[str, Any]:
        """Measure, quantize, measure, save; returns what was written to quantization.json."""
        p = self.params
        model, _ = load_model(
            self.checkpoint_dir,
            self.model_args,
            checkpoint_format=p.checkpoint_format,
            device=self.device,
            dtype=self.dtype,
        )
        model.eval()
        self.log(f"model from {self.checkpoint_dir}: {num_params(model):,} parameters on {self.device} in {self.dtype}")
        before = self._perplexity(model, "before")

        started = time.perf_counter()
        layers = quantize_model(model, p.scheme, group_size=p.group_size, calibration=self.calibration, log=self.log)
        self.log(f"quantized {len(layers)} linear layers with {p.scheme} in {time.perf_counter() - started:.1f} s")
        after = self._perplexity(model, "after")

        grouped = p.scheme in GROUPED_SCHEMES
        record: dict[str, Any] = {
            "scheme": p.scheme,
            "group_size": p.group_size if grouped else None,
            "source_checkpoint": str(self.checkpoint_dir),
            "source_size_bytes": weights_size(self.checkpoint_dir),
            "quantized_layers": layers,
            "calibration": {"dataset": p.calibration_dataset, "samples": len(self.calibration)}
            if self.calibration
            else None,
            "perplexity": None
            if before is None
            else {
                "dataset": p.eval_dataset,
                "tokens": before[1],
                "before": before[0],
                "after": after[0] if after else None,
            },
        }
        with atomic_directory(self.output_dir) as tmp:
            extras = hf_output_extras(
                self.checkpoint_dir,
                self.tokenizer_file,
                self.tokenizer.bos_id,
                self.tokenizer.stop_tokens,
                self.tokenizer.family,
            )
            save_quantized_checkpoint(model, tmp, record, **extras)
        record = read_quantization_record(self.output_dir)
        self._report(record)
        return record

    def _perplexity(self, model: torch.nn.Module, when: str) -> Optional[tuple[float, int]]:
        if not self.eval_samples:
            return None
        started = time.perf_counter()
        result = perplexity(model, self.eval_samples, batch_size=self.params.batch_size, pad_id=self.tokenizer.pad_id)
        self.log(f"perplexity {when}: {result[0]:.4f} on {result[1]} tokens ({time.perf_counter() - started:.1f} s)")
        return result

    def _report(self, record: dict[str, Any]) -> None:
        p = self.params
        grouped = f" (group size {record['group_size']})" if record["group_size"] else ""
        source, size = record["source_size_bytes"], record["size_bytes"]
        lines = [
            f"scheme        {p.scheme}{grouped}, torchao {record['torchao_version']}, "
            f"{record['dtype']} on {self.device.type}",
            f"size on disk  {format_bytes(source)} -> {format_bytes(size)} ({source / size:.2f}x smaller)",
        ]
        ppl = record["perplexity"]
        if ppl is not None:
            change = 100 * (ppl["after"] / ppl["before"] - 1)
            lines.append(
                f"perplexity    {ppl['before']:.4f} -> {ppl['after']:.4f} ({change:+.2f}%) on {ppl['tokens']} tokens "
                f"of {ppl['dataset']}"
            )
        lines.append(f"saved         {self.output_dir}")
        print("\n".join(lines), flush=True)

    # ------------------------------------------------------------------------------------------
    # The end
    # ------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        pass

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def format_bytes(n: int) -> str:
    """A size for people: 812 B, 2.3 MiB, 15.0 GiB."""
    if n < 1024:
        return f"{n} B"
    size, unit = next((n / 1024**k, u) for k, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if n >= 1024**k)
    return f"{size:.1f} {unit}"


def _run(params: QuantizeParams) -> int:
    recipe = QuantizeRecipe(params)
    return run_once(recipe, recipe.quantize)


main = recipe_main(PARAMS_CLASS, "tune quantize", _run)

if __name__ == "__main__":
    sys.exit(main())
