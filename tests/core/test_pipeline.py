"""The render pipeline: prompt timelines on chunks, context first, nothing lost on interrupt."""

from __future__ import annotations

import pytest
import torch

from causvid_core.bundle import load_bundle
from causvid_core.pipeline import (
    PromptTimeline,
    RenderRequest,
    RenderState,
    encode_schedule,
    num_chunks,
    render,
    seconds_to_frames,
)
from tests.helpers import make_embedded


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    make_embedded(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAUSVID_EMBEDDED_PATH", str(root))
        return load_bundle("embedded:testshapes")


def _encode(bundle):
    return lambda prompt: bundle.text_encoder.encode([prompt])


def test_request_checks_sizes_and_lengths() -> None:
    assert RenderRequest(64, 64, 160).latent_frames == 41  # 1 + ceil(159 / 4)
    assert seconds_to_frames(10, 16) == 160
    with pytest.raises(ValueError, match="height 70 is not a multiple of 16; use 64 or 80"):
        RenderRequest(64, 70, 10)
    with pytest.raises(ValueError, match="at least 1 frame"):
        RenderRequest(64, 64, 0)


def test_schedule_switches_at_its_chunk_and_not_before(bundle) -> None:
    req = RenderRequest(32, 32, 49, seed=3)  # 13 latent frames: chunks [3, 3, 3, 3, 1]
    sched = encode_schedule("0: a red circle moving right\n0:01.5 a blue square moving left", "second",
                            _encode(bundle))  # fmt: skip
    timeline = sched.timeline(16, bundle.causal)
    assert sorted(timeline.changes) == [0, 2]  # 1.5 s = frame 24 = latent 6 = start of chunk 2
    switched = render(bundle.model, timeline, req, sampling=bundle.sampling, causal=bundle.causal).latents
    single = render(bundle.model, PromptTimeline.single(timeline.changes[0]), req,
                    sampling=bundle.sampling, causal=bundle.causal).latents  # fmt: skip
    assert [x.shape[2] for x in switched] == [3, 3, 3, 3, 1]
    assert torch.equal(switched[0], single[0]) and torch.equal(switched[1], single[1])
    assert (switched[2] - single[2]).abs().mean() > 1e-3


def test_interrupt_keeps_every_finished_chunk(bundle) -> None:
    req = RenderRequest(32, 32, 49)
    cond = bundle.text_encoder.encode(["a red circle moving right"])
    written = []

    class Writer:
        def write(self, frames):
            written.append(frames)

    class Decoder:
        def decode(self, latents):
            return torch.zeros(1, 3, 4 * latents.shape[2], 32, 32)

    def stop_after_two(event):
        if event.index == 1:
            raise KeyboardInterrupt

    state = RenderState()
    with pytest.raises(KeyboardInterrupt):
        render(bundle.model, PromptTimeline.single(cond), req, decoder=Decoder(), writer=Writer(),
               on_chunk=stop_after_two, sampling=bundle.sampling, causal=bundle.causal, state=state)  # fmt: skip
    assert state.chunks_done == 2 and len(state.latents) == 2
    assert sum(f.shape[0] for f in written) == state.frames_written == 24


def test_context_latents_come_first(bundle) -> None:
    req = RenderRequest(32, 32, 17)  # 5 latent frames: the image latent + chunks [3, 1]
    cond = bundle.text_encoder.encode(["a red circle moving right"])
    image = torch.randn(1, 16, 1, 4, 4)
    events = []
    render(bundle.model, PromptTimeline.single(cond), req, context_latents=image, on_chunk=events.append,
           sampling=bundle.sampling, causal=bundle.causal)  # fmt: skip
    assert [(e.start_frame, e.latents.shape[2]) for e in events] == [(1, 3), (4, 1)]
    assert num_chunks(req, bundle.causal, context_frames=1) == 2
    with pytest.raises(ValueError, match="covered by the 5 context latent frames"):
        render(bundle.model, PromptTimeline.single(cond), req, context_latents=torch.randn(1, 16, 5, 4, 4),
               sampling=bundle.sampling, causal=bundle.causal)  # fmt: skip


def test_schedule_errors_name_the_line(bundle) -> None:
    with pytest.raises(ValueError, match=r"line 2: .*'purple'"):
        encode_schedule(
            "0: a red circle moving right\n3: a purple circle moving right", "chunk", _encode(bundle)
        )
