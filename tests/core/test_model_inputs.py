"""Bad inputs to the transformer fail with messages that name the expected shape."""

from __future__ import annotations

import pytest
import torch

from causvid_core.config import PRESETS
from causvid_core.model import CausalWanModel

TINY = PRESETS["tiny"].dit


@pytest.fixture(scope="module")
def model() -> CausalWanModel:
    return CausalWanModel(TINY).eval()


def test_timestep_shapes(model) -> None:
    x = torch.randn(2, TINY.in_dim, 3, 4, 4)
    ctx = torch.randn(2, 4, TINY.text_dim)
    with torch.no_grad():
        scalar = model(x, torch.tensor(500.0), ctx)
        per_sample = model(x, torch.tensor([500.0, 500.0]), ctx)
        per_frame = model(x, torch.full((2, 3), 500.0), ctx)
    assert torch.equal(scalar, per_sample) and torch.equal(per_sample, per_frame)
    with pytest.raises(ValueError, match=r"scalar, \[B\] or \[B, F\] = \[2, 3\], got \[4\]"):
        model(x, torch.zeros(4), ctx)


def test_latent_and_text_errors(model) -> None:
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, F, H, W\]"):
        model(torch.randn(1, 4, 3, 4, 4), torch.zeros(1), torch.randn(1, 4, TINY.text_dim))
    with pytest.raises(ValueError, match=r"text context must be \[B, L, 32\]"):
        model(torch.randn(1, 16, 3, 4, 4), torch.zeros(1), torch.randn(1, 4, 4096))
    with pytest.raises(ValueError, match="not divisible by the patch|not divisible by patch"):
        model(torch.randn(1, 16, 3, 5, 4), torch.zeros(1), torch.randn(1, 4, TINY.text_dim))


def test_long_text_is_cut_to_the_trained_length_with_a_warning(model) -> None:
    ctx = torch.randn(1, TINY.text_len + 5, TINY.text_dim)
    with pytest.warns(UserWarning, match="shorten the prompt"):
        long = model.encode_context(ctx)
    cut = model.encode_context(ctx[:, : TINY.text_len])
    assert torch.equal(long.keys[0], cut.keys[0])


def test_attention_backends(model) -> None:
    x = torch.randn(1, TINY.in_dim, 6, 4, 4)
    ctx = torch.randn(1, 4, TINY.text_dim)
    t = torch.rand(1, 6) * 1000
    with torch.no_grad():
        auto = model(x, t, ctx, chunk_sizes=[3, 3])
        model.set_attention_backend("math")
        try:
            math_out = model(x, t, ctx, chunk_sizes=[3, 3])
        finally:
            model.set_attention_backend("auto")
    assert (auto - math_out).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="needs a CUDA GPU; use 'auto' or 'math'"):
        model.set_attention_backend("flash")
    with pytest.raises(ValueError, match="choose one of auto, math"):
        model.set_attention_backend("fastest")


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients(monkeypatch) -> None:
    """--grad-ckpt (on in the Wan preset) trades compute for memory: every block runs again in the
    backward pass, and every parameter's gradient is the plain path's."""
    torch.manual_seed(0)
    net = CausalWanModel(TINY)
    x, t, ctx = torch.randn(2, 16, 3, 4, 4), torch.tensor([300.0, 700.0]), torch.randn(2, 4, TINY.text_dim)
    calls = []
    block_type = type(net.blocks[0])
    forward = block_type.forward
    monkeypatch.setattr(block_type, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    grads = {}
    for ckpt in (False, True):
        net.zero_grad()
        net.gradient_checkpointing = ckpt
        calls.clear()
        net(x, t, ctx, chunk_sizes=[3]).pow(2).mean().backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        assert len(calls) == len(net.blocks) * (2 if ckpt else 1)  # recomputed in the backward pass
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-6, msg=name)
