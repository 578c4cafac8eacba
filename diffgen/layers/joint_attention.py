"""MMDiT joint attention: image and text tokens with their own projections, attending as one sequence.

Parameter names follow diffusers' ``Attention`` with ``added_kv_proj_dim`` (to_q/k/v, add_q/k/v_proj,
norm_q/k, norm_added_q/k, to_out.0, to_add_out), as FLUX and Qwen-Image store them.
"""

from __future__ import annotations

import torch
from torch import nn

from diffgen.layers.attention import attention
from diffgen.layers.linear import fuse_linears
from diffgen.layers.norm import RMSNorm
from diffgen.layers.rope import norm_and_rope

_IMAGE_PROJECTIONS = ("to_q", "to_k", "to_v")
_TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj")


class JointAttention(nn.Module):
    """Self-attention with per-head RMSNorm on q/k; with ``joint=True`` it also owns the text projections.

    ``norm_round_before_scale``: the q/k norms round as diffusers' RMSNorm does (Qwen-Image) rather
    than as torch.nn.RMSNorm (FLUX); see :class:`RMSNorm`.

    The joint sequence is [text, image]; ``rope`` holds cos/sin tables for that whole sequence.
    After :meth:`fuse_projections` each stream's q/k/v come from one matmul (``to_qkv``, ``add_qkv``).
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

    def fuse_projections(self) -> int:
        """Concatenate each stream's q/k/v weights into one linear (after loading; names on disk unchanged)."""
        count = 0
        for names, fused_name in ((_IMAGE_PROJECTIONS, "to_qkv"), (_TEXT_PROJECTIONS, "add_qkv")):
            fused = fuse_linears(*(getattr(self, name, None) for name in names))
            if fused is not None:
                for name in names:
                    delattr(self, name)
                setattr(self, fused_name, fused)
                count += 1
        return count

    def _qkv(self, x: torch.Tensor, names: tuple[str, str, str], fused_name: str):
        fused = getattr(self, fused_name, None)
        if fused is not None:
            return fused(x).chunk(3, dim=-1)
        return tuple(getattr(self, name)(x) for name in names)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None, text_len: int = 0):
        """Image tokens ``x`` (B, N, D), text tokens ``context`` (B, T, D).

        ``context_mask`` (B, T) bool marks the text tokens to attend to (image tokens always are).
        Single-stream use (``joint=False``): ``x`` is [text, image], ``text_len`` says where the image
        starts, and ``context_mask`` covers those ``text_len`` tokens.
        Returns the image output, or (image output, text output) when ``context`` is given.
        The text goes to attention as the replicated part (whole on every sequence-parallel rank).
        """
        q, k, v = self._qkv(x, _IMAGE_PROJECTIONS, "to_qkv")
        text = None if context is None else self._qkv(context, _TEXT_PROJECTIONS, "add_qkv")
        return self.attend(q, k, v, rope, text=text, context_mask=context_mask, text_len=text_len)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               context_mask: torch.Tensor | None = None, text_len: int = 0):
        """Attention over projected q/k/v (B, N, D) and, when given, the text stream's q/k/v (B, T, D).

        The text goes to attention as the replicated part (whole on every sequence-parallel rank).
        """
        heads = lambda t: t.unflatten(-1, (self.heads, self.head_dim))
        q, k, v = heads(q), heads(k), heads(v)
        single_stream = text is None
        if single_stream:  # the text is the head of the sequence
            if context_mask is not None and context_mask.shape[1] != text_len:
                raise ValueError(f"context_mask covers {context_mask.shape[1]} text tokens, text_len is {text_len}")
            q, k = norm_and_rope(q, self.norm_q, *rope), norm_and_rope(k, self.norm_k, *rope)
            text = tuple(t[:, :text_len] for t in (q, k, v))
            q, k, v = (t[:, text_len:] for t in (q, k, v))
        else:
            # Each stream has its own q/k norms; rotation is per token, so each takes its slice of the tables.
            text_len = text[0].shape[1]
            cq, ck, cv = (heads(t) for t in text)
            text_rope, image_rope = tuple(t[:text_len] for t in rope), tuple(t[text_len:] for t in rope)
            text = (norm_and_rope(cq, self.norm_added_q, *text_rope), norm_and_rope(ck, self.norm_added_k, *text_rope),
                    cv)
            q, k = norm_and_rope(q, self.norm_q, *image_rope), norm_and_rope(k, self.norm_k, *image_rope)
        out, text_out = attention(q, k, v, replicated=text, mask=context_mask)
        # Contiguous, as the reference: a CPU matmul over a strided slice rounds differently in bf16.
        out, text_out = out.flatten(2).to(q.dtype).contiguous(), text_out.flatten(2).to(q.dtype).contiguous()
        if single_stream:
            return torch.cat([text_out, out], dim=1)
        return self.to_out[0](out), self.to_add_out(text_out)
