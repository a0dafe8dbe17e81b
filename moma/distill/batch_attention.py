"""Multi-head self-attention across the samples of a mini-batch (the "MA" of MoMA).

The official code (``MoMA/criterion_moco_att.py``, class ``Attention``) is timm's ViT attention
applied to an (N, C) matrix of embeddings unsqueezed to one sequence: every sample of the batch is
a token, so each output mixes information from the whole batch. There it has no residual
connection, no LayerNorm and no re-normalisation of the output (``block="plain"`` here).

:class:`BatchAttentionBlock` wraps it in one of the ways a transformer sub-layer is usually wired;
docs/moma.md ("Choosing the default") has the study that picked ``rezero`` (a pre-norm residual
``x + A(LN(x))`` lost: LN's output has norm about sqrt(C), so the attention branch swamps x and
the outputs of a batch collapse to one vector again). Everything runs in
float32 even under autocast: a fresh attention changes its inputs by about 1e-3, less than bf16's
rounding of unit vectors, so in bf16 the per-sample signal would be rounded away.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionWiring = Literal["plain", "rezero"]


def batch_attention(x: torch.Tensor, qkv: nn.Linear, proj: nn.Linear, num_heads: int) -> torch.Tensor:
    r"""Scaled dot-product attention of Vaswani et al. (NeurIPS 2017, eq. 1) with H heads, the N rows
    of ``x`` (N, C) being the tokens:

    .. math:: [Q_h, K_h, V_h] = x W^{qkv}_h,\quad
              \mathrm{head}_h = \mathrm{softmax}\!\left(Q_h K_h^\top / \sqrt{C/H}\right) V_h,\quad
              \mathrm{out} = [\mathrm{head}_1, \dots, \mathrm{head}_H]\, W^{proj} + b^{proj}
    """
    n, c = x.shape
    heads = qkv(x).reshape(n, 3, num_heads, c // num_heads).permute(1, 2, 0, 3)  # 3, H, N, C/H
    q, k, v = heads.unbind(0)
    mixed = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/H)) v
    return proj(mixed.transpose(0, 1).reshape(n, c))


class BatchAttention(nn.Module):
    """``dim``-wide multi-head attention over the batch dimension (qkv with bias, as the code)."""

    def __init__(self, dim: int = 512, num_heads: int = 4, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            raise ValueError(f"batch attention takes an (N, C) matrix of embeddings, got shape {tuple(x.shape)}")
        return batch_attention(x, self.qkv, self.proj, self.num_heads)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class BatchAttentionBlock(nn.Module):
    r"""The batch attention :math:`A` wired as

    - ``plain``: :math:`A(x)` (the official code);
    - ``rezero``: :math:`x + g \cdot A(\mathrm{LN}(x))` with a learnt per-channel gain :math:`g`
      that starts at zero (LayerScale, Touvron et al. 2021; ReZero, Bachlechner et al. 2021): the
      block starts as the identity, so training starts as plain momentum-contrastive distillation
      and the batch context grows only where the loss rewards it.

    ``normalize`` L2-normalises the output (the InfoNCE logits are then cosines over tau).
    """

    def __init__(self, dim: int, num_heads: int, wiring: AttentionWiring = "plain", normalize: bool = False):
        super().__init__()
        self.wiring = wiring
        self.normalize = normalize
        self.attention = BatchAttention(dim, num_heads)
        if wiring not in ("plain", "rezero"):
            raise ValueError(f"unknown attention wiring '{wiring}' (plain or rezero)")
        if wiring == "rezero":
            self.norm = nn.LayerNorm(dim)
            self.gain = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.wiring == "plain":
                out = self.attention(x)
            else:
                out = x + self.gain * self.attention(self.norm(x))
            return F.normalize(out, dim=1) if self.normalize else out

    def extra_repr(self) -> str:
        return f"wiring={self.wiring}, normalize={self.normalize}"
