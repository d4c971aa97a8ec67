"""Peak memory of one LoRA DPO step (the reference is the policy with its adapters off) against
LoRA supervised steps on the same sequences, side by side in one process.

    python benchmarks/dpo_memory.py [--model tiny] [--pairs 8] [--seq-len 128]

Every step is a forward and backward of the same LoRA model on random tokens with the first
half (the prompt) masked: SFT on the B chosen sequences, SFT on all 2B sequences (chosen and
rejected), and DPO on the B pairs, which also runs the reference forward (no gradients) over the
2B sequences. Each case runs in a process of its own and reports how far the step raises the
peak memory above what the model already holds. DPO should need what SFT on 2B
sequences needs: the second response's activations over SFT on B, and no second copy of weights.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch

from finetune.models import model_args
from finetune.models.lora import adapters_disabled, apply_lora, initialize_adapters, set_trainable_params
from finetune.training.model_setup import build_on_cpu, initial_state_dict
from finetune.training.preference import PreferenceLoss, PreferenceObjective, reference_from_model
from finetune.training.steps import accumulate_gradients


def lora_model(name: str, device: torch.device) -> torch.nn.Module:
    args = model_args(name)
    state = initial_state_dict(args, weights_dir=None, checkpoint_format="auto", dtype=torch.float32, seed=0)

    def adapt(model: torch.nn.Module) -> None:
        apply_lora(model, attn_modules=["q_proj", "v_proj"], mlp=False, output=False, rank=8, alpha=16)
        set_trainable_params(model)

    return build_on_cpu(args, state, adapt=adapt, initialize=initialize_adapters).to(device)


def batch(rows: int, seq_len: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    tokens = torch.randint(3, vocab, (rows, seq_len), generator=generator)
    labels = torch.cat([tokens[:, 1:], torch.full((rows, 1), -100)], dim=1)
    labels[:, : seq_len // 2] = -100  # the prompt
    return {"tokens": tokens.to(device), "labels": labels.to(device), "pair_index": torch.arange(rows // 2)}


def step_peak_bytes(step) -> int:  # noqa: ANN001
    """How far the step raises the process's peak memory: CUDA's allocator peak on GPU, the peak
    resident set (ru_maxrss, which only grows) on CPU, where each case runs in its own process."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def run_case(case: str, model_name: str, pairs: int, seq_len: int) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = lora_model(model_name, device)
    data = batch(2 * pairs, seq_len, model.args.vocab_size, device)
    if case in ("dpo", "simpo"):
        objective = PreferenceObjective(
            model,
            PreferenceLoss("sigmoid" if case == "dpo" else "simpo"),
            train_reference=reference_from_model(model, loss_chunks=0, context=lambda: adapters_disabled(model)),
            eval_reference=None,
            device=device,
            world_size=1,
        )
        return step_peak_bytes(lambda: objective.accumulate_gradients([data]))
    rows = pairs if case == "sft_b" else 2 * pairs
    micro = {k: v[:rows] for k, v in data.items() if k != "pair_index"}
    return step_peak_bytes(lambda: accumulate_gradients(model, [micro], device=device, world_size=1, loss_chunks=0))


CASES = {
    "sft_b": "LoRA SFT, the B chosen sequences",
    "sft_2b": "LoRA SFT, all 2B sequences",
    "dpo": "LoRA DPO, B pairs, adapters-off reference",
    "simpo": "LoRA SimPO, B pairs (no reference forward)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, alternating; the median is shown")
    parser.add_argument("--case", choices=tuple(CASES), help="run one case here (the driver starts one process each)")
    args = parser.parse_args()
    if args.case:
        print(run_case(args.case, args.model, args.pairs, args.seq_len))
        return
    runs: dict[str, list[int]] = {case: [] for case in CASES}
    for _ in range(args.repeats):  # alternating, so a busy machine slows every case alike
        for case in CASES:
            command = [sys.executable, __file__, "--case", case, "--model", args.model]
            command += ["--pairs", str(args.pairs), "--seq-len", str(args.seq_len)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[case].append(int(output.strip().splitlines()[-1]))
    results = {case: sorted(values)[len(values) // 2] for case, values in runs.items()}
    where = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.model}, B={args.pairs} pairs of {args.seq_len} tokens, fp32 on {where}: step peak above setup")
    for case, name in CASES.items():
        ratio = results[case] / results["sft_2b"]
        spread = ", ".join(f"{v / 2**20:.0f}" for v in runs[case])
        print(f"{name:<45} {results[case] / 2**20:7.1f} MiB ({ratio:.3f}x SFT on 2B; runs {spread})")


if __name__ == "__main__":
    main()
