"""Activation memory: per-layer activation checkpointing and activation offloading.

Checkpointing swaps each layer's class for a subclass whose forward runs under non-reentrant
`torch.utils.checkpoint`, so parameter names and state-dict keys stay exactly as they were
(no `_checkpoint_wrapped_module.` prefix). Apply it before FSDP2 and before torch.compile.

Offloading moves tensors that autograd saves for backward to pinned CPU memory during forward
and brings them back during backward. With checkpointing on, the only tensors saved between
layers are the layer inputs, so the two together keep one layer's activations on the GPU.
"""

import contextlib
import weakref
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if getattr(cls, "_finetune_checkpointed", False):
        return cls
    if cls not in _CHECKPOINTED:
        inner_forward = cls.forward

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return checkpoint(inner_forward, self, *args, use_reentrant=False, **kwargs)

        _CHECKPOINTED[cls] = type(
            f"Checkpointed{cls.__name__}",
            (cls,),
            {"forward": forward, "_finetune_checkpointed": True, "__module__": cls.__module__},
        )
    return _CHECKPOINTED[cls]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each `model.layers[i]` in backward instead of keeping its activations."""
    for layer in model.layers:
        layer.__class__ = _checkpointed_class(type(layer))


class _Offloaded:
    """A saved tensor's CPU copy, plus its device copy when prefetched ahead of use."""

    __slots__ = ("cpu", "copied", "device", "index", "prefetched", "prefetch_done", "used", "__weakref__")

    def __init__(self, cpu: torch.Tensor, copied: Any, device: torch.device, index: int) -> None:
        self.cpu = cpu
        self.copied = copied  # CUDA event marking the end of the device-to-host copy, or None
        self.device = device
        self.index = index
        self.prefetched: Optional[torch.Tensor] = None
        self.prefetch_done: Any = None
        self.used = False


class _OffloadHooks:
    """pack/unpack hooks for `saved_tensors_hooks`.

    Forward: a device-to-host copy on a side stream, so it overlaps the next kernels; the
    source tensor is recorded on that stream so its memory is not reused before the copy ends.
    Backward: unpacking tensor i also starts the host-to-device copies of the `prefetch`
    tensors saved just before it (backward unpacks roughly in reverse order), again on the side
    stream; the compute stream waits on an event before using a copy.
    """

    def __init__(
        self,
        *,
        use_streams: bool,
        min_bytes: int,
        prefetch: int,
        device_types: frozenset[str],
    ) -> None:
        self.use_streams = use_streams
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self.device_types = device_types
        self.saved: list[weakref.ref] = []
        self.stream: Optional[torch.cuda.Stream] = None

    def _side_stream(self, device: torch.device) -> Optional[torch.cuda.Stream]:
        if not self.use_streams or device.type != "cuda":
            return None
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def _worth_offloading(self, tensor: torch.Tensor) -> bool:
        # Weights stay put: linear layers save a transposed view of the weight, not the weight.
        base = tensor._base if tensor._base is not None else tensor
        if isinstance(base, nn.Parameter) or tensor.device.type not in self.device_types:
            return False
        return tensor.numel() * tensor.element_size() >= self.min_bytes

    def pack(self, tensor: torch.Tensor) -> Any:
        if not self._worth_offloading(tensor):
            return tensor
        pin = tensor.device.type == "cuda"
        cpu = torch.empty_like(tensor, device="cpu", pin_memory=pin)
        stream = self._side_stream(tensor.device)
        copied = None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                cpu.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)
            copied = stream.record_event()
        else:
            cpu.copy_(tensor, non_blocking=pin)
        holder = _Offloaded(cpu, copied, tensor.device, len(self.saved))
        self.saved.append(weakref.ref(holder))
        return holder

    def _to_device(self, holder: _Offloaded) -> torch.Tensor:
        if holder.device.type == "cpu":
            return holder.cpu  # only when offloading is simulated on CPU: the copy is the result
        return holder.cpu.to(holder.device, non_blocking=True)

    def _start_prefetch(self, holder: _Offloaded) -> None:
        stream = self._side_stream(holder.device)
        if stream is None:
            holder.prefetched = self._to_device(holder)
            return
        with torch.cuda.stream(stream):
            if holder.copied is not None:
                stream.wait_event(holder.copied)
            holder.prefetched = self._to_device(holder)
            holder.prefetch_done = stream.record_event()

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        holder: _Offloaded = packed
        holder.used = True
        tensor = holder.prefetched
        if tensor is not None:
            # Hand the prefetched copy to the compute stream once, then drop it: a second
            # unpack (retain_graph) copies again from the CPU buffer.
            holder.prefetched = None
            if holder.prefetch_done is not None:
                compute = torch.cuda.current_stream(holder.device)
                compute.wait_event(holder.prefetch_done)
                tensor.record_stream(compute)
                holder.prefetch_done = None
        else:
            if holder.copied is not None:
                torch.cuda.current_stream(holder.device).wait_event(holder.copied)
            tensor = self._to_device(holder)
        for index in range(holder.index - 1, max(holder.index - 1 - self.prefetch, -1), -1):
            earlier = self.saved[index]()
            if earlier is not None and not earlier.used and earlier.prefetched is None:
                self._start_prefetch(earlier)
        return tensor


@contextlib.contextmanager
def activation_offloading(
    enabled: bool,
    use_streams: Optional[bool] = None,
    *,
    min_bytes: int = 1024,
    prefetch: int = 2,
    _device_types: frozenset[str] = frozenset({"cuda"}),
) -> Iterator[None]:
    """Offload tensors saved for backward to CPU while the block runs forward.

    Wrap the forward pass (the backward may run outside the block). `use_streams` defaults to
    True on CUDA; without streams the copies are serialised with compute. On CPU there is
    nowhere to offload to, so saved tensors pass through the hooks unchanged. Parameters and
    tensors under `min_bytes` stay where they are.
    """
    if not enabled:
        yield
        return
    if use_streams is None:
        use_streams = torch.cuda.is_available()
    hooks = _OffloadHooks(use_streams=use_streams, min_bytes=min_bytes, prefetch=prefetch, device_types=_device_types)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield
