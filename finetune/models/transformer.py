"""A Llama-family decoder: RMSNorm, grouped-query attention with rotary embeddings and an
optional KV cache, and a SwiGLU MLP.

Mistral, Qwen 2.5, Qwen 3 and Gemma 3 are the same blocks with the switches `ModelArgs` names:
q/k/v biases, per-head q/k norms, (1 + w) norms, norms after attention and MLP, a tanh-GELU
gate, scaled embeddings, and layers that attend only within a sliding window with their own
rotary base. With every switch off (Llama) the computation is exactly Llama's.

Submodule names are part of the contract: checkpoint key mapping, LoRA and FSDP wrapping
address modules by these names, and LoRA swaps the `nn.Linear` children for its own modules,
which is why the linears are always called, never used through their `.weight`.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from finetune.models.args import ModelArgs
from finetune.models.rope import RotaryEmbedding, apply_rotary


class _LeanRMSNorm(torch.autograd.Function):
    """RMSNorm that keeps only its input and 1/rms for backward and recomputes the normed values
    there: one saved tensor per norm instead of three. Used by the norms the other families add to
    Llama's (q/k norms, sandwich norms, Gemma's (1 + w) norms), so their extra activations stay small."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = x32 * rstd
        out = (normed * (1.0 + weight.float())).type_as(x) if plus_one else normed.type_as(x) * weight
        ctx.save_for_backward(x, weight, rstd)
        ctx.plus_one = plus_one
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad32 = grad.float()
        if ctx.plus_one:
            scale, weight_input = 1.0 + weight.float(), normed
        else:
            scale, weight_input = weight.float(), normed.type_as(x).float()
        grad_weight = (grad32 * weight_input).reshape(-1, x.shape[-1]).sum(0)
        grad_normed = grad32 * scale
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.type_as(x), grad_weight.to(weight.dtype), None, None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back to the input dtype.

    With `plus_one` (Gemma) the scale is (1 + weight), applied in fp32 before the cast, and the
    weight starts at zero: that is how Gemma checkpoints store it. `lean` norms save less for
    backward (`_LeanRMSNorm`); Llama's own norms keep plain autograd.
    """

    def __init__(self, dim: int, eps: float = 1e-5, plus_one: bool = False, lean: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.lean = lean or plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean:
            return _LeanRMSNorm.apply(x, self.weight, self.eps, self.plus_one)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        if self.plus_one:
            nn.init.zeros_(self.weight)
        else:
            nn.init.ones_(self.weight)


class KVCache(nn.Module):
    """Keys and values of past positions, [batch, n_kv_heads, max_seq_len, head_dim].

    The buffers are non-persistent so caches never leak into checkpoints.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: Optional[torch.device],
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [b, n_kv, s, hd] at cache positions `input_pos` [s]; return the whole cache."""
        batch = k.shape[0]
        if batch > self.k_cache.shape[0]:
            raise ValueError(f"batch of {batch} exceeds the cache's batch size {self.k_cache.shape[0]}")
        self.k_cache[:batch, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:batch, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache[:batch], self.v_cache[:batch]


class LivePositions(NamedTuple):
    """The positions of a [batch, seq_len] layout that are computed, as flat indices.

    With it the residual stream holds only these rows ([n, dim]): every projection, norm and MLP
    skips the others, and attention scatters its rows back into the [batch, seq_len] layout,
    where a skipped position is a zero vector that no live query attends to.
    """

    index: torch.Tensor  # [n] int64 into batch * seq_len
    batch: int
    seq_len: int

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq_len, ...] -> [n, ...]"""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[n, c] -> [batch, seq_len, c], zeros at the skipped positions."""
        full = x.new_zeros(self.batch * self.seq_len, x.shape[-1])
        return full.index_copy(0, self.index, x).view(self.batch, self.seq_len, x.shape[-1])


def live_positions(labels: torch.Tensor, ignore_index: int = -100) -> LivePositions:
    """Positions that reach the loss: each row up to its last trained label.

    Under causal attention a position only influences later ones, so everything after a row's
    last trained label (its padding, a trailing prompt) changes neither the loss nor any
    gradient: skipping it is exact.
    """
    batch, seq_len = labels.shape
    trained = (labels != ignore_index).int()
    live = trained.flip(1).cummax(dim=1).values.flip(1).bool()
    return LivePositions(live.flatten().nonzero().squeeze(1), batch, seq_len)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, through SDPA.

    `q_norm`/`k_norm` (Qwen 3, Gemma 3) norm each head's query and key before rotary; `scale`
    replaces SDPA's 1/sqrt(head_dim) when the family sets its own (Gemma 3).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.output_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_plus_one, lean=True)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_plus_one, lean=True)
        else:
            self.q_norm = self.k_norm = None
        self.scale = None if args.query_pre_attn_scalar is None else args.query_pre_attn_scalar**-0.5
        self.kv_cache: Optional[KVCache] = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        live: Optional[LivePositions] = None,
    ) -> torch.Tensor:
        """x [b, s, dim], or [n, dim] with `live`; mask [b, s, kv_len] bool (True = may attend) or
        None for plain causal."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if live is not None:
            q, k, v = live.unpack(q), live.unpack(k), live.unpack(v)
        batch, seq_len, _ = q.shape
        q = q.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        if live is not None:
            out = live.pack(out)
        return self.output_proj(out)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": _gelu_tanh}


class FeedForward(nn.Module):
    """Gated MLP: w2(act(w1(x)) * w3(x)); w1 is the gate, w3 the up and w2 the down projection.
    act is SiLU (SwiGLU) or, for Gemma, tanh-approximated GELU (GeGLU)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu") -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(sa_norm(x)), then + mlp(mlp_norm(x)).

    With sandwich norms (Gemma 3) each branch's output is normed again before it is added:
    x + post_attn_norm(attn(sa_norm(x))), then + post_mlp_norm(mlp(mlp_norm(x))).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.sa_norm = RMSNorm(args.dim, args.norm_eps, args.norm_plus_one)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps, args.norm_plus_one)
        self.mlp = FeedForward(args.dim, args.hidden_dim, args.mlp_activation)
        if args.sandwich_norms:
            self.post_attn_norm = RMSNorm(args.dim, args.norm_eps, args.norm_plus_one, lean=True)
            self.post_mlp_norm = RMSNorm(args.dim, args.norm_eps, args.norm_plus_one, lean=True)
        else:
            self.post_attn_norm = self.post_mlp_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        live: Optional[LivePositions] = None,
    ) -> torch.Tensor:
        if self.post_attn_norm is None:
            h = x + self.attn(self.sa_norm(x), rope, mask, input_pos, live)
            return h + self.mlp(self.mlp_norm(h))
        h = x + self.post_attn_norm(self.attn(self.sa_norm(x), rope, mask, input_pos, live))
        return h + self.post_mlp_norm(self.mlp(self.mlp_norm(h)))


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, s, s] bool: attend to earlier-or-same positions of the same document."""
    seq_len = document_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return causal[None] & same_document


def sliding_window_mask(
    mask: Optional[torch.Tensor], query_index: torch.Tensor, kv_len: int, window: int
) -> torch.Tensor:
    """`mask` ([b, s, kv_len] bool, or None for plain causal) narrowed to keys fewer than `window`
    positions behind their query; query_index [s] holds the queries' places in the key sequence."""
    key_index = torch.arange(kv_len, device=query_index.device)
    distance = query_index[:, None] - key_index[None, :]
    band = distance < window
    if mask is None:
        return (band & (distance >= 0))[None]
    return mask & band[None]


def positions_within_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> positions counted from the start of each document (a new document
    starts wherever the id changes)."""
    batch, seq_len = document_ids.shape
    index = torch.arange(seq_len, device=document_ids.device).expand(batch, seq_len)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


class TransformerDecoder(nn.Module):
    """Token embeddings, `n_layers` TransformerLayers, a final RMSNorm and the output projection.

    With tied embeddings (Llama 3.2) `output.weight` is the very Parameter `tok_embeddings.weight`;
    call `tie_weights()` again after anything that replaces parameters (`to_empty`, assign-loads).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # Passing the weight skips nn.Embedding's own N(0, 1) init: reset_parameters() sets ours,
        # and on the meta device an init op would pull in heavy tracing machinery for nothing.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(TransformerLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_plus_one)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        # Gemma 3's sliding layers turn at their own, unscaled base.
        self.local_rope = (
            RotaryEmbedding(args.head_dim, args.local_rope_theta)
            if args.local_rope_theta is not None and args.layer_types is not None
            else None
        )
        self.embedding_scale = args.dim**0.5 if args.scale_embeddings else None
        self.tie_weights()
        self.reset_parameters()

    # ----- parameters and buffers -----

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init: N(0, std) for embeddings and linears, ones for norms, so that a fresh model
        starts near uniform predictions. Skipped on the meta device, where there is nothing to fill."""
        if self.tok_embeddings.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_rope(self, device: Optional[torch.device] = None) -> None:
        """Recompute the rotary buffer, e.g. after a meta-device build; defaults to the embedding's device."""
        device = device if device is not None else self.tok_embeddings.weight.device
        self.rope.reset_parameters(device)
        if self.local_rope is not None:
            self.local_rope.reset_parameters(device)

    # ----- KV cache -----

    def setup_caches(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        """Allocate a KV cache per layer; then every forward must pass `input_pos`."""
        weight = self.tok_embeddings.weight
        dtype = dtype if dtype is not None else weight.dtype
        device = device if device is not None else weight.device
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(
                batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim, dtype, device
            )

    def caches_are_enabled(self) -> bool:
        return self.layers[0].attn.kv_cache is not None

    def reset_caches(self) -> None:
        if not self.caches_are_enabled():
            raise RuntimeError("reset_caches() called before setup_caches()")
        for layer in self.layers:
            layer.attn.kv_cache.reset()

    def remove_caches(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None

    # ----- forward -----

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        live: Optional[LivePositions] = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab], or the final normed hidden states [b, s, dim].

        position_ids [b, s]: rotary positions (default: 0..s-1, restarting per document when
            `document_ids` is given, or `input_pos` with a cache).
        document_ids [b, s]: packed rows; tokens attend only to earlier tokens of their document.
        mask [b, s, kv_len] bool, True = may attend: replaces the causal/document mask entirely;
            with a cache kv_len is the cache length.
        input_pos [s]: cache positions written by this call (required when caches are enabled).
        live: compute only these positions (`live_positions(labels)`); the result is then
            [n, vocab] or [n, dim], one row per live position in row-major order.
        """
        if live is not None and self.caches_are_enabled():
            raise ValueError("live positions cannot be combined with a KV cache")
        mask, position_ids = self._mask_and_positions(tokens, position_ids, document_ids, mask, input_pos)
        h = self.tok_embeddings(tokens if live is None else live.pack(tokens))
        if self.embedding_scale is not None:
            h = h * torch.tensor(self.embedding_scale, dtype=h.dtype)
        rope = self.rope(position_ids, h.dtype)
        if self.args.layer_types is None:
            for layer in self.layers:
                h = layer(h, rope, mask, input_pos, live)
        else:
            local_rope = rope if self.local_rope is None else self.local_rope(position_ids, h.dtype)
            local_mask = self._local_mask(mask, tokens.shape[1], input_pos)
            for index, layer in enumerate(self.layers):
                if self.args.is_sliding(index):
                    h = layer(h, local_rope, local_mask, input_pos, live)
                else:
                    h = layer(h, rope, mask, input_pos, live)
        h = self.norm(h)
        return h if return_hidden else self.output(h)

    def _local_mask(
        self, mask: Optional[torch.Tensor], seq_len: int, input_pos: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """The mask of the sliding-window layers; None (plain causal) when the window covers everything."""
        window = self.args.sliding_window
        if self.caches_are_enabled():
            return sliding_window_mask(mask, input_pos, mask.shape[-1], window)
        if mask is None and seq_len <= window:
            return None
        query_index = torch.arange(seq_len, device=self.tok_embeddings.weight.device)
        return sliding_window_mask(mask, query_index, seq_len, window)

    def _mask_and_positions(
        self,
        tokens: torch.Tensor,
        position_ids: Optional[torch.Tensor],
        document_ids: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        input_pos: Optional[torch.Tensor],
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        batch, seq_len = tokens.shape
        device = tokens.device
        if self.caches_are_enabled():
            if input_pos is None:
                raise ValueError("input_pos is required when KV caches are enabled")
            if document_ids is not None:
                raise ValueError("document_ids (packed rows) cannot be combined with a KV cache")
            if position_ids is None:
                position_ids = input_pos[None].expand(batch, seq_len)
            if mask is None:
                cache_len = self.layers[0].attn.kv_cache.max_seq_len
                cache_positions = torch.arange(cache_len, device=device)
                mask = (cache_positions[None, :] <= input_pos[:, None])[None].expand(batch, seq_len, cache_len)
            return mask, position_ids
        if input_pos is not None and position_ids is None:
            position_ids = input_pos[None].expand(batch, seq_len)
        if document_ids is not None:
            if position_ids is None:
                position_ids = positions_within_documents(document_ids)
            if mask is None:
                mask = document_causal_mask(document_ids)
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device)[None].expand(batch, seq_len)
        return mask, position_ids
