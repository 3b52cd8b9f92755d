"""The Shapes text encoder: deterministic fixed embeddings, zero padding, clear errors, state round-trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from causvid_core.text import SHAPES_VOCAB, ShapesTextEncoder, TextEncoder

PROMPT = "a red circle moving right on a gray background"


def test_same_seed_gives_identical_embeddings_across_instances() -> None:
    a = ShapesTextEncoder(text_dim=32, text_len=12, seed=3).encode([PROMPT, "a blue square moving up"])
    b = ShapesTextEncoder(text_dim=32, text_len=12, seed=3).encode([PROMPT, "a blue square moving up"])
    c = ShapesTextEncoder(text_dim=32, text_len=12, seed=4).encode([PROMPT, "a blue square moving up"])
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_shape_dtype_and_zero_padding_after_the_words() -> None:
    enc = ShapesTextEncoder(text_dim=24, text_len=12)
    out = enc.encode([PROMPT, "a red circle moving right", ""])
    assert out.shape == (3, 12, 24) and out.dtype == torch.float32
    assert isinstance(enc, TextEncoder) and enc.text_dim == 24 and enc.text_len == 12
    assert out[0, :9].abs().sum(-1).min() > 0 and torch.all(out[0, 9:] == 0)
    assert out[1, :5].abs().sum(-1).min() > 0 and torch.all(out[1, 5:] == 0)
    assert torch.all(out[2] == 0)  # the empty prompt is the unconditional context


def test_every_slot_changes_the_embedding() -> None:
    enc = ShapesTextEncoder(text_dim=32)
    variants = [
        PROMPT,
        PROMPT.replace("red", "blue"),
        PROMPT.replace("circle", "triangle"),
        PROMPT.replace("right", "left"),
        PROMPT.replace("gray", "white"),
    ]
    out = enc.encode(variants).flatten(1)
    for i in range(len(variants)):
        for j in range(i + 1, len(variants)):
            assert not torch.allclose(out[i], out[j]), (variants[i], variants[j])


def test_case_and_whitespace_do_not_matter() -> None:
    enc = ShapesTextEncoder(text_dim=16)
    assert torch.equal(
        enc.encode(["  A Red  CIRCLE moving right \n"]), enc.encode(["a red circle moving right"])
    )


def test_word_rows_are_orthogonal_with_unit_rms() -> None:
    table = ShapesTextEncoder(text_dim=64).state_dict()["token_embedding"]
    assert table.shape == (len(SHAPES_VOCAB), 64)
    assert torch.allclose(table.pow(2).mean(1), torch.ones(len(SHAPES_VOCAB)), atol=1e-5)
    gram = table @ table.T / 64
    assert torch.allclose(gram, torch.eye(len(SHAPES_VOCAB)), atol=1e-5)


def test_unknown_word_error_names_the_word_and_lists_the_vocabulary() -> None:
    enc = ShapesTextEncoder(text_dim=16)
    with pytest.raises(ValueError, match="'purple'") as info:
        enc.encode(["a purple circle moving right"])
    for word in SHAPES_VOCAB:
        assert word in str(info.value)


def test_text_len_too_short_for_the_grammar_is_refused() -> None:
    with pytest.raises(ValueError, match="text_len >= 9"):
        ShapesTextEncoder(text_dim=16, text_len=8)


def test_state_dict_round_trips_through_safetensors(tmp_path) -> None:
    enc = ShapesTextEncoder(text_dim=20, text_len=10, seed=7)
    save_file(enc.state_dict(), str(tmp_path / "text.safetensors"))
    back = ShapesTextEncoder.from_state_dict(load_file(str(tmp_path / "text.safetensors")))
    assert (back.text_dim, back.text_len) == (20, 10)
    assert torch.equal(back.encode([PROMPT]), enc.encode([PROMPT]))


def test_from_state_dict_names_missing_keys_and_bad_shapes() -> None:
    state = ShapesTextEncoder(text_dim=16).state_dict()
    with pytest.raises(ValueError, match="missing: \\['position_embedding'\\]"):
        ShapesTextEncoder.from_state_dict({"token_embedding": state["token_embedding"]})
    with pytest.raises(ValueError, match="one row per word"):
        ShapesTextEncoder.from_state_dict({**state, "token_embedding": state["token_embedding"][:5]})
