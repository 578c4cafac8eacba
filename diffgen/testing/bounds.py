"""Per-element error bounds of the half-precision matmul paths (``diffgen.layers.linear``) against float32, and the
float32 attention the attention kernels are measured against, shared by the GPU tests and the benches
(``bench/gelu_epilogue.py``, ``bench/attention.py``).

u is the unit roundoff of the output dtype: rounding v to it moves v by at most u |v| and at most u |round(v)|.
"""

from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {dtype: torch.finfo(dtype).eps / 2 for dtype in (torch.bfloat16, torch.float16, torch.float32)}
#: allowance for cuBLASLt's own tanh in its GELU epilogue, relative to |z|. gelu_tanh(z) = z (1 + tanh(t(z))) / 2,
#: so an error d in the tanh moves the output by |z| d / 2: this allows d up to 2**-11 (4.9e-4). Measured
#: (bench/gelu_epilogue.py, ``which_gelu``, float32, H200): the epilogue within 5.5e-6 of gelu(approximate="tanh")
#: over z of a few units, i.e. d <= 1.1e-5 wherever |z| >= 1: the allowance keeps a margin of about 40x over that.
EPILOGUE_TANH = 2.0**-12
#: |gelu_tanh'(z)| <= 1.13 everywhere: rounding the GELU's input by u |z| moves its output by at most 1.13 u |z|
GELU_SLOPE = 1.2


def summation_slack(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Twice the worst-case float32 summation error of each output of ``linear(x, weight, bias)`` (k 2**-24 times
    sum |x| |w| + |b|, k the input width: two float32 sums of the same terms in different orders, e.g. cuBLAS's
    and the float32 reference's)."""
    magnitude = x.float().abs().reshape(-1, x.shape[-1]) @ weight.float().abs().t()
    if bias is not None:
        magnitude = magnitude + bias.float().abs()
    return (2 * x.shape[-1] * UNIT_ROUNDOFF[torch.float32]) * magnitude.view(*x.shape[:-1], weight.shape[0])


def gelu_epilogue_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor,
                        epilogue: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """Per element, how far the GELU epilogue's result may be from the plain path's (addmm rounded to the dtype,
    then the tanh GELU rounded again); z is the float32 ``linear(x)``. u (|plain| + |epilogue|) for the two final
    roundings, GELU_SLOPE u |z| for the plain path's rounded GELU input, EPILOGUE_TANH |z| for cuBLASLt's tanh, and
    the float32 summation-order slack."""
    u = UNIT_ROUNDOFF[x.dtype]
    return (u * (plain.float().abs() + epilogue.float().abs()) + (GELU_SLOPE * u + EPILOGUE_TANH) * z.abs()
            + summation_slack(x, weight, bias))


def split_projection_bound(parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                           got: torch.Tensor) -> torch.Tensor:
    """Per element, how far ``linear_of_concat``'s split result ``got`` may be from the float32 z =
    ``linear(cat(parts))``.

    The split path computes p = bias + parts[0] @ W0^T in float32 and rounds it (p'), then each further part's
    product is accumulated in float32 onto p' and the sum rounded once more (got). So got - z = (got - v) +
    (p' - p) + (v - z - (p' - p)), v the float32 value rounded last: |got - v| <= u |got|, |p' - p| <= u |p|, and
    the rest is float32 summation order (every product and the bias summed once, in another order than z's, plus
    one float32 addition per part: within ``summation_slack`` over the whole width). Taking p from the float32
    reference instead of the device's changes u |p| by u times float32 slack, also inside ``summation_slack``'s
    factor of two."""
    u = UNIT_ROUNDOFF[got.dtype]
    first = parts[0]
    partial = torch.nn.functional.linear(first.float(), weight[:, :first.shape[-1]].float(),
                                         None if bias is None else bias.float())
    return u * (partial.abs() + got.float().abs()) + summation_slack(torch.cat(parts, dim=-1), weight, bias)


def float32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                      causal: bool = False) -> torch.Tensor:
    """Attention over (B, S, H, D) in float32, one head at a time (the scores of all heads may not fit)."""
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=torch.float32, device=q.device)
    for head in range(q.shape[2]):
        qh, kh, vh = (t[:, :, head].float() for t in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, head] = torch.softmax(scores, -1) @ vh
    return out
