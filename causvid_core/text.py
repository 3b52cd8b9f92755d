"""Text encoders: the ``TextEncoder`` protocol and the small fixed encoder of the Shapes domain.

The Shapes domain (rendered by ``training/shapes.py``) is the synthetic video domain the embedded
model is trained on. Its vocabulary and palette live here, the single source of truth: ``training/shapes.py`` (the
renderer and prompt parser) imports them from this module, never the other way round.

``ShapesTextEncoder`` maps each word of a prompt to a fixed row of a seeded embedding table
(orthonormal rows scaled to unit RMS) plus a sinusoidal position code, and pads with zeros to
``text_len``; nothing in it is trained, so the table is saved next to the model weights and reloaded
exactly (``state_dict`` / ``from_state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

# The Shapes palette (RGB, 0-255) and vocabulary.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}
DEFAULT_BACKGROUND = "black"
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
FILLER_WORDS: tuple[str, ...] = ("a", "moving", "on", "background")
SHAPES_VOCAB: tuple[str, ...] = FILLER_WORDS + tuple(COLOURS) + SHAPE_NAMES + DIRECTIONS + tuple(BACKGROUNDS)
SHAPES_GRAMMAR = "a {colour} {shape} moving {direction}[ on a {background} background]"
SHAPES_MAX_WORDS = 9  # "a red circle moving right on a gray background"


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns prompts into cross-attention context [B, text_len, text_dim]."""

    text_dim: int
    text_len: int

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Encode a batch of prompts to float32 [B, text_len, text_dim]."""
        ...


def _vocabulary_hint() -> str:
    return f"the Shapes vocabulary is: {', '.join(SHAPES_VOCAB)} (grammar: {SHAPES_GRAMMAR!r})"


def tokenize_shapes(prompt: str) -> list[int]:
    """Split a prompt into word ids over ``SHAPES_VOCAB`` (case and outer whitespace ignored)."""
    ids = []
    for word in prompt.strip().lower().split():
        if word not in SHAPES_VOCAB:
            raise ValueError(f"unknown word {word!r} in prompt {prompt!r}; {_vocabulary_hint()}")
        ids.append(SHAPES_VOCAB.index(word))
    return ids


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """Fixed position code: pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(same)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe.float()


def _token_table(vocab_size: int, dim: int, seed: int) -> Tensor:
    """Seeded [vocab, dim] table with orthonormal rows (when vocab <= dim) scaled to unit RMS."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(dim, vocab_size, generator=gen, dtype=torch.float64)
    if vocab_size <= dim:
        q, r = torch.linalg.qr(raw)  # q [dim, vocab], orthonormal columns
        rows = (q * torch.sign(torch.diagonal(r))).T  # fix the sign convention of QR
    else:
        rows = raw.T
    rows = rows / rows.pow(2).mean(dim=1, keepdim=True).sqrt()
    return rows.float()


class ShapesTextEncoder:
    """Fixed word-embedding encoder over the Shapes vocabulary: [B, text_len, text_dim], zero padded."""

    STATE_KEYS = frozenset({"token_embedding", "position_embedding"})  # state_dict() / text.safetensors

    vocab: tuple[str, ...] = SHAPES_VOCAB

    def __init__(self, text_dim: int, text_len: int = 16, seed: int = 0) -> None:
        if text_dim < 2:
            raise ValueError(f"text_dim must be at least 2, got {text_dim}")
        if text_len < SHAPES_MAX_WORDS:
            raise ValueError(
                f"text_len {text_len} cannot hold the longest Shapes prompt ({SHAPES_MAX_WORDS} words, "
                f"e.g. 'a red circle moving right on a gray background'); use text_len >= {SHAPES_MAX_WORDS}"
            )
        self.text_dim = text_dim
        self.text_len = text_len
        self.token_embedding = _token_table(len(SHAPES_VOCAB), text_dim, seed)  # [V, D]
        self.position_embedding = sinusoidal_positions(text_len, text_dim)  # [L, D]

    def encode(self, prompts: Sequence[str] | str, device: torch.device | str | None = None) -> Tensor:
        """Embed each word (table row + position code), zeros after the last word: [B, L, D]."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.zeros(len(prompts), self.text_len, self.text_dim)
        for b, prompt in enumerate(prompts):
            ids = tokenize_shapes(prompt)
            if len(ids) > self.text_len:
                raise ValueError(
                    f"prompt {prompt!r} has {len(ids)} words but text_len is {self.text_len}; "
                    f"shorten it to the grammar {SHAPES_GRAMMAR!r}"
                )
            n = len(ids)
            out[b, :n] = self.token_embedding[ids] + self.position_embedding[:n]
        return out if device is None else out.to(device)

    __call__ = encode

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (safetensors-ready): the token table [V, D] and the position code [L, D]."""
        return {
            "token_embedding": self.token_embedding.clone(),
            "position_embedding": self.position_embedding.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ShapesTextEncoder:
        """Rebuild an encoder from ``state_dict()``, checking every key and shape."""
        expected = cls.STATE_KEYS
        if set(state) != expected:
            raise ValueError(
                f"ShapesTextEncoder state has keys {sorted(state)}, expected {sorted(expected)} "
                "(missing: {}, unexpected: {})".format(
                    sorted(expected - set(state)), sorted(set(state) - expected)
                )
            )
        tok, pos = state["token_embedding"], state["position_embedding"]
        if tok.ndim != 2 or tok.shape[0] != len(SHAPES_VOCAB):
            raise ValueError(
                f"token_embedding has shape {tuple(tok.shape)}, expected [{len(SHAPES_VOCAB)}, text_dim] "
                f"(one row per word of {', '.join(SHAPES_VOCAB)})"
            )
        if pos.ndim != 2 or pos.shape[1] != tok.shape[1]:
            raise ValueError(
                f"position_embedding has shape {tuple(pos.shape)}, expected [text_len, {tok.shape[1]}]"
            )
        enc = cls(text_dim=tok.shape[1], text_len=pos.shape[0])
        enc.token_embedding = tok.detach().float().clone()
        enc.position_embedding = pos.detach().float().clone()
        return enc
