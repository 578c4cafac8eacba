"""The quantizable linear: float8 (e4m3) weights with one scale per output channel.

On Hopper/Ada GPUs activations are quantized per token on the fly and the product runs on the fp8
tensor cores (``torch._scaled_mm``, row-wise scales, bf16 output). Elsewhere the weight is
dequantized for an ordinary matmul, so the same model runs (slowly) on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Linears fed by the conditioning vector (AdaLN modulation) or embedding a scalar: quantizing them
# saves nothing (one row of activations) and their errors scale every token, so they stay bf16.
_KEEP_PRECISE = ("norm", "mod", "embed", "time")


def _fp8_matmul_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, k) -> fp8 values and float32 (rows, 1) scales with x ~= values * scales."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        weight, scale = quantize_rows(linear.weight.detach())
        module.weight.copy_(weight)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if _fp8_matmul_supported(x.device):
            values, scale = quantize_rows(rows)
            out = torch._scaled_mm(values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale.t(),
                                   bias=self.bias, out_dtype=x.dtype, use_fast_accum=True)
        else:
            weight = (self.weight.float() * self.weight_scale).to(x.dtype)
            out = F.linear(rows, weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_linears_fp8(model: nn.Module) -> int:
    """Swap the large linears inside the DiT's block lists for FP8Linear; returns how many."""
    count = 0
    for blocks in model.children():
        if not isinstance(blocks, nn.ModuleList):
            continue
        for block in blocks:
            for name, module in list(block.named_modules()):
                if not isinstance(module, nn.Linear) or any(tag in name for tag in _KEEP_PRECISE):
                    continue
                if module.in_features % 16 or module.out_features % 16:
                    continue  # fp8 tensor cores need multiples of 16
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, FP8Linear.from_linear(module))
                count += 1
    return count


def fuse_linears(*linears: nn.Module | None) -> nn.Linear | None:
    """One ``nn.Linear`` computing the given linears side by side (split its output by their widths).

    One matmul over the concatenated weights instead of several: fewer launches and a wider N that
    fills the GPU better. Each output column is the same dot product as before (bit-equal on CPU).
    Returns None unless all are plain ``nn.Linear`` on the same input width with matching bias
    presence (fp8, tensor-parallel or adapter-wrapped linears are left alone).
    """
    if not linears or any(type(lin) is not nn.Linear for lin in linears):
        return None
    first = linears[0]
    if any(lin.in_features != first.in_features or (lin.bias is None) != (first.bias is None) for lin in linears):
        return None
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears]) if first.bias is not None else None
    with torch.device("meta"):
        fused = nn.Linear(first.in_features, weight.shape[0], bias=bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Call ``fuse_projections()`` on every submodule that offers it; returns how many fusions were made.

    Run after loading: the checkpoint keeps its per-projection names (strict loading checks those),
    and only the in-memory model holds the concatenated weights.
    """
    count = 0
    for module in list(model.modules()):
        fuse = getattr(module, "fuse_projections", None)
        if fuse is not None and module is not model:
            count += fuse()
    return count


# -- linear + tanh GELU in one matmul, and a linear over a concatenation without the concatenation ----------------
def _module_linear(linear: nn.Module) -> bool:
    """A plain ``nn.Linear`` whose forward nothing observes (no hooks): its weight and bias can be used directly.
    fp8, tensor-parallel and adapter-wrapped linears keep their own forward."""
    return type(linear) is nn.Linear and not linear._forward_hooks and not linear._forward_pre_hooks


def _gelu_epilogue_applies(linear: nn.Module, x: torch.Tensor) -> bool:
    """The cuBLASLt GELU epilogue replaces ``gelu(linear(x))``: a plain linear with a bias, weight, bias and x of
    one half dtype on CUDA, no gradient wanted, the family on (``use_fused_kernel``: eager by default, compiled
    graphs where they call the op)."""
    from diffgen.layers.fused import use_fused_kernel

    if not _module_linear(linear) or linear.bias is None:  # a wrong input width raises on either path
        return False
    weight, bias = linear.weight, linear.bias
    # float32 passes off CUDA: there the op is the plain ops (any dtype), and the CPU compile tests stand in for
    # CUDA with float32 models
    if x.is_cuda and x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        return False
    return use_fused_kernel(x, "linear_gelu", inputs=(weight, bias))


def linear_gelu(linear: nn.Module, x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(linear(x), approximate)``, the first half of every tanh-GELU MLP.

    On CUDA (bf16/fp16, a bias) the tanh GELU runs in the matmul's epilogue (cuBLASLt, through
    ``torch._addmm_activation``): the bias add and the GELU act on the float32 accumulator and the result is
    rounded once, where the plain path rounds the matmul's output to bf16, reads it back for the GELU and rounds
    again; one pass over the (tokens, hidden) activations fewer. In compiled graphs it is the custom op
    ``diffgen::linear_gelu`` (Inductor would decompose ``_addmm_activation`` back into addmm + gelu). Elsewhere
    (CPU, float32, no bias, the exact GELU, gradients wanted, a wrapped linear) exactly the plain ops.
    """
    if approximate == "tanh" and _gelu_epilogue_applies(linear, x):
        if torch.compiler.is_compiling():
            return linear_gelu_op(x, linear.weight, linear.bias)
        return _addmm_gelu(x, linear.weight, linear.bias)  # eager skips the operator's dispatch
    return F.gelu(linear(x), approximate=approximate)


def _addmm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """cuBLASLt's bias + tanh-GELU epilogue (CUDA only: the CPU kernel of ``_addmm_activation`` uses the exact
    GELU)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("diffgen::linear_gelu", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor")
def linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(linear(x, weight, bias), "tanh")`` as an operator: the cuBLASLt epilogue on CUDA, the plain ops
    elsewhere."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu_op.register_kernel("cuda")
def _linear_gelu_cuda(x, weight, bias):
    return _addmm_gelu(x, weight, bias)


@linear_gelu_op.register_fake
def _linear_gelu_fake(x, weight, bias):
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"linear_gelu: x has {x.shape[-1]} features, the weight "
                 f"{weight.shape[1]}")  # compiled graphs fail while tracing, as the eager paths do
    return x.new_empty(*x.shape[:-1], weight.shape[0])  # contiguous, x's dtype, as both implementations return


def linear_of_concat(linear: nn.Module, parts: list[torch.Tensor]) -> torch.Tensor:
    """``linear(torch.cat(parts, dim=-1))`` (FLUX / HunyuanVideo single blocks: attention output and MLP activations
    into one output projection).

    On CUDA (family ``concat_linear``) without building the concatenation: one matmul per part over its columns of
    the weight, each after the first accumulating into the first's output (``addmm_``). The sum over the input
    channels is then split at the parts' boundaries, and the first part's partial sum (with the bias) is rounded
    to x's dtype before the rest is added: at most half an ulp of that partial sum (the unit roundoff, 2**-8
    relative in bf16, 2**-11 in fp16) from the single matmul, besides float32 summation order. Elsewhere exactly
    the plain ops.
    """
    from diffgen.layers.fused import use_fused_kernel

    first = parts[0]
    if (len(parts) < 2 or not _module_linear(linear) or any(p.dtype != first.dtype for p in parts)
            or linear.weight.dtype != first.dtype or (linear.bias is not None and linear.bias.dtype != first.dtype)
            or sum(p.shape[-1] for p in parts) != linear.in_features  # too few: the split would leave columns out
            or not use_fused_kernel(first, "concat_linear", inputs=(linear.weight, linear.bias, *parts[1:]))):
        return linear(torch.cat(parts, dim=-1))
    weight, start = linear.weight, first.shape[-1]
    out = F.linear(first, weight[:, :start], linear.bias)
    flat = out.view(-1, out.shape[-1])
    for part in parts[1:]:
        width = part.shape[-1]
        flat.addmm_(part.reshape(-1, width), weight[:, start:start + width].t())
        start += width
    return out
