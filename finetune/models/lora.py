"""LoRA, DoRA and QLoRA adapters for the decoder's linear layers.

`LoRALinear` replaces an `nn.Linear` and keeps the frozen base weight under the same name
(`.weight`), so base checkpoints load into an adapted model unchanged. Recipes build the model
on the meta device, call `apply_lora`, load the base weights, then `initialize_adapters`; the
model-level functions here (trainable parameters, adapter and merged state dicts) work on any
model that contains `LoRALinear` modules.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from finetune import ao
from finetune.errors import UserError

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
MLP_MODULES = ("w1", "w2", "w3")
# Parameter names inside a LoRALinear that belong to the adapter, not the base layer.
ADAPTER_PARAM_NAMES = ("lora_a.weight", "lora_b.weight", "magnitude")

Device = Union[str, torch.device, None]


def _check_settings(rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"lora_rank={rank!r} must be an integer of at least 1")
    if not alpha > 0:
        raise UserError(f"lora_alpha={alpha!r} must be positive")
    if not 0 <= dropout < 1:
        raise UserError(f"lora_dropout={dropout!r} must be in [0, 1)")


def _frozen_nf4(weight: nn.Parameter, device: Device = None) -> nn.Parameter:
    """`weight` stored as NF4 (frozen), quantized on `device` (default: where it is) and left there;
    unchanged when it already is NF4 or still on meta."""
    if ao.is_nf4(weight) or weight.is_meta:
        return weight
    return nn.Parameter(ao.to_nf4(weight.detach().to(device)), requires_grad=False)


def _frozen_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ao.nf4_linear(x, weight) if ao.is_nf4(weight) else F.linear(x, weight)


class LoRALinear(nn.Module):
    """y = W x + (alpha / rank) * B A dropout(x), with W frozen and A, B trainable.

    With `use_dora`, the adapted weight W' = W + s B A is split into direction and magnitude:
    y = m / ||W'||_row * W' x, where the trainable `magnitude` m starts at ||W||_row. Following the
    DoRA paper (sec. 4.3) and PEFT, ||W'||_row is treated as a constant in backward.

    With `quantize_base`, `quantize_base_weight()` stores W as NF4 (QLoRA); it is dequantized
    block by block inside the matmul, while A, B and m stay in the training dtype.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        quantize_base: bool = False,
        device: Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        _check_settings(rank, alpha, dropout)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.use_dora, self.quantize_base = use_dora, quantize_base
        self.adapter_enabled = True  # off: the base layer alone (a preference run's reference model)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, **factory), requires_grad=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, out_dim, bias=False, **factory)
        if use_dora:
            self.magnitude = nn.Parameter(torch.empty(out_dim, **factory))
        else:
            self.register_parameter("magnitude", None)
        # A biased base (Qwen 2.5's q, k, v) keeps its bias, frozen, outside the adapter's scaling.
        self.register_parameter("bias", None)
        if not self.weight.is_meta:
            # A standalone module gets nn.Linear's default base init; apply_lora swaps in the real weight.
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self.initialize()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **settings) -> "LoRALinear":
        """A LoRALinear holding `linear.weight` (and bias) itself (no copy); adapters initialised unless on meta."""
        weight = linear.weight
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, dtype=weight.dtype, **settings)
        weight.requires_grad_(False)
        module.weight = weight
        if linear.bias is not None:
            module.bias = linear.bias.requires_grad_(False)
        if not weight.is_meta:
            module.adapters_to_empty(weight.device)
            module.initialize()
        return module

    # ----- initialisation -----

    def adapters_to_empty(self, device: Device) -> None:
        """Give the adapter parameters (uninitialised) storage on `device` in the base weight's dtype
        (the run's dtype: the adapter's matmuls take the same input as the base's), leaving the base alone."""
        dtype = self.weight.dtype
        self.lora_a.to_empty(device=device).to(dtype)
        self.lora_b.to_empty(device=device).to(dtype)
        if self.magnitude is not None:
            self.magnitude = nn.Parameter(torch.empty_like(self.magnitude, device=device, dtype=dtype))

    def _adapters_to(self, device: torch.device) -> None:
        self.lora_a.to(device)
        self.lora_b.to(device)
        if self.magnitude is not None and self.magnitude.device != device:
            self.magnitude = nn.Parameter(self.magnitude.detach().to(device))

    def reset_lora_parameters(self) -> None:
        """A like nn.Linear's default, B zero: the adapter starts as an exact no-op."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @torch.no_grad()
    def initialize_dora_magnitude(self) -> None:
        """m = ||W + s B A||_row, which makes the DoRA gain m / ||W'|| exactly 1."""
        if self.magnitude is None:
            raise RuntimeError("initialize_dora_magnitude() on a LoRALinear built without use_dora")
        self.magnitude.copy_(self.weight_norm())

    def quantize_base_weight(self) -> None:
        """Replace the (loaded) base weight by its NF4 form; a no-op when it already is NF4."""
        self.weight = _frozen_nf4(self.weight)

    def initialize(self) -> None:
        """Everything that must follow loading the base weight, in order: quantize it (QLoRA) so the
        DoRA magnitude is measured on the weight the forward will use, then reset the adapters.
        Adapters still on the meta device (the base was assign-loaded) are drawn on the CPU, whatever
        device the base is on (a run starts from the same adapters anywhere), then moved beside it."""
        if self.lora_a.weight.is_meta and not self.weight.is_meta:
            self.adapters_to_empty("cpu")
        if self.quantize_base:
            self.quantize_base_weight()
        self.reset_lora_parameters()
        self._adapters_to(self.weight.device)
        if self.magnitude is not None:
            self.initialize_dora_magnitude()

    # ----- weights -----

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a plain tensor (dequantized when NF4)."""
        return ao.nf4_dequantize(self.weight) if ao.is_nf4(self.weight) else self.weight

    def adapted_weight(self) -> torch.Tensor:
        """W + s B A."""
        delta = self.lora_b.weight @ self.lora_a.weight
        return self.dense_weight() + self.scale * delta.to(self.weight.dtype)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row. Under no_grad: DoRA treats it as a constant in backward."""
        return torch.linalg.vector_norm(self.adapted_weight(), dim=1)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The single plain weight that computes what this module computes (dropout aside)."""
        weight = self.adapted_weight()
        if self.magnitude is not None:
            weight = (self.magnitude / torch.linalg.vector_norm(weight, dim=1))[:, None] * weight
        return weight.to(self.weight.dtype)

    # ----- forward -----

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return _frozen_linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._base(x)
        if not self.adapter_enabled:
            return base
        dropped = self.dropout(x)
        lora = self.lora_b(self.lora_a(dropped)) * self.scale
        if self.magnitude is None:
            return base + lora if self.bias is None else base + lora + self.bias
        gain = self.magnitude / self.weight_norm()
        # m/||W'|| (W + s B A) x written, as PEFT does, as W x plus a correction: with adapter dropout
        # only the correction sees the dropped input, and a gain of exactly 1 leaves W x bit-for-bit.
        base_dropped = base if dropped is x else self._base(dropped)
        out = base + (gain - 1) * base_dropped + gain * lora
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        quantized = ", nf4" if ao.is_nf4(self.weight) else ""
        dora = ", dora" if self.magnitude is not None else ""
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}{dora}{quantized}"


class FrozenNF4Linear(nn.Module):
    """A frozen linear whose weight is stored as NF4 once loaded: under QLoRA every projection of
    the decoder is 4-bit, not only those that carry an adapter. The weight keeps its name
    (`.weight`), so base checkpoints load unchanged; a bias stays in the training dtype."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = bias.requires_grad_(False) if bias is not None else None

    def initialize(self) -> None:
        """Quantize the loaded weight (a no-op on meta or when it already is NF4)."""
        self.weight = _frozen_nf4(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _frozen_linear(x, self.weight)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4={ao.is_nf4(self.weight)}"


# ----- whole-model functions -----


def _target_modules(model: nn.Module, attn_modules: Sequence[str], mlp: bool, output: bool) -> list[str]:
    if isinstance(attn_modules, str):
        raise UserError(f"lora_attn_modules must be a list such as [q_proj, v_proj], not the string {attn_modules!r}")
    unknown = [name for name in attn_modules if name not in ATTN_MODULES]
    if unknown:
        raise UserError(
            f"lora_attn_modules has unknown module(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(ATTN_MODULES)}"
        )
    if not attn_modules and not mlp and not output:
        raise UserError("no module gets an adapter: set lora_attn_modules, apply_lora_to_mlp or apply_lora_to_output")
    if output and _has_tied_output(model):
        raise UserError(
            "apply_lora_to_output is not supported for models with tied embeddings (e.g. Llama 3.2): the output layer "
            "shares its weight with the token embeddings; set apply_lora_to_output=false"
        )
    in_layer = [f"attn.{name}" for name in ATTN_MODULES if name in attn_modules]
    if mlp:
        in_layer += [f"mlp.{name}" for name in MLP_MODULES]
    names = [f"layers.{i}.{suffix}" for i in range(len(model.layers)) for suffix in in_layer]
    return names + (["output"] if output else [])


def _has_tied_output(model: nn.Module) -> bool:
    args = getattr(model, "args", None)
    return bool(getattr(args, "tie_embeddings", False)) or model.output.weight is model.tok_embeddings.weight


def apply_lora(
    model: nn.Module,
    *,
    attn_modules: Sequence[str],
    mlp: bool,
    output: bool,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> list[str]:
    """Swap the chosen linears of a TransformerDecoder for LoRALinear in place; returns their names.

    Works on the meta device (call `initialize_adapters` once base weights are loaded) and on a
    loaded model (adapters are initialised, and with `quantize_base` the bases quantized, at once).
    """
    _check_settings(rank, alpha, dropout)
    names = _target_modules(model, attn_modules, mlp, output)
    settings = dict(rank=rank, alpha=alpha, dropout=dropout, use_dora=use_dora, quantize_base=quantize_base)
    for name in names:
        linear = model.get_submodule(name)
        if isinstance(linear, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter; apply_lora was called twice")
        _replace_submodule(model, name, LoRALinear.from_linear(linear, **settings))
    if quantize_base:
        # The decoder projections without an adapter are stored as NF4 too; the output head stays
        # in the training dtype unless it is adapted, as is usual for QLoRA.
        adapted = set(names)
        for name in _target_modules(model, ATTN_MODULES, mlp=True, output=False):
            if name not in adapted:
                linear = model.get_submodule(name)
                frozen = FrozenNF4Linear(linear.weight, linear.bias)
                frozen.initialize()
                _replace_submodule(model, name, frozen)
    return names


def _replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def nf4_base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose base weight is (or, on meta, will be) stored as NF4 under QLoRA."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, FrozenNF4Linear) or (isinstance(module, LoRALinear) and module.quantize_base)
    }


def quantize_nf4_bases(model: nn.Module, device: Device = None) -> None:
    """Store every QLoRA base weight as NF4 now, each quantized on `device` (default: where it is)
    and left there. One dense weight at a time goes to `device`, so a GPU holds at most one beside
    the 4-bit ones, and a dense weight no one else holds is freed as soon as its NF4 form exists."""
    for module in nf4_base_modules(model).values():
        module.weight = _frozen_nf4(module.weight, device)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base model: every LoRALinear computes its frozen base layer alone."""
    modules = list(lora_modules(model).values())
    for module in modules:
        module.adapter_enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.adapter_enabled = True


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter parameters under our names, e.g. `layers.0.attn.q_proj.lora_a.weight`."""
    params = {}
    for module_name, module in lora_modules(model).items():
        for name, param in module.named_parameters():
            if name in ADAPTER_PARAM_NAMES:
                params[f"{module_name}.{name}"] = param
    return params


def set_trainable_params(model: nn.Module) -> None:
    """Only adapter parameters (lora_a, lora_b, magnitude) require grad."""
    trainable = {id(p) for p in adapter_params(model).values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors; a saved adapter needs the whole tensor.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter parameters, on CPU, under our names."""
    return {name: _full(param.detach()).to("cpu", copy=True) for name, param in adapter_params(model).items()}


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy adapter tensors (our names) into the model's adapters.

    strict=False allows the model more adapters than `state_dict` has (those keep their no-op init).
    """
    params = adapter_params(model)
    unknown = sorted(set(state_dict) - set(params))
    if unknown:
        raise UserError(
            f"adapter has tensors the model has no adapter for: {', '.join(unknown[:3])}; "
            "apply LoRA to the same modules it was trained on"
        )
    missing = sorted(set(params) - set(state_dict))
    if strict and missing:
        raise UserError(
            f"adapter lacks tensors the model needs: {', '.join(missing[:3])}; "
            "it was trained with different LoRA settings"
        )
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise UserError(
                    f"adapter tensor {name} has shape {list(tensor.shape)} but the model expects "
                    f"{list(params[name].shape)}; "
                    "check lora_rank and the base model"
                )
            params[name].copy_(tensor)


def initialize_adapters(model: nn.Module) -> None:
    """After the base weights are in place: quantize bases (QLoRA, adapted or not), reset A and B,
    set DoRA magnitudes.

    Modules are visited in a fixed order drawing from torch's global RNG, so a seed fixes the result.
    """
    for module in model.modules():
        if isinstance(module, (LoRALinear, FrozenNF4Linear)):
            module.initialize()


def merged_weights(
    model: nn.Module,
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], Callable[[str], torch.Tensor]]:
    """What `merged_state_dict` holds, one tensor at a time: each name's (shape, dtype), and a
    function that makes that one tensor (merged, or dequantized, on the model's device)."""
    adapted = lora_modules(model)
    kept: dict[str, tuple[torch.Tensor, Optional[LoRALinear]]] = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        owner, _, inner = module_name.rpartition(".")
        if (owner in adapted and inner in ("lora_a", "lora_b")) or (module_name in adapted and leaf == "magnitude"):
            continue
        kept[name] = (tensor, adapted[module_name] if module_name in adapted and leaf == "weight" else None)

    def make(name: str) -> torch.Tensor:
        tensor, module = kept[name]
        if module is not None:
            tensor = module.merged_weight()
        elif ao.is_nf4(tensor):
            tensor = ao.nf4_dequantize(tensor)
        return _full(tensor.detach())

    return {name: (tuple(tensor.shape), tensor.dtype) for name, (tensor, _) in kept.items()}, make


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in base format: each adapted weight merged (W + s B A, DoRA's
    m * W' / ||W'||), NF4 weights dequantized, adapter tensors dropped."""
    specs, make = merged_weights(model)
    return {name: make(name) for name in specs}
