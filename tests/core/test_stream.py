"""StreamingGenerator: reproducible chunks, prompt switches at boundaries, context, bounded memory."""

from __future__ import annotations

import pytest
import torch

from causvid_core.config import PRESETS, CausalConfig, SamplingConfig
from causvid_core.model import CausalWanModel
from causvid_core.stream import StreamingGenerator

TINY = PRESETS["tiny"]
CAUSAL = CausalConfig(chunk_frames=3, sink_chunks=1, window_chunks=2)


@pytest.fixture(scope="module")
def model() -> CausalWanModel:
    torch.manual_seed(3)
    m = CausalWanModel(TINY.dit).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 6, TINY.dit.text_dim, generator=g), torch.randn(
        1, 6, TINY.dit.text_dim, generator=g
    )


def _gen(model, prompt, seed=0, **kw) -> StreamingGenerator:
    return StreamingGenerator(
        model, prompt, latent_size=(4, 4), seed=seed, causal=kw.pop("causal", CAUSAL), **kw
    )


def test_same_seed_same_video_however_consumed(model, prompts) -> None:
    a = torch.cat(list(_gen(model, prompts[0]).stream(5)), dim=2)
    b_gen, other = _gen(model, prompts[0]), _gen(model, prompts[1], seed=9)
    parts = []
    for _ in range(5):  # interleave another stream and global RNG use between chunks
        torch.randn(100)
        other.next_chunk()
        parts.append(b_gen.next_chunk())
    assert torch.equal(a, torch.cat(parts, dim=2))
    c = torch.cat(list(_gen(model, prompts[0], seed=1).stream(5)), dim=2)
    assert (a - c).abs().mean().item() > 0.1


def test_prompt_switch_at_chunk_k_leaves_earlier_chunks_unchanged(model, prompts) -> None:
    base = list(_gen(model, prompts[0]).stream(6))
    for recache in (False, True):
        gen = _gen(model, prompts[0])
        out = [gen.next_chunk() for _ in range(3)]
        gen.set_prompt(prompts[1], recache=recache)
        out += [gen.next_chunk() for _ in range(3)]
        for k in range(3):
            assert torch.equal(out[k], base[k])
        assert (out[3] - base[3]).abs().mean().item() > 1e-3


def test_recache_rebuilds_the_window_under_the_new_prompt(model, prompts) -> None:
    gen = _gen(model, prompts[0])
    for _ in range(5):
        gen.next_chunk()
    window = gen.window_latents
    gen.set_prompt(prompts[1])
    gen.recache()
    fresh = _gen(model, prompts[1])
    with torch.no_grad():
        for start, lat in window:
            t = torch.zeros(1, lat.shape[2])
            fresh.model(lat, t, fresh._current.cross, cache=fresh.cache, start_frame=start, write_cache=True)
    n = fresh.cache.num_tokens
    assert [c.start_frame for c in gen.cache.chunks] == [s for s, _ in window] == [0, 9, 12]
    for layer in range(TINY.dit.num_layers):
        assert torch.allclose(gen.cache.keys[layer][:, :n], fresh.cache.keys[layer][:, :n], atol=1e-6)
        assert torch.allclose(gen.cache.values[layer][:, :n], fresh.cache.values[layer][:, :n], atol=1e-6)
    # recache_on_switch does exactly that at the next chunk boundary
    auto = _gen(model, prompts[0], recache_on_switch=True)
    for _ in range(5):
        auto.next_chunk()
    auto.set_prompt(prompts[1])
    assert torch.equal(auto.next_chunk(), gen.next_chunk())


def test_blend_passes_through_intermediate_prompts(model, prompts) -> None:
    def run(blend: int | None) -> list[torch.Tensor]:
        gen = _gen(model, prompts[0])
        out = [gen.next_chunk() for _ in range(2)]
        if blend is not None:
            gen.set_prompt(prompts[1], blend_chunks=blend)
        return out + [gen.next_chunk() for _ in range(3)]

    hard, none, blended = run(0), run(None), run(2)
    assert torch.equal(blended[1], hard[1])
    # chunk 2 sits a third of the way between the prompts: unlike either endpoint
    assert (blended[2] - hard[2]).abs().mean() > 1e-3 and (blended[2] - none[2]).abs().mean() > 1e-3


def test_prefilled_history_continues_the_stream_exactly(model, prompts) -> None:
    """Continuation: a new stream fed the first chunks' clean latents generates the same next chunk."""
    ref = list(_gen(model, prompts[0]).stream(5))
    cont = _gen(model, prompts[0])
    cont.prefill(torch.cat(ref[:4], dim=2), chunk_sizes=[3, 3, 3, 3])
    cont.chunk_index = 4  # the noise of chunk i depends only on (seed, i)
    assert torch.allclose(cont.next_chunk(), ref[4], atol=1e-5)


def test_image_seed_first_chunk_layout(model, prompts) -> None:
    causal = CausalConfig(chunk_frames=3, first_chunk_frames=1, sink_chunks=1, window_chunks=2)
    gen = _gen(model, prompts[0], causal=causal)
    image_latent = torch.randn(1, TINY.dit.in_dim, 1, 4, 4)
    gen.prefill(image_latent)
    chunk = gen.next_chunk()
    assert chunk.shape[2] == 3 and gen.next_frame == 4
    plain = _gen(model, prompts[0], causal=causal)
    assert plain.next_chunk().shape[2] == 1  # [1, 3, 3, ...] without an image: the first chunk is one frame
    other = _gen(model, prompts[0], causal=causal)
    other.prefill(torch.randn(1, TINY.dit.in_dim, 1, 4, 4))
    assert (other.next_chunk() - chunk).abs().mean() > 1e-3  # the image conditions what follows


def test_long_stream_holds_constant_memory(model, prompts) -> None:
    gen = _gen(model, prompts[0], sampling=SamplingConfig(denoising_steps=(1000, 500)))
    nbytes = gen.cache.nbytes
    for chunk in gen.stream(14):
        assert torch.isfinite(chunk).all()
    assert gen.cache.nbytes == nbytes
    assert len(gen.window_latents) == CAUSAL.sink_chunks + CAUSAL.window_chunks
    assert [s for s, _ in gen.window_latents] == [0, 36, 39]
    assert gen.next_frame == 42


def test_bad_context_names_the_expected_shape(model, prompts) -> None:
    gen = _gen(model, prompts[0])
    with pytest.raises(ValueError, match=r"\[B, 16, F, 4, 4\]"):
        gen.prefill(torch.randn(1, 4, 1, 4, 4))
    with pytest.raises(ValueError, match="text context must be"):
        gen.set_prompt(torch.randn(1, 6, 7))


def test_video_to_video_strength(model, prompts) -> None:
    """Low strength stays near the source; strength 1 ignores it; the first step is the strength's own
    timestep, then the list below it, so every strength setting differs (not just two of them)."""
    src = torch.randn(1, TINY.dit.in_dim, 3, 4, 4)
    gen = _gen(model, prompts[0])
    assert gen.steps_for_strength(1.0) == [1000.0, 757.0, 522.0]
    assert gen.steps_for_strength(0.757) == [757.0, 522.0]  # on the list: from there
    assert gen.steps_for_strength(0.9) == [900.0, 757.0, 522.0]
    assert gen.steps_for_strength(0.6) == [600.0, 522.0]
    assert gen.steps_for_strength(0.3) == [300.0]  # below the list: one step from its own timestep
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        gen.steps_for_strength(0.0)
    full = _gen(model, prompts[0]).next_chunk(3)
    restyled_full = _gen(model, prompts[0]).next_chunk(init=src, strength=1.0)
    restyled_half = _gen(model, prompts[0]).next_chunk(init=src, strength=0.6)
    assert torch.allclose(full, restyled_full, atol=1e-5)  # the source is fully noised away
    other_src = _gen(model, prompts[0]).next_chunk(init=src + 1.0, strength=0.6)
    assert (other_src - restyled_half).abs().mean() > 1e-2  # a partly noised source carries through
    # a lower strength keeps more of the source: 0.3 and 0.45 differ (both started at 522 before)
    low, mid = (_gen(model, prompts[0]).next_chunk(init=src, strength=s) for s in (0.3, 0.45))
    assert (low - mid).abs().mean() > 1e-3
    assert (low - src).abs().mean() < (restyled_full - src).abs().mean()
