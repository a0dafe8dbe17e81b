"""Multi-head self-attention across the samples of a mini-batch (the "MA" of MoMA).

The official code (``MoMA/criterion_moco_att.py``, class ``Attention``) is timm's ViT attention
block applied to an (N, C) matrix of embeddings unsqueezed to one sequence: every sample of the
batch is a token, so each output mixes information from the whole batch. There is no residual
connection, no LayerNorm and no re-normalisation of the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
