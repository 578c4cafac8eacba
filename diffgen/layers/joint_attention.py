"""MMDiT joint attention: image and text tokens with their own projections, attending as one sequence.

Parameter names follow diffusers' ``Attention`` with ``added_kv_proj_dim`` (to_q/k/v, add_q/k/v_proj,
norm_q/k, norm_added_q/k, to_out.0, to_add_out), as FLUX and Qwen-Image store them.
"""

from __future__ import annotations

import torch
from torch import nn

from diffgen.layers.attention import attention
from diffgen.layers.norm import RMSNorm
from diffgen.layers.rope import apply_rope


class JointAttention(nn.Module):
    """Self-attention with per-head RMSNorm on q/k; with ``joint=True`` it also owns the text projections.

    ``norm_round_before_scale``: the q/k norms round as diffusers' RMSNorm does (Qwen-Image) rather
    than as torch.nn.RMSNorm (FLUX); see :class:`RMSNorm`.

    The joint sequence is [text, image]; ``rope`` holds cos/sin tables for that whole sequence.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, eps: float = 1e-6,
                 norm_round_before_scale: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.joint = heads, head_dim, joint
        norm = lambda: RMSNorm(head_dim, eps, round_before_scale=norm_round_before_scale)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = norm(), norm()
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = norm(), norm()
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
            self.to_add_out = nn.Linear(dim, dim)

    def _project(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (proj(x).unflatten(-1, (self.heads, self.head_dim)) for proj in (to_q, to_k, to_v))
        return norm_q(q), norm_k(k), v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None, text_len: int = 0):
        """Image tokens ``x`` (B, N, D), text tokens ``context`` (B, T, D).

        ``context_mask`` (B, T) bool marks the text tokens to attend to (image tokens always are).
        Single-stream use (``joint=False``): ``x`` is [text, image], ``text_len`` says where the image
        starts, and ``context_mask`` covers those ``text_len`` tokens.
        Returns the image output, or (image output, text output) when ``context`` is given.
        """
        q, k, v = self._project(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        mask = None
        if context is not None:
            cq, ck, cv = self._project(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                       self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        if context_mask is not None:
            if context is None and context_mask.shape[1] != text_len:
                raise ValueError(f"context_mask covers {context_mask.shape[1]} text tokens, text_len is {text_len}")
            image_mask = context_mask.new_ones(x.shape[0], q.shape[1] - context_mask.shape[1])
            mask = torch.cat([context_mask, image_mask], dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, mask=mask).flatten(2).to(q.dtype)
        if context is None:
            return out
        text_len = context.shape[1]
        # Contiguous slices, as the reference: a CPU matmul over a strided slice rounds differently in bf16.
        return self.to_out[0](out[:, text_len:].contiguous()), self.to_add_out(out[:, :text_len].contiguous())
