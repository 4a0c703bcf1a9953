"""A GPT-2 decoder for autoregressive generation with a KV cache, as two programs.

``GPT2Decoder`` is the GPT-2 architecture (pre-norm blocks, fused qkv projection, tanh GELU,
learned positions, lm_head tied to the token embedding) with random weights from a config:
nothing is downloaded. ``GPT2_SMALL`` is GPT-2 small's shape (12 layers, d=768, 12 heads,
vocabulary 50257, 1024 positions).

Generation runs as two modules over the same weights:

- ``Prefill``: the prompt ``(B, T)`` -> the last position's logits ``(B, V)`` and every layer's
  keys and values ``(L, B, H, T, Dh)``.
- ``DecodeStep``: one token per sequence against a cache of fixed *capacity* ``C``: inputs
  the tokens ``(B, 1)``, their positions ``(B, 1)``, an additive mask ``(B, 1, 1, C)`` (0 where
  the cache holds a key, the most negative float32 elsewhere) and one key and one value cache
  per layer ``(B, H, C, Dh)``; outputs the logits ``(B, V)`` and the new token's keys and values
  ``(L, B, H, 1, Dh)``, which the caller writes into the caches at the token's position.

Both are ordinary static programs: the cache length grows every step, but the capacity only
when it is full (the caller doubles it), so decoding 64 tokens after a prompt of 16 compiles
the step for two or three capacities and never per step. Attention over empty slots costs
little next to the weights every step reads. ``EagerGenerator`` is what a PyTorch user writes
without kiln: the same weights, a cache grown with ``torch.cat`` each step, and SDPA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import seeded


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's shape."""

    vocab_size: int = 50257
    n_positions: int = 1024
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12

    @property
    def d_head(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head


GPT2_SMALL = DecoderConfig()
"""GPT-2 small: 12 layers, d=768, 12 heads, 50257 tokens, 1024 positions (124M parameters)."""

TINY = DecoderConfig(vocab_size=97, n_positions=160, d_model=32, n_layer=2, n_head=4)
"""A decoder small enough for tests."""


class Block(nn.Module):
    """One pre-norm GPT-2 block's weights."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward half: x + proj(gelu_tanh(fc(ln_2(x))))."""
        h = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")
        return x + self.mlp_proj(h)


class GPT2Decoder(nn.Module):
    """GPT-2's weights: embeddings, blocks, final norm; the lm_head is the token embedding."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, Dh)."""
        b, t = x.shape[0], x.shape[1]
        return x.view(b, t, self.cfg.n_head, self.cfg.d_head).transpose(1, 2)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, Dh) -> (B, T, D)."""
        b, t = y.shape[0], y.shape[2]
        return y.transpose(1, 2).reshape(b, t, self.cfg.d_model)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and the tied lm_head on (B, D) hidden states."""
        return F.linear(self.ln_f(x), self.wte.weight)


def build_decoder(cfg: DecoderConfig = GPT2_SMALL, seed: int = 0) -> GPT2Decoder:
    """A decoder with GPT-2's initialization (normal, std 0.02; projections scaled by depth)
    and seeded random weights; norms get random affine parameters so they are not identity."""
    with seeded(seed) as g:
        model = GPT2Decoder(cfg)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                nn.init.normal_(p, std=0.02, generator=g)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.normal_(p, mean=1.0, std=0.1, generator=g)
            else:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std, generator=g)
    return model.eval()


class Prefill(nn.Module):
    """The prompt pass: ``(B, T)`` token ids -> (last logits (B, V), keys, values
    (L, B, H, T, Dh))."""

    def __init__(self, decoder: GPT2Decoder) -> None:
        super().__init__()
        self.m = decoder

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """Run the prompt; ``positions`` is ``(B, T)`` (0..T-1 for unpadded prompts)."""
        m = self.m
        x = m.wte(input_ids) + m.wpe(positions)
        keys, values = [], []
        for blk in m.blocks:
            q, k, v = blk.c_attn(blk.ln_1(x)).split(m.cfg.d_model, dim=2)
            q, k, v = m.heads(q), m.heads(k), m.heads(v)
            keys.append(k)
            values.append(v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = blk.mlp(x + blk.c_proj(m.merge(y)))
        return m.logits(x[:, -1]), torch.stack(keys), torch.stack(values)


class DecodeStep(nn.Module):
    """One token per sequence against caches of fixed capacity (see the module docstring)."""

    def __init__(self, decoder: GPT2Decoder) -> None:
        super().__init__()
        self.m = decoder

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                caches: torch.Tensor):
        """``caches`` is ``(2L, B, H, C, Dh)``: layer l's keys at 2l, its values at 2l + 1."""
        m = self.m
        scale = 1.0 / math.sqrt(m.cfg.d_head)
        x = m.wte(tokens) + m.wpe(positions)                     # (B, 1, D)
        new_k, new_v = [], []
        for i, blk in enumerate(m.blocks):
            q, k, v = blk.c_attn(blk.ln_1(x)).split(m.cfg.d_model, dim=2)
            q, k, v = m.heads(q), m.heads(k), m.heads(v)          # (B, H, 1, Dh)
            new_k.append(k)
            new_v.append(v)
            kc, vc = caches[2 * i], caches[2 * i + 1]             # (B, H, C, Dh)
            s_cache = (q @ kc.transpose(-2, -1)) * scale + mask   # (B, H, 1, C)
            s_new = (q * k).sum(-1, keepdim=True) * scale         # (B, H, 1, 1)
            # softmax over [cache slots, the new token] without concatenating them
            top = torch.maximum(s_cache.amax(-1, keepdim=True), s_new)
            e_cache, e_new = torch.exp(s_cache - top), torch.exp(s_new - top)
            total = e_cache.sum(-1, keepdim=True) + e_new
            y = (e_cache @ vc + e_new * v) / total                # (B, H, 1, Dh)
            x = blk.mlp(x + blk.c_proj(m.merge(y)))
        return m.logits(x[:, 0]), torch.stack(new_k), torch.stack(new_v)


class EagerGenerator:
    """Greedy decoding in plain PyTorch: the same weights, a KV cache grown with ``torch.cat``
    every step, SDPA attention. What a user writes without kiln; the baseline and the oracle."""

    def __init__(self, decoder: GPT2Decoder) -> None:
        self.m = decoder

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: list, causal: bool) -> torch.Tensor:
        """Run hidden states ``x`` (B, T, D) through every block, appending to ``cache``."""
        m = self.m
        for i, blk in enumerate(m.blocks):
            q, k, v = blk.c_attn(blk.ln_1(x)).split(m.cfg.d_model, dim=2)
            q, k, v = m.heads(q), m.heads(k), m.heads(v)
            if len(cache) > i:
                k = torch.cat([cache[i][0], k], dim=2)
                v = torch.cat([cache[i][1], v], dim=2)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            x = blk.mlp(x + blk.c_proj(m.merge(y)))
        return m.logits(x[:, -1])

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy tokens ``(B, steps)`` after ``prompt`` ``(B, T)``."""
        m = self.m
        b, t = prompt.shape
        cache: list = []
        pos = torch.arange(t).expand(b, t)
        logits = self.step(m.wte(prompt) + m.wpe(pos), cache, causal=True)
        out = []
        for s in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            out.append(tok)
            if s + 1 == steps:
                break
            pos = torch.full((b, 1), t + s, dtype=torch.long)
            logits = self.step(m.wte(tok) + m.wpe(pos), cache, causal=False)
        return torch.cat(out, dim=1)
