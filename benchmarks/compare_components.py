"""Our model's building blocks against torchtune's, timed in one process, interleaved.

    .venv-torchtune/bin/python benchmarks/compare_components.py --model 100m --batch-size 2 --seq-len 256

Whole-recipe runs on a shared CPU are too noisy to say *where* two step times differ: other
jobs come and go between runs. Here both libraries' modules live in the same process (the
torchtune venv, with this repository on sys.path), hold the same weights (our HF checkpoint,
converted with torchtune's own `hf_to_tune`), get the same inputs, and are timed alternately
(ours, theirs, theirs, ours, ...) many times; medians are reported. Every block is timed
forward + backward, as training runs it. The optimizer section times one AdamW step over the
full model's parameters in torch's three CPU implementations (for-loop, foreach, fused).

The model's logits are compared first, so the timings are known to be of equivalent computations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import bench_cells as bench  # noqa: E402

from finetune.checkpointing import load_state_dict  # noqa: E402
from finetune.models import TransformerDecoder  # noqa: E402
from finetune.models.rope import apply_rotary  # noqa: E402
from finetune.training.loss import chunked_cross_entropy  # noqa: E402

Fn = Callable[[], None]


def timed(fn: Fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(fns: dict[str, Fn], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in rotating order each round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(timed(fns[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def fwd_bwd(module_call: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> Fn:
    def run() -> None:
        out = module_call()
        out.sum().backward() if out.dim() else out.backward()
        for p in params:
            p.grad = None

    return run


def build_models(spec: bench.ModelSpec, ckpt: Path) -> tuple[TransformerDecoder, torch.nn.Module]:
    from safetensors.torch import load_file
    from torchtune.models import convert_weights
    from torchtune.models.llama2 import llama2

    a = spec.args
    with torch.device("meta"):
        ours = TransformerDecoder(a)
    ours.load_state_dict(load_state_dict(ckpt, a, checkpoint_format="hf", dtype=torch.float32), assign=True)
    ours.tie_weights()
    ours.init_rope(torch.device("cpu"))
    theirs = llama2(
        vocab_size=a.vocab_size,
        num_layers=a.n_layers,
        num_heads=a.n_heads,
        num_kv_heads=a.n_kv_heads,
        embed_dim=a.dim,
        max_seq_len=a.max_seq_len,
        intermediate_dim=a.hidden_dim,
        norm_eps=a.norm_eps,
        rope_base=a.rope_theta,
    )
    hf = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        hf.update(load_file(f))
    theirs.load_state_dict(convert_weights.hf_to_tune(hf, num_heads=a.n_heads, num_kv_heads=a.n_kv_heads, dim=a.dim))
    return ours, theirs


def report(title: str, rows: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        f"{title}",
        "",
        "| block (forward + backward) | ours ms | torchtune ms | ours / torchtune |",
        "|---|---:|---:|---:|",
    ]
    for block, t in rows.items():
        lines.append(
            f"| {block} | {1e3 * t['ours']:.1f} | {1e3 * t['torchtune']:.1f} | {t['ours'] / t['torchtune']:.2f} |"
        )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="100m", choices=("tiny", "100m"))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7, help="timed calls per block and library")
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench")
    p.add_argument("--ideas", action="store_true", help="also time alternatives to parts of our step")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    spec = bench.model_spec(args.model)
    work = args.work_dir / spec.name
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = bench.prepare_tokenizer(spec, work)
    ckpt = work / "checkpoint_fp32"
    bench.write_checkpoint(spec, tokenizer, ckpt, torch.float32, "cpu")
    ours, theirs = build_models(spec, ckpt)
    theirs.set_num_output_chunks(8)
    a, b, s = spec.args, args.batch_size, args.seq_len
    tokens = torch.randint(3, a.vocab_size, (b, s))
    labels = torch.cat([tokens[:, 1:], torch.full((b, 1), -100)], dim=1)

    with torch.no_grad():
        diff = (ours(tokens) - theirs.output(theirs.norm(_tt_hidden(theirs, tokens)))).abs().max().item()
    print(f"max |logits difference| ours vs torchtune: {diff:.2e}")

    # ---- whole model: forward, chunked loss, backward ----
    ours_params = list(ours.parameters())
    theirs_params = list(theirs.parameters())
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    tt_loss = CEWithChunkedOutputLoss(num_output_chunks=8)
    n_tokens = (labels != -100).sum()

    def ours_model() -> torch.Tensor:
        hidden = ours(tokens, return_hidden=True)
        return chunked_cross_entropy(hidden, ours.output, labels, num_chunks=8) / n_tokens

    def theirs_model() -> torch.Tensor:
        return tt_loss(theirs(tokens), labels)

    rows: dict[str, dict[str, float]] = {}
    rows["whole model + chunked loss"] = interleave(
        {"ours": fwd_bwd(ours_model, ours_params), "torchtune": fwd_bwd(theirs_model, theirs_params)}, args.rounds
    )

    # ---- blocks of one layer, on activations of the right shape ----
    x = torch.randn(b, s, a.dim, requires_grad=True)
    ol, tl = ours.layers[0], theirs.layers[0]
    positions = torch.arange(s)[None].expand(b, s)

    def ours_layer() -> torch.Tensor:
        return ol(x, ours.rope(positions, x.dtype))

    rows["decoder layer (ours incl. its rope tables)"] = interleave(
        {
            "ours": fwd_bwd(ours_layer, [x, *ol.parameters()]),
            "torchtune": fwd_bwd(lambda: tl(x), [x, *tl.parameters()]),
        },
        args.rounds,
    )
    rows["attention (projections, rope, SDPA)"] = interleave(
        {
            "ours": fwd_bwd(lambda: ol.attn(x, ours.rope(positions, x.dtype)), [x, *ol.attn.parameters()]),
            "torchtune": fwd_bwd(lambda: tl.attn(x, x), [x, *tl.attn.parameters()]),
        },
        args.rounds,
    )
    rows["MLP (SwiGLU)"] = interleave(
        {
            "ours": fwd_bwd(lambda: ol.mlp(x), [x, *ol.mlp.parameters()]),
            "torchtune": fwd_bwd(lambda: tl.mlp(x), [x, *tl.mlp.parameters()]),
        },
        args.rounds,
    )
    rows["RMSNorm"] = interleave(
        {
            "ours": fwd_bwd(lambda: ol.sa_norm(x), [x, *ol.sa_norm.parameters()]),
            "torchtune": fwd_bwd(lambda: tl.sa_norm(x), [x, *tl.sa_norm.parameters()]),
        },
        args.rounds * 3,
    )
    q = torch.randn(b, a.n_heads, s, a.head_dim, requires_grad=True)
    q_tt = q.detach().transpose(1, 2).contiguous().requires_grad_(True)
    rows["RoPE on q (tables included)"] = interleave(
        {
            "ours": fwd_bwd(lambda: apply_rotary(q, *ours.rope(positions, q.dtype)), [q]),
            "torchtune": fwd_bwd(lambda: tl.attn.pos_embeddings(q_tt), [q_tt]),
        },
        args.rounds * 3,
    )
    h = torch.randn(b, s, a.dim, requires_grad=True)
    rows["output head + chunked cross-entropy"] = interleave(
        {
            "ours": fwd_bwd(
                lambda: chunked_cross_entropy(h, ours.output, labels, num_chunks=8) / n_tokens,
                [h, *ours.output.parameters()],
            ),
            "torchtune": fwd_bwd(
                lambda: tt_loss([theirs.output(c) for c in h.chunk(8, dim=1)], labels), [h, *theirs.output.parameters()]
            ),
        },
        args.rounds,
    )
    lines = report(
        f"Blocks, {spec.name}, batch {b} x seq {s}, fp32, {torch.get_num_threads()} threads, median of "
        f"{args.rounds} interleaved calls (RMSNorm, RoPE: {3 * args.rounds})",
        rows,
    )

    # ---- optimizer step and clipping over the whole model's parameters ----
    for prm in ours_params:
        prm.grad = torch.randn_like(prm) * 1e-3
    impls = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {name: torch.optim.AdamW(ours_params, lr=1e-5, weight_decay=0.01, **kw) for name, kw in impls.items()}
    # Each optimizer holds its own state; steps alternate between them on the same tensors.
    opt_times = interleave({name: opt.step for name, opt in optimizers.items()}, args.rounds)
    clip_times = interleave(
        {
            "clip_grad_norm_ (foreach)": lambda: torch.nn.utils.clip_grad_norm_(ours_params, 1.0, foreach=True),
            "scale grads (torchtune loop) + clip": lambda: (
                _scale_grads(ours_params),
                torch.nn.utils.clip_grad_norm_(ours_params, 1.0, foreach=True),
            ),
        },
        args.rounds,
    )
    lines += [
        "",
        f"AdamW step over all {sum(p.numel() for p in ours_params) / 1e6:.0f}M parameters "
        "(median ms; ours and torchtune's configs both use foreach):",
        "",
        "| implementation | ms |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {1e3 * t:.0f} |" for name, t in opt_times.items()]
    lines += [f"| {name} | {1e3 * t:.0f} |" for name, t in clip_times.items()]
    if args.ideas:
        lines += ["", *speedup_candidates(ours, tokens, labels, x, args.rounds)]
    text = "\n".join(lines)
    print(text)
    return 0


def speedup_candidates(
    ours: TransformerDecoder, tokens: torch.Tensor, labels: torch.Tensor, x: torch.Tensor, rounds: int
) -> list[str]:
    """Alternatives to pieces of our step, each timed against what we do now (forward + backward)."""
    a = ours.args
    layer = ours.layers[0]
    h = torch.randn(*tokens.shape, a.dim, requires_grad=True)
    head = [h, *ours.output.parameters()]
    half_masked = labels.clone()
    half_masked[:, : labels.shape[1] // 2] = -100  # a prompt-masked batch: half the labels ignored

    def head_on_trained_rows(lbl: torch.Tensor) -> torch.Tensor:
        keep = lbl.reshape(-1) != -100
        rows = h.reshape(-1, a.dim)[keep]
        return F.cross_entropy(ours.output(rows), lbl.reshape(-1)[keep], reduction="sum")

    wq, wk, wv = (layer.attn.q_proj.weight, layer.attn.k_proj.weight, layer.attn.v_proj.weight)
    w_qkv = torch.cat([wq, wk, wv]).detach().requires_grad_(True)
    w1, w3 = layer.mlp.w1.weight, layer.mlp.w3.weight
    w13 = torch.cat([w1, w3]).detach().requires_grad_(True)
    norm_weight = layer.sa_norm.weight
    candidates = {
        "output head + CE, all labels trained: 8 chunks (now) vs 1 chunk": (
            fwd_bwd(lambda: chunked_cross_entropy(h, ours.output, labels, num_chunks=8), head),
            fwd_bwd(lambda: chunked_cross_entropy(h, ours.output, labels, num_chunks=1), head),
        ),
        "output head + CE, half the labels ignored: 8 chunks (now) vs head on trained rows only": (
            fwd_bwd(lambda: chunked_cross_entropy(h, ours.output, half_masked, num_chunks=8), head),
            fwd_bwd(lambda: head_on_trained_rows(half_masked), head),
        ),
        "RMSNorm: ours (pow/mean/rsqrt) vs F.rms_norm": (
            fwd_bwd(lambda: layer.sa_norm(x), [x, norm_weight]),
            fwd_bwd(lambda: F.rms_norm(x, (a.dim,), norm_weight, layer.sa_norm.eps), [x, norm_weight]),
        ),
        "q, k, v: three matmuls (now) vs one fused weight": (
            fwd_bwd(lambda: torch.cat([F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)], -1), [x, wq, wk, wv]),
            fwd_bwd(lambda: F.linear(x, w_qkv), [x, w_qkv]),
        ),
        "SwiGLU gate and up: two matmuls (now) vs one fused weight": (
            fwd_bwd(lambda: F.silu(F.linear(x, w1)) * F.linear(x, w3), [x, w1, w3]),
            fwd_bwd(lambda: _swiglu_fused(x, w13), [x, w13]),
        ),
    }
    lines = [
        "Candidate speed-ups for our step (median ms, forward + backward, interleaved):",
        "",
        "| change | now ms | candidate ms | saving per call |",
        "|---|---:|---:|---:|",
    ]
    for name, (now, candidate) in candidates.items():
        t = interleave({"now": now, "candidate": candidate}, rounds)
        lines.append(
            f"| {name} | {1e3 * t['now']:.1f} | {1e3 * t['candidate']:.1f} | {1e3 * (t['now'] - t['candidate']):.1f} |"
        )
    return lines


def _swiglu_fused(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.silu(gate) * up


def _scale_grads(params: Sequence[torch.Tensor]) -> None:
    scaler = torch.tensor(1.0)
    for prm in params:
        prm.grad *= scaler


def _tt_hidden(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h)
    return h


if __name__ == "__main__":
    sys.exit(main())
