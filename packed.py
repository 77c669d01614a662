"""
packed.py: what only makes the CPU faster.

Fixed weights multiplied fast. On CPU in fp32 or bf16, a weight that stays fixed for a while (every
weight while grpo.py samples, the base weights under LoRA while it trains) is reordered once into
oneDNN's blocked layout, with the private ops that torch.compile uses for CPU inference; F.linear
instead repacks the weight at every call. The packed product is 1.3x (layer-sized weights, fp32) to
4x (bf16 at 48 rows) faster at the sampler's batch sizes, ~1.1x at training sizes on an AMD EPYC; on
an Intel Xeon with AMX a bf16 training step ran faster with F.linear (10.8-12.2 s against 12.5-16.8,
three alternations), a lead not yet taken: the numbers differ in their last bits. Elsewhere (GPU,
the fp64 tests), or if those ops are missing, FrozenLinear is F.linear.

Memory kept, not given back: see keep_freed_memory.
"""
import contextlib
import ctypes
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def pack(w: torch.Tensor, rows: int) -> torch.Tensor:
    # rows: the expected batch, a layout hint only
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


def packed_linear(x, packed, bias=None):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(torch.autograd.Function):
    """x W^T + b with W packed; the backward goes to x only (W is frozen), through the packed
    W^T."""

    @staticmethod
    def forward(ctx, x, packed, packed_t, bias):
        ctx.packed_t = packed_t
        return packed_linear(x, packed, bias)

    @staticmethod
    def backward(ctx, grad):
        return packed_linear(grad, ctx.packed_t), None, None, None


@functools.cache
def packing_works(dtype=torch.float32) -> bool:
    """The packed ops are private API: use them only where they run and agree with F.linear."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        w, x = torch.randn(8, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
        return torch.allclose(packed_linear(x, pack(w, 3)).float(), F.linear(x, w).float(),
                              atol=1e-2)
    except (AttributeError, RuntimeError):
        return False


class FrozenLinear(nn.Module):
    """y = x W^T + b with a fixed weight, packed where that pays (see above); differentiable in x if
    `grad`."""

    def __init__(self, weight: torch.Tensor, bias, rows: int, grad: bool = False):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.packed = None  # the weight in oneDNN's layout, for x @ W^T
        self.packed_t = None  # W^T packed too, for the gradient of x (grad=True)
        if weight.device.type == "cpu" and packing_works(weight.dtype):
            self.packed = pack(weight, rows)
            self.packed_t = pack(weight.t().contiguous(), rows) if grad else None
            self.weight = None

    def forward(self, x):
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        if self.packed_t is not None:
            return PackedLinear.apply(x, self.packed, self.packed_t, self.bias)
        return packed_linear(x, self.packed, self.bias)


def is_lora(module: nn.Module) -> bool:
    """A LoRA layer (grpo.LoRALinear: .base, .enabled, .merged_weight()), told by what it offers:
    this module cannot import grpo.py, which imports it."""
    return hasattr(module, "merged_weight")


def frozen_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of an nn.Linear, or of a LoRA layer with its adapter merged in unless it
    is switched off."""
    if not is_lora(layer):
        weight, bias = layer.weight, layer.bias
    elif layer.enabled:
        weight, bias = layer.merged_weight(), layer.base.bias
    else:
        weight, bias = layer.base.weight, layer.base.bias
    return weight.detach(), None if bias is None else bias.detach()


def fused_weight(layers) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of several layers reading the same input, stacked: one product gives
    all outputs."""
    weights, biases = zip(*(frozen_weight(layer) for layer in layers))
    if all(b is None for b in biases):
        return torch.cat(weights), None
    biases = [w.new_zeros(len(w)) if b is None else b for w, b in zip(weights, biases)]
    return torch.cat(weights), torch.cat(biases)


@contextlib.contextmanager
def frozen_linears(model: nn.Module, rows: int, training: bool = False):
    """Sampling (no gradients): every linear layer, the vocabulary projection included, multiplies
    by a frozen copy of its weight (a LoRA layer's adapter merged in: one matmul instead of three),
    and the projections a module declares in its `fused` ({"qkv": ("q_proj", "k_proj", "v_proj")})
    multiply as one product, set as that attribute. Training: the frozen base of each LoRA layer
    does (gradients still flow to its input); the adapter trains as before. The original layers are
    put back on exit, the adapter untouched."""
    fusions = []  # (module, attribute, the layers whose product it holds)
    swaps = []  # (parent, attribute, the layer a FrozenLinear stands in for)
    if training:
        swaps = [(m, "base", m.base) for m in model.modules() if is_lora(m)]
    else:
        for m in model.modules():
            for name, parts in getattr(m, "fused", {}).items():
                fusions.append((m, name, [getattr(m, part) for part in parts]))
        in_fusion = {id(layer) for _, _, layers in fusions for layer in layers}
        for parent in model.modules():
            if is_lora(parent):  # the LoRA layer itself is swapped, not its base
                continue
            for name, child in parent.named_children():
                if id(child) not in in_fusion and (isinstance(child, nn.Linear) or is_lora(child)):
                    swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, FrozenLinear(*frozen_weight(child), rows, grad=training))
    for m, name, layers in fusions:
        setattr(m, name, FrozenLinear(*fused_weight(layers), rows))
    try:
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)
        for m, name, _ in fusions:
            setattr(m, name, None)


def keep_freed_memory() -> None:
    """glibc gives the free memory at the top of its heap back to the OS (and the next allocations
    fault it in again, page by page, zeroed); blocks over a threshold (128 KB, rising with use to 32
    MB) get a mapping of their own, unmapped when freed. On CPU a minibatch's activations, GBs, come
    and go every step. Here blocks up to 32 MB always come from the heap, and the heap is never
    shrunk: the process keeps its peak memory. Measured (4 alternating processes): an update 1.12x
    faster, sampling 192 rows 1.07x, kernel time 34 -> 24 s, the same peak memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to change
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: a mapping of its own only for a block over 32 MB
    libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD: never give the heap's free top back
