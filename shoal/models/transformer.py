"""A small decoder-only transformer (GPT-style) for the ``text`` dataset.

The model is an ``nn.Sequential`` of named units, ``embed``, ``block0`` ..
``blockN-1`` and ``head``, each taking and returning one tensor: pipeline
parallelism cuts it between units and every parameter keeps its name
(``block2.attn.wq.weight``) whatever the layout, which is what lets a
checkpoint move between layouts. Attention and MLP use separate ``nn.Linear``
layers (``wq``, ``wk``, ``wv``, ``wo``; ``fc1``, ``fc2``) so that tensor
parallelism can split them column- and row-wise; attention works out its number
of heads from the width it is given, so it runs unchanged on a shard holding
some of the heads.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shoal.config import ModelConfig
from shoal.data import Dataset
from shoal.errors import UserError


class Embed(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, vocab: int, context: int, dim: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.tok(ids) + self.pos(positions)


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (unflatten and flatten, not view(b, t, -1, ...): a rank's slice of a step may be
        # empty, the last of an epoch, and -1 is then ambiguous)
        q, k, v = (
            w(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
            for w in (self.wq, self.wk, self.wv)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final layer norm and the projection to next-token logits."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class Transformer(nn.Sequential):
    """The units in order, and how tensor parallelism splits them."""

    def tensor_plan(self, tp: int) -> dict[str, Any]:
        """Megatron-style: attention by heads, the MLP by its hidden units; the token
        embedding by vocabulary rows, the output projection by vocabulary columns."""
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        first = next(m for n, m in self.named_children() if n.startswith("block"))
        dim = first.attn.wq.out_features
        heads = dim // first.attn.head_dim
        if heads % tp:
            raise UserError(f"--heads {heads} must be a multiple of tp={tp}")
        if dim % tp:
            raise UserError(f"--hidden {dim} must be a multiple of tp={tp}")
        plan: dict[str, Any] = {
            "embed.tok": RowwiseParallel(input_layouts=Replicate()),
            "head.out": ColwiseParallel(output_layouts=Replicate()),
        }
        for name, _ in self.named_children():
            if name.startswith("block"):
                for w in ("wq", "wk", "wv"):
                    plan[f"{name}.attn.{w}"] = ColwiseParallel()
                plan[f"{name}.attn.wo"] = RowwiseParallel()
                plan[f"{name}.mlp.fc1"] = ColwiseParallel()
                plan[f"{name}.mlp.fc2"] = RowwiseParallel()
        return plan


def transformer(data: Dataset, cfg: ModelConfig) -> nn.Module:
    """``cfg.layers`` blocks of width ``cfg.hidden`` with ``cfg.heads`` heads."""
    if data.task != "language-model":
        raise UserError(f"--model transformer needs a text dataset (--data text), not {data.name}")
    if cfg.hidden % cfg.heads:
        raise UserError(f"--hidden {cfg.hidden} must be a multiple of --heads {cfg.heads}")
    vocab, context = data.num_outputs, data.input_shape[0]
    units: OrderedDict[str, nn.Module] = OrderedDict(embed=Embed(vocab, context, cfg.hidden))
    for i in range(cfg.layers):
        units[f"block{i}"] = Block(cfg.hidden, cfg.heads)
    units["head"] = Head(cfg.hidden, vocab)
    model = Transformer(units)
    for name, p in model.named_parameters():  # GPT-2's initialisation
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model
