"""A small BERT-style encoder (post-norm, hand-written attention) with a tanh pooler."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import ModelAndInputs, randomize_norms, seeded

VOCAB_SIZE = 1000
MAX_POSITIONS = 128
SEQ_LEN = 32
D_MODEL = 256
N_HEADS = 4
D_FFN = 1024
N_LAYERS = 4
DROPOUT = 0.1


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value projections."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.scale = 1.0 / math.sqrt(self.d_head)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the sequence of (B, S, D) hidden states; returns (B, S, D)."""
        b, s = x.shape[0], x.shape[1]
        q = self.query(x).view(b, s, self.n_heads, self.d_head).transpose(1, 2)
        k = self.key(x).view(b, s, self.n_heads, self.d_head).transpose(1, 2)
        v = self.value(x).view(b, s, self.n_heads, self.d_head).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) * self.scale
        probs = self.dropout(torch.softmax(scores, dim=-1))
        context = (probs @ v).transpose(1, 2).contiguous().view(b, s, self.d_model)
        return self.out(context)


class BertLayer(nn.Module):
    """Post-norm encoder layer: attention, add & norm, feed-forward (exact GELU), add & norm."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float) -> None:
        super().__init__()
        self.attention = BertSelfAttention(d_model, n_heads, dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_ffn), nn.GELU(), nn.Linear(d_ffn, d_model), nn.Dropout(dropout)
        )
        self.ffn_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform (B, S, D) hidden states."""
        x = self.attention_norm(x + self.attention_dropout(self.attention(x)))
        return self.ffn_norm(x + self.ffn(x))


class BertEncoder(nn.Module):
    """Token + position embeddings, a stack of BertLayers, and a pooler over the first token."""

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        max_positions: int = MAX_POSITIONS,
        d_model: int = D_MODEL,
        n_heads: int = N_HEADS,
        d_ffn: int = D_FFN,
        n_layers: int = N_LAYERS,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_positions, d_model)
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0))
        self.embedding_norm = nn.LayerNorm(d_model)
        self.embedding_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            BertLayer(d_model, n_heads, d_ffn, dropout) for _ in range(n_layers)
        )
        self.pooler = nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Map (B, S) int64 token ids to (B, D) pooled features."""
        seq_len = input_ids.shape[1]
        positions = self.position_ids.narrow(1, 0, seq_len)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        x = self.embedding_dropout(self.embedding_norm(x))
        for layer in self.layers:
            x = layer(x)
        return self.pooler(x[:, 0])


def bert(batch: int = 1, seed: int = 0) -> ModelAndInputs:
    """Build the 4-layer BERT encoder with a (batch, 32) int64 token-id input."""
    with seeded(seed) as generator:
        model = BertEncoder()
        randomize_norms(model, generator)
        input_ids = torch.randint(0, VOCAB_SIZE, (batch, SEQ_LEN), generator=generator)
    return model.eval(), (input_ids,)
