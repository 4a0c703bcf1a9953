"""A GPT-2-style decoder with one pre-norm block, in two attention spellings.

``gpt2_block`` uses ``scaled_dot_product_attention(is_causal=True)``; ``gpt2_block_manual_mask``
writes the attention out by hand with a registered lower-triangular mask buffer, the way
nanoGPT and older GPT-2 ports do. Both produce (B, T, vocab) logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ModelAndInputs, randomize_norms, seeded

VOCAB_SIZE = 1000
MAX_POSITIONS = 128
SEQ_LEN = 32
D_MODEL = 256
N_HEADS = 4


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with a fused qkv projection, via SDPA.

    ``max_positions`` is unused here; it is part of the constructor so that subclasses which keep
    a mask buffer of that size can be swapped in.
    """

    def __init__(self, d_model: int, n_heads: int, max_positions: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over (B, H, T, Dh) heads."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over (B, T, D) hidden states; returns (B, T, D)."""
        b, t = x.shape[0], x.shape[1]
        q, k, v = self.c_attn(x).split(self.d_model, dim=2)
        q = q.view(b, t, self.n_heads, self.d_head).transpose(1, 2)
        k = k.view(b, t, self.n_heads, self.d_head).transpose(1, 2)
        v = v.view(b, t, self.n_heads, self.d_head).transpose(1, 2)
        y = self.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(b, t, self.d_model)
        return self.c_proj(y)


class ManualMaskCausalSelfAttention(CausalSelfAttention):
    """The same attention, written out: scaled scores, masked_fill with a tril buffer, softmax."""

    def __init__(self, d_model: int, n_heads: int, max_positions: int) -> None:
        super().__init__(d_model, n_heads, max_positions)
        mask = torch.tril(torch.ones(max_positions, max_positions))
        self.register_buffer("bias", mask.view(1, 1, max_positions, max_positions))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over (B, H, T, Dh) heads with an explicit -inf mask."""
        t = q.shape[2]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
        mask = self.bias.narrow(2, 0, t).narrow(3, 0, t)
        scores = scores.masked_fill(mask == 0, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class GPT2Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with tanh GELU."""

    def __init__(
        self, d_model: int, n_heads: int, max_positions: int, attention: type[CausalSelfAttention]
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = attention(d_model, n_heads, max_positions)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * d_model, d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform (B, T, D) hidden states."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """Token + position embeddings, one GPT2Block, final LayerNorm, untied lm_head."""

    def __init__(
        self,
        attention: type[CausalSelfAttention] = CausalSelfAttention,
        vocab_size: int = VOCAB_SIZE,
        max_positions: int = MAX_POSITIONS,
        d_model: int = D_MODEL,
        n_heads: int = N_HEADS,
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_positions, d_model)
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0))
        self.block = GPT2Block(d_model, n_heads, max_positions, attention)
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Map (B, T) int64 token ids to (B, T, vocab) logits."""
        t = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(self.position_ids.narrow(1, 0, t))
        x = self.block(x)
        return self.lm_head(self.ln_f(x))


def _build(batch: int, seed: int, attention: type[CausalSelfAttention]) -> ModelAndInputs:
    with seeded(seed) as generator:
        model = GPT2(attention)
        randomize_norms(model, generator)
        input_ids = torch.randint(0, VOCAB_SIZE, (batch, SEQ_LEN), generator=generator)
    return model.eval(), (input_ids,)


def gpt2_block(batch: int = 1, seed: int = 0) -> ModelAndInputs:
    """Build the one-block GPT-2 (SDPA attention) with a (batch, 32) int64 token-id input."""
    return _build(batch, seed, CausalSelfAttention)


def gpt2_block_manual_mask(batch: int = 1, seed: int = 0) -> ModelAndInputs:
    """Build the one-block GPT-2 with hand-written masked attention and a (batch, 32) input."""
    return _build(batch, seed, ManualMaskCausalSelfAttention)
