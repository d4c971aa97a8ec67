"""Training-step speed and memory of the model families side by side on CPU, and Llama before and
after the family switches were added.

    python benchmarks/bench_families.py --old-tree /tmp/finetune_before --repeats 3

Each measurement is a fresh process (one torch thread) that builds a model from random weights
and trains it on random tokens: forward, cross-entropy over every position, backward, AdamW step.
The configurations alternate (llama, qwen3, ..., llama, qwen3, ...) so that slow phases of a shared
machine hit all alike; results are medians over the repeats.

    tokens/s   batch * seq_len / CPU seconds per timed step (process time, so other processes on
               the machine do not count; with one thread it is the step's own work)
    memory     peak resident set (VmHWM) after two training steps minus the resident set after
               imports: what the model, its gradients, optimizer state and activations took. Taken
               in a run of its own with glibc's mmap threshold fixed at 64 KiB
               (MALLOC_MMAP_THRESHOLD_), so every freed tensor goes back to the system at once and
               the peak is the peak of live memory, the same from run to run; with the default
               allocator the figure varies by several percent between identical runs. The speed
               runs keep the default allocator.
    saved      bytes the forward keeps for backward (activations, parameters excluded), counted
               exactly with saved-tensor hooks in one extra forward before the timed steps

Shapes: every family at the same dim / layers / heads / MLP width, so their parameter counts are
equal up to norms (Qwen 3's q/k norms, Gemma 3's extra norms) and biases (Qwen 2.5). Gemma 3 ties
its embeddings, so it is compared with a Llama of tied embeddings (llama_tied). Gemma 3's and the
sliding Mistral's windows are shorter than the sequence, so their masked layers really run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPE = dict(vocab_size=8192, dim=512, n_layers=6, n_heads=8, n_kv_heads=4, hidden_dim=1536, max_seq_len=1024)
WINDOW = 128
GEMMA_TYPES = ["sliding_attention"] * 5 + ["full_attention"]
VARIANTS = {
    "llama": dict(family="llama2"),
    "llama_tied": dict(family="llama2", tie_embeddings=True),
    "qwen2_5": dict(family="qwen2", qkv_bias=True, norm_eps=1e-6, rope_theta=1e6),
    "qwen3": dict(family="qwen3", qk_norm=True, norm_eps=1e-6, rope_theta=1e6),
    "gemma3": dict(
        family="gemma3",
        tie_embeddings=True,
        qk_norm=True,
        norm_plus_one=True,
        sandwich_norms=True,
        mlp_activation="gelu_tanh",
        scale_embeddings=True,
        query_pre_attn_scalar=64.0,
        sliding_window=WINDOW,
        layer_types=GEMMA_TYPES,
        local_rope_theta=10_000.0,
        rope_theta=1e6,
    ),
}

CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
from finetune.models import ModelArgs, build_model, num_params
spec = json.loads(sys.argv[1])
base_rss = rss("VmRSS")
torch.manual_seed(0)
model = build_model(ModelArgs(**spec["args"]))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
tokens = torch.randint(0, spec["args"]["vocab_size"], (spec["batch"], spec["seq_len"] + 1))
inputs, labels = tokens[:, :-1], tokens[:, 1:]
storages = {}
def keep(t):
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
    F.cross_entropy(model(inputs).flatten(0, 1).float(), labels.flatten())
weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
saved = sum(n for ptr, n in storages.items() if ptr not in weights)
times = []
for step in range(spec["warmup"] + spec["steps"]):
    start = time.process_time()
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step >= spec["warmup"]:
        times.append(time.process_time() - start)
print(json.dumps({"params": num_params(model), "step_cpu_s": times, "memory": rss("VmHWM") - base_rss, "saved": saved}))
"""


def measure(tree: Path, args: dict, batch: int, seq_len: int, warmup: int, steps: int, exact_memory: bool) -> dict:
    spec = {"args": args, "batch": batch, "seq_len": seq_len, "warmup": warmup, "steps": steps}
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    if exact_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = batch * seq_len / statistics.median(result["step_cpu_s"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-tree", type=Path, help="a checkout of the code before the family switches")
    parser.add_argument("--variants", default="llama,qwen3,llama_tied,gemma3,qwen2_5")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    cells = [(name, REPO, {**SHAPE, **VARIANTS[name]}) for name in opts.variants.split(",")]
    if opts.old_tree is not None:
        cells.append(("llama_before", opts.old_tree, {**SHAPE, **VARIANTS["llama"]}))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in cells}
    for repeat in range(opts.repeats):
        for name, tree, args in cells:
            result = measure(tree, args, opts.batch, opts.seq_len, opts.warmup, opts.steps, exact_memory=False)
            result["memory"] = measure(tree, args, opts.batch, opts.seq_len, 1, 1, exact_memory=True)["memory"]
            runs[name].append(result)
            print(
                f"repeat {repeat + 1} {name}: {result['tokens_per_s']:.0f} tokens/s, "
                f"{result['memory'] / 2**20:.0f} MiB",
                file=sys.stderr,
            )
    reference = {"qwen3": "llama", "qwen2_5": "llama", "gemma3": "llama_tied", "llama_before": "llama"}
    print("| model | parameters | tokens/s (CPU time) | memory MiB | saved MiB | vs |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, results in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in results)
        mem = statistics.median(r["memory"] for r in results)
        summary[name] = (results[0]["params"], tps, mem, results[0]["saved"])
    for name, (params, tps, mem, saved) in summary.items():
        ref = reference.get(name)
        versus = ""
        if ref in summary:
            _, ref_tps, ref_mem, ref_saved = summary[ref]
            versus = (
                f"{ref}: {tps / ref_tps:.3f}x tokens/s, {mem / ref_mem:.3f}x memory, {saved / ref_saved:.3f}x saved"
            )
        print(f"| {name} | {params:,} | {tps:.0f} | {mem / 2**20:.0f} | {saved / 2**20:.0f} | {versus} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
