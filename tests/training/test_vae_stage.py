"""The ``vae`` stage: trains, stores latent statistics the rest of the recipe and the bundle read."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from causvid_core.bundle import LATENTS_META
from causvid_core.config import PRESETS
from causvid_core.vae import WanVAE, latent_stats_of, load_wan_vae
from training import distill
from training.config import ConfigError, make_config, parse_cli
from training.data import build_codec
from training.shapes import ShapesDataset, render_video, to_model_range
from training.vae_stage import LATENTS_META as STAGE_META
from training.vae_stage import pixel_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metadata_key_matches_the_bundle() -> None:
    assert STAGE_META == LATENTS_META


def test_vae_stage_learns_and_stores_latent_statistics(tmp_path) -> None:
    cfg = make_config("vae", "tiny", {"runs_dir": str(tmp_path), "steps": "40", "save_every": "40",
                                      "lr": "3e-3", "stats_samples": "8", "clip_frames": "5",
                                      "lr_warmup": "5"})  # fmt: skip
    assert cfg.data_size == 2  # the tiny preset cycles over two clips: the loss must fall on them
    result = distill.run("vae", cfg)
    rows = result["rows"]
    first = np.mean([r["psnr"] for r in rows[:5]])
    last = np.mean([r["psnr"] for r in rows[-5:]])
    assert last > first + 3.0, (first, last)  # reconstruction improves (dB)
    assert all("wall_s" in r for r in rows) and rows[-1]["wall_s"] > rows[0]["wall_s"]
    lrs = [r["lr"] for r in rows]  # the shared schedule: warm-up, then the last 30% fall toward 10%
    assert lrs[0] < lrs[4] == pytest.approx(3e-3) == lrs[27] and lrs[-1] < 0.2 * 3e-3

    final = tmp_path / "shapes" / "vae" / "final.safetensors"
    stats = latent_stats_of(final)
    assert stats is not None and stats == tuple(tuple(v) for v in (result["latents"]["mean"],
                                                                   result["latents"]["std"]))  # fmt: skip
    vae = load_wan_vae(final)
    assert vae.config.latents_mean == stats[0] and vae.config.latents_std == stats[1]

    # The DiT stages see unit-scale latents: normalised latents of fresh clips ~ zero mean, unit std.
    dit_cfg = make_config("teacher", "tiny", {"runs_dir": str(tmp_path), "vae": "run"})
    codec = build_codec(dit_cfg)
    clips = torch.stack([ShapesDataset(cfg.num_frames, cfg.height, seed=99).sample(i)[0] for i in range(8)])
    z = codec.encode(clips).transpose(0, 1).reshape(16, -1)
    assert z.mean(1).abs().max() < 0.6 and (z.std(1) - 1).abs().max() < 0.5


def test_vae_lr_options_are_the_other_stages_ones(tmp_path) -> None:
    """--lr-decay 0 keeps the VAE's lr constant after warm-up (it used to be overridden by a fixed 30%
    decay), and the old --warmup-steps answers with its new name."""
    cfg = make_config("vae", "tiny", {"runs_dir": str(tmp_path), "steps": "6", "save_every": "6",
                                      "stats_samples": "2", "clip_frames": "5", "lr": "1e-3",
                                      "lr_warmup": "2", "lr_decay": "0"})  # fmt: skip
    lrs = [r["lr"] for r in distill.run("vae", cfg)["rows"]]
    assert lrs == pytest.approx([5e-4] + [1e-3] * 5)
    with pytest.raises(ConfigError, match="--warmup-steps is now --lr-warmup"):
        parse_cli("vae", ["--warmup-steps", "5"])


def test_run_vae_missing_names_the_command(tmp_path) -> None:
    cfg = make_config("teacher", "tiny", {"runs_dir": str(tmp_path), "vae": "run", "name": "mine"})
    with pytest.raises(ConfigError, match=r"python -m training.distill vae --preset tiny --name mine"):
        build_codec(cfg)


def test_object_pixels_weigh_more_also_when_the_object_covers_a_corner() -> None:
    video = to_model_range(render_video("a red square moving right on a white background", 3, 5, 64))[None]
    video[:, :, :, :10, :10] = (
        torch.tensor([230, 40, 40]).view(1, 3, 1, 1, 1) / 127.5 - 1
    )  # object at a corner
    w = pixel_weights(video, 10.0)
    assert w.shape == (1, 1, 5, 64, 64)
    assert w[0, 0, 0, 0, 0] == 10.0  # the corner patch is object
    frame = video[0, :, 0]
    background = (frame - 1.0).abs().sum(0) < 1e-6  # pure white pixels
    assert (w[0, 0, 0][background] == 1.0).all()
    assert (w[0, 0, 0][~background] == 10.0).float().mean() > 0.9  # anti-aliased edges may fall below 80


def test_the_background_is_found_when_a_wrapped_object_covers_every_corner() -> None:
    """Objects wrap around the canvas: one that starts at a corner shows in all four. The losses that
    separate object from background (pixel weights, mask, the latent codes) must still find the object."""
    from training.vae_stage import background, object_cover

    video = to_model_range(render_video("a yellow square moving down on a gray background", 3, 5, 64))[None]
    yellow = torch.tensor([230, 220, 40]).view(1, 3, 1, 1, 1) / 127.5 - 1
    video[...] = torch.tensor([128, 128, 128]).view(1, 3, 1, 1, 1) / 127.5 - 1
    for rows in (slice(0, 7), slice(57, 64)):  # a 14 px square centred on the corner, in four pieces
        for cols in (slice(0, 7), slice(57, 64)):
            video[:, :, :, rows, cols] = yellow
    assert torch.allclose(background(video).flatten(), torch.full((3,), 128 / 127.5 - 1), atol=1e-6)
    cover = object_cover(video)[0, 0, 0]  # [8, 8] cells
    assert cover.sum() == pytest.approx(4 * 49 / 64) and cover[3:5, 3:5].sum() == 0


def test_clip_frames_must_fit_the_time_stride() -> None:
    with pytest.raises(ConfigError, match="1 \\+ 4k"):
        make_config("vae", "tiny", {"clip_frames": "6"})


def test_a_loss_jump_undoes_the_last_update_and_training_goes_on(tmp_path, monkeypatch) -> None:
    from training import vae_stage

    real = vae_stage.vae_loss_and_recon
    calls = {"n": 0}

    def jumpy(*args):
        loss, parts, recon = real(*args)
        calls["n"] += 1
        return (loss * 100 if calls["n"] == 23 else loss), parts, recon  # step 22 (0-based) looks like a cliff

    monkeypatch.setattr(vae_stage, "vae_loss_and_recon", jumpy)
    cfg = make_config("vae", "tiny", {"runs_dir": str(tmp_path), "steps": "26", "save_every": "26",
                                      "lr": "1e-3", "stats_samples": "2", "lr_warmup": "2"})  # fmt: skip
    rows = distill.run("vae", cfg)["rows"]
    flags = [r["rolled_back"] for r in rows]
    assert flags[22] == 1.0 and sum(flags) == 1.0  # only the jump, and the steps after it train again
    assert rows[23]["grad_norm"] > 0 and rows[25]["grad_norm"] > 0


def test_large_gradients_are_skipped_as_spikes_but_not_forever(tmp_path) -> None:
    """A step whose gradient norm exceeds --skip-grad-norm is skipped, but after five in a row the large
    norm is the new level and the step is taken: skipping on would leave the weights frozen for the rest
    of the run (a tiny run at lr 3e-3 was seen to skip every step from step 16 to the end)."""
    cfg = make_config("vae", "tiny", {"runs_dir": str(tmp_path), "steps": "13", "save_every": "13",
                                      "stats_samples": "2", "clip_frames": "5", "lr_warmup": "1",
                                      "skip_grad_norm": "1e-9"})  # fmt: skip
    rows = distill.run("vae", cfg)["rows"]
    flags = [int(r["skipped"]) for r in rows]
    assert flags == [0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0]  # step 0 is warm-up; then 5 skipped, 1 taken
    assert rows[6]["grad_norm"] > 1e-9


def test_the_colour_guide_pulls_the_latent_toward_the_pooled_frames_then_fades() -> None:
    from training.vae_stage import guide_weight, vae_loss

    cfg = make_config("vae", "tiny", {"guide_steps": "10"})
    assert [guide_weight(s, cfg) for s in (0, 9, 10, 15, 20, 30)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    vae = WanVAE(cfg.arch)
    video = ShapesDataset(5, 32, seed=1).sample(0)[0][None]
    eps = torch.zeros(1, 16, 2, 4, 4)
    plain, parts = vae_loss(vae, video, eps, cfg, 0.0)
    guided, gparts = vae_loss(vae, video, eps, cfg, 1.0)
    assert "guide_latent" not in parts and gparts["guide_latent"] > 0
    assert guided.item() == pytest.approx(
        plain.item() + gparts["guide_latent"] + gparts["guide_recon"], rel=1e-5
    )


def tiny_vae_batch(cfg) -> tuple[WanVAE, torch.Tensor, torch.Tensor]:
    """A seeded tiny VAE, one 5-frame 32x32 Shapes clip and zero posterior noise: a loss evaluated twice
    on them differs only by the term under test."""
    torch.manual_seed(0)
    vae = WanVAE(cfg.arch)
    return vae, ShapesDataset(5, 32, seed=1).sample(0)[0][None], torch.zeros(1, 16, 2, 4, 4)


def test_the_channel_colour_guide_binds_three_channels_and_leaves_the_rest_free() -> None:
    """``--guide colour``: the first three latent channels are pulled onto each cell's mean colour and
    nothing else: no decoding from a guide latent, and no pull on the other channels (they keep the
    outline, which a full-latent guide erased into blobs)."""
    from training.vae_stage import pooled_colour, posterior, vae_loss

    cfg = make_config("vae", "tiny", {"guide_steps": "10", "guide": "colour"})
    vae, video, eps = tiny_vae_batch(cfg)
    plain, _ = vae_loss(vae, video, eps, cfg, 0.0)
    guided, gparts = vae_loss(vae, video, eps, cfg, 1.0)
    assert "guide_recon" not in gparts
    mu = posterior(vae, video)[0]
    expected = (mu[:, :3] - pooled_colour(video)).square().mean()
    assert gparts["guide_latent"] == pytest.approx(expected.item(), rel=1e-5)
    assert guided.item() == pytest.approx(plain.item() + expected.item(), rel=1e-5)
    (guided - plain).backward()  # the guide term alone
    head = vae.conv1.weight.grad.flatten(1).abs().sum(1)  # per output channel: 3 guided, 13 free, 16 logvar
    assert (head[:3] > 0).all() and (head[3:] == 0).all()


def test_colour_weight_adds_the_error_of_the_cell_colours() -> None:
    """``--colour-weight W`` adds W * MSE of the 8x8 cell means (the reconstruction's colours), so a
    decoder that draws the right outline in grey pays for it."""
    from training.vae_stage import posterior, reconstruct, vae_loss

    base = make_config("vae", "tiny", {})
    cfg = make_config("vae", "tiny", {"colour_weight": "10"})
    vae, video, eps = tiny_vae_batch(cfg)
    plain, _ = vae_loss(vae, video, eps, base, 0.0)
    weighted, parts = vae_loss(vae, video, eps, cfg, 0.0)
    recon = reconstruct(vae, posterior(vae, video)[0])
    pool = torch.nn.functional.avg_pool3d
    expected = (pool(recon, (1, 8, 8)) - pool(video, (1, 8, 8))).square().mean()
    assert parts["colour"] == pytest.approx(expected.item(), rel=1e-5)
    assert weighted.item() == pytest.approx(plain.item() + 10 * expected.item(), rel=1e-5)


def test_decoder_fine_tune_keeps_the_latents_and_sharpens_the_mask(tmp_path) -> None:
    """``vae --decoder-only true --mask-weight W``: starts from vae/final, leaves the encoder (so every
    latent and the stored statistics) untouched, writes vae-decoder/final, and lowers the mask loss."""
    from training.vae_stage import mask_loss

    base = {"runs_dir": str(tmp_path), "save_every": "20", "stats_samples": "8", "clip_frames": "5",
            "lr_warmup": "2"}  # fmt: skip
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "20", "lr": "3e-3"}))
    before = load_file(str(tmp_path / "shapes" / "vae" / "final.safetensors"))
    cfg = make_config("vae", "tiny", {**base, "steps": "30", "lr": "2e-3", "decoder_only": "true",
                                      "mask_weight": "1", "l1_weight": "0", "mse_weight": "0",
                                      "guide_steps": "20", "image_steps": "10"})  # fmt: skip
    rows = distill.run("vae", cfg)["rows"]
    assert np.mean([r["mask"] for r in rows[-5:]]) < np.mean([r["mask"] for r in rows[:5]])
    # the guide shapes the (frozen) encoder and would teach the decoder to draw its blob latent: off here
    assert not any("guide_latent" in r or "guide_recon" in r for r in rows)
    final = tmp_path / "shapes" / "vae-decoder" / "final.safetensors"
    after = load_file(str(final))
    encoder = [k for k in before if k.startswith(("encoder.", "conv1."))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert latent_stats_of(final) == latent_stats_of(tmp_path / "shapes" / "vae" / "final.safetensors")
    # its mid-run checkpoints carry the same statistics, so one can stand in front of a DiT
    mid = tmp_path / "shapes" / "vae-decoder" / "step_000020.safetensors"
    assert latent_stats_of(mid) == latent_stats_of(final)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_wan_vae(mid).config.latents_std == latent_stats_of(final)[1]
    # a full run's mid-run checkpoint has none yet (they are measured at its end): loading it says so
    with pytest.warns(UserWarning, match="without latent statistics"):
        load_wan_vae(tmp_path / "shapes" / "vae" / "step_000020.safetensors")

    # the loss itself: near zero for the true video (its anti-aliased edge), 20x that for a blurred copy
    video = to_model_range(render_video("a red triangle moving up", 1, 5, 64))[None]
    blurred = torch.nn.functional.avg_pool3d(video, (1, 5, 5), 1, (0, 2, 2), count_include_pad=False)
    assert 20 * mask_loss(video, video) < mask_loss(blurred, video)


def test_centroid_loss_measures_the_object_shift_in_pixels_across_the_wrap() -> None:
    """``--centroid-weight``: 0 for the video itself, 0.5 (Huber of 1 px) for a copy moved by one pixel,
    also when the object straddles the canvas edge (the wrapped centroid, as the figures measure it)."""
    from training.vae_stage import centroid_loss

    video = to_model_range(render_video("a red square moving right on a gray background", 3, 5, 64))[None]
    assert centroid_loss(video, video).item() == pytest.approx(0.0, abs=1e-5)
    assert centroid_loss(torch.roll(video, 1, dims=-1), video).item() == pytest.approx(0.5, abs=0.01)
    at_edge = torch.roll(video, 64 - int(video[0, 0, 0].gt(0.5).float().mean(0).argmax()), dims=-1)
    moved = torch.roll(at_edge, 1, dims=-1)  # straddling the left/right edge, one pixel further right
    assert centroid_loss(moved, at_edge).item() == pytest.approx(0.5, abs=0.01)
    assert centroid_loss(torch.roll(video, 3, dims=-1), video).item() == pytest.approx(2.5, abs=0.05)


def test_centroid_delta_makes_the_term_the_distance_itself_past_it() -> None:
    """``--centroid-delta D``: quadratic within D px, then the distance in px (slope 1), so a tenth of a pixel
    still pulls: a 1-px shift costs 0.95 at D = 0.1 (0.5 at the default 1); D must be positive."""
    from training.vae_stage import centroid_loss

    video = to_model_range(render_video("a red square moving right on a gray background", 3, 5, 64))[None]
    moved = torch.roll(video, 1, dims=-1)
    assert centroid_loss(moved, video, "coverage", beta=0.1).item() == pytest.approx(0.95, abs=0.01)
    assert centroid_loss(moved, video, "coverage").item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ConfigError, match="--centroid-delta"):
        make_config("vae", "tiny", {"centroid_delta": "0"})
    cfg = make_config("vae", "tiny", {"centroid_delta": "0.1"})
    assert cfg.centroid_delta == 0.1


def test_centroid_motion_counts_the_steps_not_a_steady_offset() -> None:
    """``--centroid-motion``: a drawing one pixel off in every frame costs nothing; one frame drawn a pixel
    off costs the two steps into and out of it (Huber 0.5 each, of 4 steps), by each read."""
    from training.vae_stage import centroid_loss

    video = to_model_range(render_video("a blue square moving down on a gray background", 3, 5, 64))[None]
    one_late = video.clone()
    one_late[:, :, 2] = torch.roll(video[:, :, 2], 1, dims=-1)
    for read in ("moment", "edge", "coverage"):
        assert centroid_loss(torch.roll(video, 1, dims=-1), video, read, motion=True).item() == pytest.approx(0.0, abs=1e-3)
        assert centroid_loss(one_late, video, read, motion=True).item() == pytest.approx(0.25, abs=0.02)
        assert centroid_loss(one_late, video, read).item() == pytest.approx(0.1, abs=0.01)  # per frame: 1 of 5


def test_the_centroid_flags_choose_the_term_vae_loss_adds(monkeypatch) -> None:
    """``--centroid-weight W --centroid-read R --centroid-motion M`` adds W times exactly
    ``centroid_loss(recon, clip, R, M)`` of the reconstruction, for each read and mode (the decoder here
    draws the clip with its middle frame a pixel late, so every read and mode sees a shift)."""
    from training import vae_stage

    base = make_config("vae", "tiny", {})
    vae, video, eps = tiny_vae_batch(base)
    drawn = video.clone()
    drawn[:, :, 2] = torch.roll(video[:, :, 2], 1, dims=-1)
    monkeypatch.setattr(vae_stage, "reconstruct", lambda vae, z: drawn)
    plain, _ = vae_stage.vae_loss(vae, video, eps, base, 0.0)
    for read in ("moment", "edge", "coverage"):
        seen = set()
        for motion in ("false", "true"):
            cfg = make_config("vae", "tiny", {"centroid_weight": "2", "centroid_read": read, "centroid_motion": motion})
            weighted, parts = vae_stage.vae_loss(vae, video, eps, cfg, 0.0)
            expected = vae_stage.centroid_loss(drawn, video, read, motion == "true").item()
            assert expected > 0.05 and parts["centroid"] == pytest.approx(expected, rel=1e-4)
            assert weighted.item() == pytest.approx(plain.item() + 2 * expected, rel=1e-4)
            seen.add(round(expected, 3))
        assert len(seen) == 2  # the flags reach the loss: the static term and the motion term differ


def test_coverage_read_takes_the_centroid_the_figures_take() -> None:
    """``--centroid-read coverage``: on frames with soft edges (a blurred triangle moving up, across the
    top/bottom edge) its centroid is training/metrics.py's to a thousandth of a pixel, steps of 1.5 px as
    the figures see them, where the soft 80-from-background mask ('moment') reads steps of 1.37 / 1.63."""
    from training.metrics import frame_stats
    from training.vae_stage import background, circular_centroid, coverage, object_logit

    video = to_model_range(render_video("a green triangle moving up on a gray background", 2, 5, 64))[None]
    blurred = torch.nn.functional.avg_pool3d(video, (1, 3, 3), 1, (0, 1, 1), count_include_pad=False)
    frames = ((torch.roll(blurred, 40, dims=-2)[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0)
    clip = to_model_range(frames.numpy())[None]
    to_px = lambda angles: (angles[0] / (2 * np.pi) * 64 % 64).numpy()  # noqa: E731
    ours = to_px(circular_centroid(coverage(clip, background(clip))))
    figures = frame_stats(frames.numpy(), (128, 128, 128)).centroid
    np.testing.assert_allclose(ours, figures, atol=1e-3)
    steps = np.abs(np.diff(ours[:, 1]))
    np.testing.assert_allclose(steps, 1.5, atol=0.01)
    moment = to_px(circular_centroid(torch.sigmoid(object_logit(clip, background(clip)))))
    assert np.abs(np.abs(np.diff(moment[:, 1])) - 1.5).max() > 0.1


def test_box_loss_reads_the_fill_ratio_as_the_figures_do_and_asks_for_the_corners_back() -> None:
    """``--box-weight``: the soft box term is 0 for the video itself and reads each frame's fill ratio as
    training/metrics.py does, also for an object straddling the canvas edge; a square drawn with its
    corners cut (what the decoders draw) costs something, and its gradient paints the corners back in;
    a stray pixel away from the object costs too (it adds a row and a column to the box)."""
    from training import metrics
    from training.vae_stage import background, box_loss, box_stats, centre_on, object_mask

    frames = render_video("a red square moving right on a gray background", 3, 5, 64)
    video = to_model_range(frames)[None]
    at_edge = torch.roll(video, 64 - int(video[0, 0, 0].gt(0.5).float().mean(0).argmax()) + 3, dims=-1)
    for clip in (video, at_edge):
        truth = object_mask(clip, background(clip))[:, 0]
        area, height, width = box_stats(centre_on(truth.float(), truth))
        rgb = ((clip[0].permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        expected = metrics.frame_stats(rgb, (128, 128, 128)).fill
        np.testing.assert_allclose((area / (height * width))[0].numpy(), expected, atol=1e-6)
        assert box_loss(clip, clip).item() == pytest.approx(0.0, abs=1e-4)

    cut = video.clone()
    truth = object_mask(video, background(video))[0, 0]  # [T, H, W]
    corners = torch.zeros_like(truth)
    for t in range(truth.shape[0]):
        ys, xs = torch.nonzero(truth[t], as_tuple=True)
        for y, x in ((ys.min(), xs.min()), (ys.min(), xs.max()), (ys.max(), xs.min()), (ys.max(), xs.max())):
            corners[t, y, x] = True
    cut[0][:, corners] = 128 / 127.5 - 1  # the gray background
    cut.requires_grad_(True)
    loss = box_loss(cut, video)
    loss.backward()
    assert loss.item() > 1e-4
    red = torch.tensor([230, 40, 40]) / 127.5 - 1
    towards_red = (red - cut.detach()[0][:, corners].T)  # [corners, 3]
    assert ((-cut.grad[0][:, corners].T) * towards_red).sum(-1).gt(0).all()  # descent repaints every corner

    stray = video.clone()
    stray[0, :, :, 2, 2] = red[:, None]  # one red pixel far from the object, in every frame
    assert box_loss(stray, video).item() > 100 * box_loss(video, video).item() + 1e-3


def test_box_weight_adds_the_box_term_of_the_reconstruction(monkeypatch) -> None:
    """``--box-weight W`` adds W times exactly ``box_loss(recon, clip)`` (the decoder here draws the clip
    blurred, so the object's box grows and its fill ratio falls)."""
    from training import vae_stage

    base = make_config("vae", "tiny", {})
    vae, video, eps = tiny_vae_batch(base)
    drawn = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(video, (1, 1, 1, 1, 0, 0), mode="circular"),
                                           (1, 3, 3), stride=1)
    monkeypatch.setattr(vae_stage, "reconstruct", lambda vae, z: drawn)
    plain, _ = vae_stage.vae_loss(vae, video, eps, base, 0.0)
    weighted, parts = vae_stage.vae_loss(vae, video, eps, make_config("vae", "tiny", {"box_weight": "3"}), 0.0)
    expected = vae_stage.box_loss(drawn, video).item()
    assert expected > 0.01 and parts["box"] == pytest.approx(expected, rel=1e-4)
    assert weighted.item() == pytest.approx(plain.item() + 3 * expected, rel=1e-4)

def test_edge_read_of_the_shift_matches_the_centroids_and_spreads_its_push_over_the_outline() -> None:
    """``--centroid-read edge``: the same 0.5 as the moment read for a one-pixel move (either axis, across the
    wrap), and its gradient on a triangle moved by a pixel leans on the tips less than the moment read's
    (what it is for). A misspelt read is refused with the choices."""
    from training.vae_stage import centroid_loss

    video = to_model_range(render_video("a red triangle moving right on a gray background", 3, 5, 64))[None]
    assert centroid_loss(video, video, "edge").item() == pytest.approx(0.0, abs=1e-5)
    for dims in (-1, -2):
        assert centroid_loss(torch.roll(video, 1, dims=dims), video, "edge").item() == pytest.approx(0.5, abs=0.02)
    at_edge = torch.roll(video, 64 - int(video[0, 0, 0].gt(0.5).float().mean(0).argmax()), dims=-1)
    assert centroid_loss(torch.roll(at_edge, 1, dims=-1), at_edge, "edge").item() == pytest.approx(0.5, abs=0.02)

    def tip_share(read: str) -> float:
        """mean |gradient| on the farthest fifth of the pushed pixels over that on the nearest fifth"""
        moved = torch.roll(video, 1, dims=-1).requires_grad_(True)
        centroid_loss(moved, video, read).backward()
        g = moved.grad[0].abs().sum(0)[2]
        ys, xs = torch.nonzero(g > 0.05 * g.max(), as_tuple=True)
        dist = torch.hypot(ys - ys.float().mean(), xs - xs.float().mean())
        return float(g[ys, xs][dist > dist.quantile(0.8)].mean() / g[ys, xs][dist < dist.quantile(0.2)].mean())

    assert tip_share("edge") < 0.7 * tip_share("moment")
    with pytest.raises(ConfigError, match="one of moment, edge"):
        centroid_loss(video, video, "centre")
    with pytest.raises(ConfigError, match="--centroid-read"):
        make_config("vae", "tiny", {"centroid_read": "centre"})


@pytest.mark.parametrize("mult", [(2, 2, 2, 2), (2, 4, 4, 4)])
def test_a_widened_decoder_draws_what_the_narrow_one_drew(mult) -> None:
    """``widen_decoder``: the tiny VAE's decoder widened (the last stage alone, where a new shortcut is needed,
    or every stage, attention included) decodes the same latents to the same video, and the wider file loads
    back anywhere with its decoder's widths read from its shapes (the latents, so every DiT, unchanged)."""
    import dataclasses

    from causvid_core.vae import VAEStreamState
    from training.vae_stage import widen_decoder

    cfg = make_config("vae", "tiny", {})
    vae, video, _ = tiny_vae_batch(cfg)
    with torch.no_grad():  # norms and biases away from their init, so a wrong copy shows
        for name, p in vae.named_parameters():
            if name.endswith(("gamma", "bias")):
                p.add_(0.3 * torch.randn_like(p))
    wide_cfg = dataclasses.replace(cfg.arch, decoder_dim_mult=mult)
    wide = WanVAE(wide_cfg)
    wide.load_state_dict(widen_decoder(vae.state_dict(), wide))
    z = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        narrow_out = vae.decoder(vae.conv2(z, VAEStreamState("decode")), VAEStreamState("decode"))
        wide_out = wide.decoder(wide.conv2(z, VAEStreamState("decode")), VAEStreamState("decode"))
    assert sum(p.numel() for p in wide.decoder.parameters()) > sum(p.numel() for p in vae.decoder.parameters())
    assert narrow_out.abs().mean() > 0.05 and torch.allclose(wide_out, narrow_out, atol=1e-5)
    loaded = load_wan_vae(wide.state_dict())  # no config given: read from the shapes
    assert loaded.config.decoder_dim_mult == mult and loaded.config.dim_mult == cfg.arch.dim_mult
    assert load_wan_vae(vae.state_dict()).config.decoder_dim_mult is None  # a plain VAE stays plain


def test_a_decoder_fine_tune_widens_its_init_and_keeps_the_encoder(tmp_path) -> None:
    """``vae --decoder-only true --arch.decoder-dim-mult ...``: the run starts from the narrower vae/final
    widened, trains the wider decoder, and its final file loads as a VAE with the same latents; widths that
    are not whole multiples of the init's are refused with the fix."""
    base = {"runs_dir": str(tmp_path), "save_every": "10", "stats_samples": "8", "clip_frames": "5",
            "lr_warmup": "2"}  # fmt: skip
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "10", "lr": "3e-3"}))
    narrow = tmp_path / "shapes" / "vae" / "final.safetensors"
    rows = distill.run("vae", make_config("vae", "tiny", {**base, "steps": "10", "lr": "1e-3", "decoder_only": "true",
                                                           "arch.decoder_dim_mult": "2,2,2,2"}))["rows"]
    assert len(rows) == 10 and np.isfinite([r["psnr"] for r in rows]).all()
    final = tmp_path / "shapes" / "vae-decoder" / "final.safetensors"
    wide = load_wan_vae(final)
    assert wide.config.decoder_dim_mult == (2, 2, 2, 2) and latent_stats_of(final) == latent_stats_of(narrow)
    head = wide.decoder.head[2].weight  # reads the last stage's 16 channels, copies of the init's 8 at the start:
    assert not torch.allclose(head[:, :8], head[:, 8:], atol=1e-4)  # the copies were parted, so both halves learn
    clip = ShapesDataset(5, 32, seed=3).sample(0)[0][None]
    assert torch.equal(wide.encode(clip), load_wan_vae(narrow).encode(clip))
    with pytest.raises(ConfigError, match="whole multiple"):
        distill.run("vae", make_config("vae", "tiny", {**base, "steps": "2", "decoder_only": "true",
                                                        "out_dir": str(tmp_path / "odd"),
                                                        "arch.decoder_dim_mult": "1,3,2,2"}))


def test_decoder_fine_tune_needs_a_finished_vae(tmp_path) -> None:
    cfg = make_config("vae", "tiny", {"runs_dir": str(tmp_path), "decoder_only": "true"})
    with pytest.raises(ConfigError, match="python -m training.distill vae"):
        distill.run("vae", cfg)


def test_inflated_vae_treats_a_clip_as_stills_of_the_image_network() -> None:
    """After ``inflate_temporal`` a clip round-trips as the image network does each frame: latent frame k
    encodes pixel frame 4k (the newest of its group), and each decoded group repeats that frame's decode.
    Random init (as after the image phase, whose past taps got no gradient) is nothing like it."""
    from training.vae_stage import inflate_temporal

    torch.manual_seed(0)
    vae = WanVAE(PRESETS["tiny"].vae).eval()
    video = to_model_range(render_video("a red circle moving right", 2, 9, 32))[None]  # 9 frames -> 3 latent
    for inflated in (False, True):
        if inflated:
            inflate_temporal(vae)
        with torch.no_grad():
            z = vae.encode(video)
            stills = vae.encode(
                video[:, :, [0, 4, 8]].transpose(1, 2).reshape(3, 3, 1, 32, 32)
            )  # [3, C, 1, h, w]
            rec = vae.decode(z)
            per_frame = vae.decode(stills)  # [3, 3, 1, H, W]
        same_latents = torch.allclose(z[0].transpose(0, 1), stills[:, :, 0], atol=1e-5)
        expected = torch.cat(
            [per_frame[0, :, :1]] + [per_frame[k, :, :1].expand(-1, 4, -1, -1) for k in (1, 2)], 1
        )
        same_frames = torch.allclose(rec[0], expected, atol=1e-4)
        assert same_latents == same_frames == inflated


def test_quadrant_guide_carries_the_outline_at_4_pixels() -> None:
    """The 'quadrants' guide latent holds every 4x4 block's mean colour (recoverable through its
    orthonormal lift), so a square and a triangle at one place differ in it; 'pool' holds one mean per
    8x8 cell. Unknown names and too few channels are named."""
    from training.vae_stage import guide_latent

    video = torch.stack(
        [to_model_range(render_video(f"a red {s} moving right", 1, 5, 64)) for s in ("square", "triangle")]
    )
    z = guide_latent(video, 16, "quadrants")  # [2, 16, 2, 8, 8]
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 12, generator=gen, dtype=torch.float64))
    cells = torch.einsum("kc,bkfhw->bcfhw", q.float(), z) / (16 / 12) ** 0.5  # [2, 12, 2, 8, 8]
    quarters = torch.nn.functional.avg_pool3d(video[:, :, ::4], (1, 4, 4))  # [2, 3, 2, 16, 16]
    back = cells.view(2, 3, 2, 2, 2, 8, 8).permute(0, 1, 4, 5, 2, 6, 3).reshape(2, 3, 2, 16, 16)
    assert torch.allclose(back, quarters, atol=1e-5)
    with pytest.raises(ConfigError, match="pool, quadrants"):
        guide_latent(video, 16, "edges")
    with pytest.raises(ConfigError, match="at least 12 latent channels"):
        guide_latent(video, 8, "quadrants")


def test_shape_code_is_zero_for_the_right_code_on_the_object_and_ignores_the_background() -> None:
    """The shape code asks channels 3-5 of the object's latent cells for +1 on the clip's shape and -1
    on the others; cells without object are free, and a wrong shape costs."""
    from training.vae_stage import shape_code_loss

    video = to_model_range(render_video("a red square moving right", seed=3, num_frames=5, size=32))[None]
    mu = torch.randn(1, 16, 2, 4, 4)
    mu[:, 3:6] = torch.tensor([-1.0, 1.0, -1.0])[None, :, None, None, None]  # circle, square, triangle
    square = torch.tensor([1])
    assert shape_code_loss(mu, video, square).item() == pytest.approx(0.0, abs=1e-6)
    # the background cells (far from the object) can hold anything
    far_off = mu.clone()
    far_off[:, 3:6] += 5.0 * (shape_cover(video) == 0)
    assert shape_code_loss(far_off, video, square).item() == pytest.approx(0.0, abs=1e-6)
    # every object cell coded as a circle: each pays (2^2 + 2^2) = 8
    assert shape_code_loss(mu, video, torch.tensor([0])).item() == pytest.approx(8.0, rel=1e-5)


def shape_cover(video: torch.Tensor) -> torch.Tensor:
    """[1, 1, F, h, w]: cells with any object pixel in the frames the latent frames start on."""
    bg = video[:, :, :1, :1, :1]  # black background: the top-left pixel
    far = (video[:, :, ::4] - bg).abs().sum(1, keepdim=True) > 0.3
    return torch.nn.functional.max_pool3d(far.float(), (1, 8, 8))


def test_shape_weight_trains_the_shape_into_the_latent(tmp_path) -> None:
    """``vae --shape-weight W``: the stage hands every clip's shape to the loss, and the code error falls
    as the encoder learns to carry it."""
    cfg = make_config("vae", "tiny", {"runs_dir": str(tmp_path), "steps": "30", "save_every": "30",
                                      "lr": "3e-3", "stats_samples": "4", "clip_frames": "5",
                                      "lr_warmup": "2", "shape_weight": "1"})  # fmt: skip
    rows = distill.run("vae", cfg)["rows"]
    assert np.mean([r["shape_code"] for r in rows[-5:]]) < 0.5 * np.mean([r["shape_code"] for r in rows[:5]])


def test_motion_code_loss_asks_the_groups_for_the_direction_and_leaves_the_first_frame_free() -> None:
    """``--motion-weight``: channels 6-7 of the object's cells in every latent frame after the first must
    hold the direction (x, y); the first latent frame (one frame, no motion) and background cells are free."""
    from training.vae_stage import motion_code_loss

    video = to_model_range(render_video("a red square moving right", seed=2, num_frames=9, size=64))[None]
    mu = torch.zeros(1, 16, 3, 8, 8)
    mu[:, 6:8, 1:] = torch.tensor([1.0, 0.0])[None, :, None, None, None]
    right, left = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    assert motion_code_loss(mu, video, right).item() == pytest.approx(0.0, abs=1e-6)
    free = mu.clone()
    free[:, 6:8, 0] = 7.0  # the first latent frame
    bg = video[:, :, :1, :1, :1]
    moving = (video[:, :, 1:] - bg).abs().sum(1, keepdim=True) > 0.3
    empty = torch.nn.functional.max_pool3d(moving.float(), (4, 8, 8)) == 0  # [1, 1, 2, 8, 8]
    free[:, 6:8, 1:] += 5.0 * empty
    assert motion_code_loss(free, video, right).item() == pytest.approx(0.0, abs=1e-6)
    # coded as moving right but moving left: every object cell pays (2^2 + 0^2) = 4
    assert motion_code_loss(mu, video, left).item() == pytest.approx(4.0, rel=1e-5)
    # stills have no group to code: no loss, whatever the latent holds
    assert motion_code_loss(free[:, :, :1], video[:, :, :1], left).item() == 0.0


def test_motion_weight_trains_the_direction_into_the_latent(tmp_path) -> None:
    """``vae --motion-weight W``: the stage hands every clip's direction to the loss, and the code error
    falls as the encoder learns to see the motion."""
    cfg = make_config("vae", "tiny", {"runs_dir": str(tmp_path), "steps": "30", "save_every": "30",
                                      "lr": "3e-3", "stats_samples": "4", "clip_frames": "5",
                                      "lr_warmup": "2", "motion_weight": "1"})  # fmt: skip
    rows = distill.run("vae", cfg)["rows"]
    assert np.mean([r["motion_code"] for r in rows[-5:]]) < 0.5 * np.mean([r["motion_code"] for r in rows[:5]])


def test_colour_code_loss_asks_every_object_cell_for_the_colour_and_leaves_the_background_free() -> None:
    """``--colour-code-weight``: channels 8-10 of the object's cells in every latent frame must hold the
    object's colour (R, G, B in -1..1); background cells are free, and a wrong colour costs its distance."""
    from training.vae_stage import colour_code_loss

    video = to_model_range(render_video("a red square moving right", seed=3, num_frames=5, size=32))[None]
    red = torch.tensor([[230.0, 40.0, 40.0]]) / 127.5 - 1
    mu = torch.randn(1, 16, 2, 4, 4)
    mu[:, 8:11] = red[:, :, None, None, None]
    assert colour_code_loss(mu, video, red).item() == pytest.approx(0.0, abs=1e-6)
    free = mu.clone()
    free[:, 8:11] += 5.0 * (shape_cover(video) == 0)
    assert colour_code_loss(free, video, red).item() == pytest.approx(0.0, abs=1e-6)
    # coded red but the clip is said to be green (40, 200, 60): each object cell pays the squared distance
    green = torch.tensor([[40.0, 200.0, 60.0]]) / 127.5 - 1
    assert colour_code_loss(mu, video, green).item() == pytest.approx(float((red - green).square().sum()), rel=1e-5)


def test_colour_code_weight_trains_the_colour_into_the_latent(tmp_path) -> None:
    """``vae --colour-code-weight W``: the stage hands every clip's colour to the loss, and the code error
    falls as the encoder learns to carry it."""
    cfg = make_config("vae", "tiny", {"runs_dir": str(tmp_path), "steps": "30", "save_every": "30",
                                      "lr": "3e-3", "stats_samples": "4", "clip_frames": "5",
                                      "lr_warmup": "2", "colour_code_weight": "1"})  # fmt: skip
    rows = distill.run("vae", cfg)["rows"]
    assert np.mean([r["colour_code"] for r in rows[-5:]]) < 0.5 * np.mean([r["colour_code"] for r in rows[:5]])


def test_temporal_only_keeps_the_image_network_and_trains_the_motion(tmp_path) -> None:
    """``vae --temporal-only true --init V``: the clip phase trains only the past time taps and the temporal
    resampling, so every still (and the first frame of every clip) decodes exactly as V decoded it."""
    base = {"runs_dir": str(tmp_path), "stats_samples": "4", "clip_frames": "5", "lr_warmup": "2"}
    images = make_config("vae", "tiny", {**base, "steps": "10", "save_every": "10", "image_steps": "10",
                                         "lr": "3e-3", "out_dir": str(tmp_path / "images")})  # fmt: skip
    distill.run("vae", images)
    init = tmp_path / "images" / "final.safetensors"
    cfg = make_config("vae", "tiny", {**base, "steps": "12", "save_every": "12", "lr": "3e-3",
                                      "temporal_only": "true", "init": str(init)})  # fmt: skip
    distill.run("vae", cfg)
    before, after = load_file(str(init)), load_file(str(tmp_path / "shapes" / "vae" / "final.safetensors"))
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved, "the clip phase trained nothing"
    for k in moved:  # only the temporal resampling and the past taps of 3-tap time kernels moved
        if "time_conv" not in k:
            assert after[k].dim() == 5 and after[k].shape[2] == 3, k
            assert torch.equal(before[k][:, :, -1], after[k][:, :, -1]), k
    still = to_model_range(render_video("a red square moving right", seed=3, num_frames=1, size=32))[None]
    first, second = load_wan_vae(str(init)).eval(), load_wan_vae(str(tmp_path / "shapes" / "vae" / "final.safetensors")).eval()
    with torch.no_grad():
        torch.testing.assert_close(second.decode(second.encode(still)), first.decode(first.encode(still)))


def test_temporal_only_and_the_shape_code_say_what_they_need() -> None:
    with pytest.raises(ConfigError, match="needs --init"):
        distill.run("vae", make_config("vae", "tiny", {"temporal_only": "true", "steps": "1"}))
    # the pooled guide pulls every latent channel, the shape code's three among them
    with pytest.raises(ConfigError, match="--guide colour"):
        distill.run("vae", make_config("vae", "tiny", {"shape_weight": "1", "guide_steps": "5", "steps": "1"}))
    with pytest.raises(ConfigError, match="channels 6-7"):
        distill.run("vae", make_config("vae", "tiny", {"motion_weight": "1", "guide_steps": "5", "steps": "1"}))
    with pytest.raises(ConfigError, match="channels 8-10"):
        distill.run("vae", make_config("vae", "tiny", {"colour_code_weight": "1", "guide_steps": "5", "steps": "1"}))


def test_object_colour_loss_measures_the_hue_of_the_object_not_the_background() -> None:
    """``--object-colour-weight``: the squared error of the object's mean colour; a reconstruction that
    recolours the object pays the colour difference, one that changes only background pixels pays 0."""
    from training.vae_stage import object_colour_loss

    video = to_model_range(render_video("a magenta triangle moving down on a gray background", seed=3,
                                        num_frames=5, size=32))[None]  # fmt: skip
    assert object_colour_loss(video, video).item() == pytest.approx(0.0, abs=1e-7)
    bg = video[:, :, :1, :1, :1]
    obj = (video - bg).square().sum(1, keepdim=True) > (2 * 80 / 255) ** 2
    noisy_bg = torch.where(obj, video, video + 0.1 * torch.randn_like(video))
    assert object_colour_loss(noisy_bg, video).item() == pytest.approx(0.0, abs=1e-7)
    shift = torch.tensor([-0.5, 0.3, 0.0])[None, :, None, None, None]  # toward blue-cyan
    recoloured = torch.where(obj, video + shift, video)
    assert object_colour_loss(recoloured, video).item() == pytest.approx(0.25 + 0.09, rel=1e-4)


def test_latent_noise_is_in_units_of_the_stored_latent_stds_and_needs_a_decoder_fine_tune(tmp_path,
                                                                                         monkeypatch) -> None:
    """``--latent-noise S``: the decoder of a fine-tune reconstructs from its latents plus S times the init's
    per-channel latent std of Gaussian noise (a DiT's latents are that far off the encoder's)."""
    from training import vae_stage

    with pytest.raises(ConfigError, match="--decoder-only true"):
        distill.run("vae", make_config("vae", "tiny", {"latent_noise": "0.5", "steps": "1"}))
    base = {"runs_dir": str(tmp_path), "save_every": "20", "stats_samples": "8", "clip_frames": "5",
            "lr_warmup": "2"}  # fmt: skip
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "20", "lr": "3e-3"}))
    std = torch.tensor(latent_stats_of(tmp_path / "shapes" / "vae" / "final.safetensors")[1])
    seen = []
    real = vae_stage.vae_loss_and_recon

    def spy(*args, **kw):
        seen.append(args[6] if len(args) > 6 else kw.get("latent_noise"))
        return real(*args, **kw)

    monkeypatch.setattr(vae_stage, "vae_loss_and_recon", spy)
    cfg = make_config("vae", "tiny", {**base, "steps": "3", "decoder_only": "true", "latent_noise": "0.5",
                                      "batch_size": "8"})  # fmt: skip
    distill.run("vae", cfg)
    noise = torch.cat([n.transpose(0, 1).reshape(len(std), -1) for n in seen], 1)  # [C, samples]
    assert (std.max() / std.min()) > 1.5  # channels differ, so the per-channel scaling is what is checked
    assert len(seen) == 3 and torch.allclose(noise.std(1), 0.5 * std, rtol=0.15)
    assert not torch.equal(seen[0], seen[1])  # fresh noise every step

    # --clean-channels: those channels reach the decoder as the encoder made them, the rest keep their noise
    seen.clear()
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "2", "decoder_only": "true",
                                                   "latent_noise": "0.5", "clean_channels": "0-1,3",
                                                   "out_dir": str(tmp_path / "clean")}))  # fmt: skip
    noise = torch.cat([n.transpose(0, 1).reshape(len(std), -1) for n in seen], 1)
    assert len(seen) == 2 and noise[[0, 1, 3]].abs().max() == 0
    assert torch.allclose(noise[[2, *range(4, len(std))]].std(1), 0.5 * std[[2, *range(4, len(std))]], rtol=0.2)
    for bad, match in (("0-99", "not a range of channels 0-"), ("red", "numbers and ranges")):
        with pytest.raises(ConfigError, match=match):
            distill.run("vae", make_config("vae", "tiny", {**base, "steps": "1", "decoder_only": "true",
                                                           "latent_noise": "0.5", "clean_channels": bad}))
    with pytest.raises(ConfigError, match="give --latent-noise too"):
        distill.run("vae", make_config("vae", "tiny", {**base, "steps": "1", "decoder_only": "true",
                                                       "clean_channels": "0-2"}))

    # --latent-shift: one offset per clip and channel, the same over every frame and place, S latent stds
    seen.clear()
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "3", "decoder_only": "true", "batch_size": "8",
                                                   "latent_shift": "0.5", "out_dir": str(tmp_path / "shift")}))
    shift = torch.cat(seen)  # [clips, C, f, h, w]
    assert torch.equal(shift, shift[:, :, :1, :1, :1].expand_as(shift)) and shift.abs().min() > 0
    scaled = shift[:, :, 0, 0, 0] / std  # [clips, C]
    assert scaled.shape[0] == 24 and abs(float(scaled.std()) - 0.5) < 0.075
    with pytest.raises(ConfigError, match="--latent-shift.*--decoder-only true"):
        distill.run("vae", make_config("vae", "tiny", {"latent_shift": "0.5", "steps": "1"}))

    # --latent-shift-channels: its channels get their own offset size (0 = none), the rest --latent-shift's
    seen.clear()
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "4", "decoder_only": "true", "batch_size": "16",
                                                   "latent_shift": "0.2", "latent_shift_channels": "0-1:0.8,3:0",
                                                   "out_dir": str(tmp_path / "shift-channels")}))  # fmt: skip
    scaled = torch.cat(seen)[:, :, 0, 0, 0] / std  # [64 clips, C]
    sizes = scaled.std(0)
    assert scaled[:, 3].abs().max() == 0
    assert torch.all((sizes[:2] - 0.8).abs() < 0.2) and torch.all((sizes[4:] - 0.2).abs() < 0.07)
    for bad in ("0-1", "0:big", "0:-1", "99:0.5"):
        with pytest.raises(ConfigError, match="--latent-shift-channels"):
            distill.run("vae", make_config("vae", "tiny", {**base, "steps": "1", "decoder_only": "true",
                                                           "latent_shift_channels": bad}))  # fmt: skip
    with pytest.raises(ConfigError, match="--latent-shift-channels.*--decoder-only true"):
        distill.run("vae", make_config("vae", "tiny", {"latent_shift_channels": "0:0.5", "steps": "1"}))


def test_a_clip_run_chained_onto_frame_runs_starts_from_inflated_temporal_layers(tmp_path, monkeypatch) -> None:
    """A VAE trained on frames in one run and on clips in the next (--init A --image-steps 0) must enter
    its clip phase with the temporal layers inflated, as a single run switching at --image-steps does;
    otherwise they start at their random init (PSNR fell from 28 to 19 dB at such a switch). The count of
    clip steps behind each file is what tells."""
    from training import vae_stage
    from training.vae_stage import clip_steps_of

    calls = []
    real = vae_stage.inflate_temporal
    monkeypatch.setattr(vae_stage, "inflate_temporal", lambda vae: (calls.append(1), real(vae)))

    def run(name: str, init: Path | None, image_steps: int, steps: int) -> Path:
        opts = {"runs_dir": str(tmp_path), "out_dir": str(tmp_path / name), "steps": str(steps),
                "save_every": str(steps), "image_steps": str(image_steps), "clip_frames": "5",
                "stats_samples": "2", "lr_warmup": "1"}  # fmt: skip
        if init is not None:
            opts["init"] = str(init)
        distill.run("vae", make_config("vae", "tiny", opts))
        return tmp_path / name / "final.safetensors"

    frames = run("frames", None, image_steps=3, steps=3)
    assert clip_steps_of(frames) == 0 and calls == []  # never reached its clip phase
    clips = run("clips", frames, image_steps=0, steps=2)
    assert calls == [1] and clip_steps_of(clips) == 2
    more = run("more", clips, image_steps=0, steps=2)
    assert calls == [1] and clip_steps_of(more) == 4  # its init already knows motion: left as it is
    mixed = run("mixed", None, image_steps=2, steps=3)  # one run through the switch: inflated there
    assert calls == [1, 1] and clip_steps_of(mixed) == 1


def test_a_decoder_fine_tune_can_train_on_frames_first_and_keeps_its_temporal_layers(tmp_path, monkeypatch) -> None:
    """``vae --decoder-only true --decoder-frame-steps N``: the first N steps train the decoder on single frames
    (where it learns corners cheaply, docs/reproduction.md), then clips. Frames never reach the past-frame taps
    or the temporal upsampling, so a frames-only fine-tune leaves them exactly as the init had them (never
    inflated: they already know motion); the encoder stays frozen and the clip-step count only grows by the clip steps."""
    from training import vae_stage
    from training.vae_stage import clip_steps_of

    calls = []
    monkeypatch.setattr(vae_stage, "inflate_temporal", lambda vae: calls.append(1))
    base = {"runs_dir": str(tmp_path), "stats_samples": "2", "clip_frames": "5", "lr_warmup": "1"}
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "4", "save_every": "4", "lr": "3e-3"}))
    init = tmp_path / "shapes" / "vae" / "final.safetensors"
    before = load_file(str(init))

    def fine_tune(name: str, frame_steps: int, steps: int) -> tuple[dict[str, torch.Tensor], Path]:
        # weight decay 0.01 is the tiny preset's own: the stage turns it off in such a run
        opts = {**base, "out_dir": str(tmp_path / name), "steps": str(steps), "save_every": str(steps),
                "lr": "3e-3", "decoder_only": "true", "decoder_frame_steps": str(frame_steps), "init": str(init),
                "weight_decay": "0.01"}  # fmt: skip
        distill.run("vae", make_config("vae", "tiny", opts))
        out = tmp_path / name / "final.safetensors"
        return load_file(str(out)), out

    frames, frames_path = fine_tune("frames", 3, 3)
    # the decoder's causal 3x3x3 convolutions, time taps [past, past, current]
    past = [k for k, w in before.items() if k.startswith("decoder.") and k.endswith(".weight") and w.dim() == 5
            and w.shape[2] == 3]  # fmt: skip
    time_convs = [k for k in before if k.startswith("decoder.") and ".time_conv." in k]
    assert past and time_convs
    assert all(torch.equal(before[k][:, :, :2], frames[k][:, :, :2]) for k in past)
    assert all(torch.equal(before[k], frames[k]) for k in time_convs)
    assert any(not torch.equal(before[k][:, :, 2], frames[k][:, :, 2]) for k in past)  # the frames did train it
    assert all(torch.equal(before[k], frames[k]) for k in before if k.startswith(("encoder.", "conv1.")))
    assert calls == [] and clip_steps_of(frames_path) == clip_steps_of(init)

    mixed, mixed_path = fine_tune("mixed", 2, 3)  # then clips: the past taps train too, still no inflation
    assert any(not torch.equal(before[k][:, :, :2], mixed[k][:, :, :2]) for k in past)
    assert calls == [] and clip_steps_of(mixed_path) == clip_steps_of(init) + 1
    with pytest.raises(ConfigError, match="--decoder-frame-steps.*--decoder-only true"):
        distill.run("vae", make_config("vae", "tiny", {**base, "steps": "2", "decoder_frame_steps": "1"}))


def test_the_adversarial_term_is_the_discriminators_verdict_on_the_reconstruction() -> None:
    """``--adv-weight W`` adds W x minus the discriminator's mean logit on the reconstructed frames; the
    discriminator gets no gradient from it, and its own hinge loss wants real frames above +1, fakes below -1."""
    from training.vae_stage import PatchDiscriminator, discriminator_hinge, posterior, reconstruct, vae_loss

    base = make_config("vae", "tiny", {})
    cfg = make_config("vae", "tiny", {"adv_weight": "0.5"})
    vae, video, eps = tiny_vae_batch(cfg)
    torch.manual_seed(1)
    disc = PatchDiscriminator(8)
    plain, _ = vae_loss(vae, video, eps, base, 0.0)
    adv, parts = vae_loss(vae, video, eps, cfg, 0.0, disc=disc)
    recon = reconstruct(vae, posterior(vae, video)[0])
    logits = disc(recon)
    assert logits.shape == (video.shape[2], 1, 8, 8)  # one 32x32 frame each -> 8x8 patches
    assert parts["adv_g"] == pytest.approx(-logits.mean().item(), rel=1e-5)
    assert adv.item() == pytest.approx(plain.item() + 0.5 * parts["adv_g"], rel=1e-5)
    adv.backward()
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.decoder.parameters())
    with torch.no_grad():  # a discriminator that says c everywhere: relu(1 - c) + relu(1 + c)
        disc.net[-1].weight.zero_()
        disc.net[-1].bias.fill_(0.25)
    assert discriminator_hinge(disc, video, recon).item() == pytest.approx(0.75 + 1.25)
    with pytest.raises(ConfigError, match="--adv-weight needs the patch discriminator"):
        vae_loss(vae, video, eps, cfg, 0.0)


def test_a_decoder_fine_tune_with_the_adversarial_term_resumes_with_its_discriminator(tmp_path) -> None:
    """``vae --decoder-only true --adv-weight W``: the discriminator trains beside the decoder, is saved
    beside it (final_disc.safetensors; the VAE file alone carries the latent statistics), and a run
    stopped part way resumes both to the same weights as a run that never stopped."""
    from causvid_core.bundle import file_metadata

    base = {"runs_dir": str(tmp_path), "save_every": "2", "stats_samples": "4", "clip_frames": "5",
            "lr_warmup": "1"}  # fmt: skip
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "4", "lr": "3e-3"}))
    tune = {**base, "lr": "1e-3", "decoder_only": "true", "adv_weight": "0.1", "disc_channels": "8", "disc_lr": "2e-3",
            "init": str(tmp_path / "shapes" / "vae" / "final.safetensors")}  # fmt: skip
    straight = distill.run("vae", make_config("vae", "tiny", {**tune, "steps": "4", "out_dir": str(tmp_path / "a")}))
    assert all("adv_g" in r and "adv_d" in r for r in straight["rows"])
    assert [r["lr"] for r in straight["rows"]][-1] < 1e-3  # the VAE's lr, on the schedule (the log's)
    state = torch.load(tmp_path / "a" / "state_000004.pt", weights_only=False)
    lrs = {name: o["param_groups"][0]["lr"] for name, o in state["optimizers"].items()}
    assert lrs["disc"] == pytest.approx(2 * lrs["step"])  # --disc-lr 2e-3 against --lr 1e-3, same schedule
    distill.run("vae", make_config("vae", "tiny", {**tune, "steps": "2", "out_dir": str(tmp_path / "b")}))
    (tmp_path / "b" / "final.safetensors").unlink()  # the 2-step run finished; make it look stopped at 2
    (tmp_path / "b" / "final_disc.safetensors").unlink()
    distill.run("vae", make_config("vae", "tiny", {**tune, "steps": "4", "out_dir": str(tmp_path / "b"),
                                                   "resume": "true"}))  # fmt: skip
    for name in ("final.safetensors", "final_disc.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    disc_meta = file_metadata(tmp_path / "a" / "final_disc.safetensors")
    assert "causvid_discriminator" in disc_meta and STAGE_META not in disc_meta
    assert latent_stats_of(tmp_path / "a" / "final.safetensors") == latent_stats_of(
        tmp_path / "shapes" / "vae" / "final.safetensors"
    )
    # still an ordinary VAE file: it loads as one, and the discriminator's weights live only in their own file
    plain = load_file(str(tmp_path / "a" / "final.safetensors"))
    assert load_wan_vae(tmp_path / "a" / "final.safetensors").state_dict().keys() == plain.keys()
    assert not set(plain) & set(load_file(str(tmp_path / "a" / "final_disc.safetensors")))
    with pytest.raises(ConfigError, match="--adv-weight -1"):
        distill.run("vae", make_config("vae", "tiny", {**tune, "adv_weight": "-1", "out_dir": str(tmp_path / "c")}))


def test_code_swap_decodes_the_twin_of_another_shape_from_the_originals_outline(tmp_path, monkeypatch) -> None:
    """``--code-swap P``: that share of a decoder fine-tune's clips must come out as the same video drawn as
    another shape (same colour, background, start and direction), decoded from latents whose shape code
    (channels 3-5) is the twin's and whose other channels are the original's. A decoder that reads the shape
    from the outline in the other channels draws every shape as a blob; this is what makes it read the code."""
    from training import vae_stage
    from training.metrics import frame_stats, wrapped
    from training.shapes import ShapesDataset, parse_prompt

    data = ShapesDataset(5, 32, seed=3)
    video, prompt = data.sample(0)
    p = parse_prompt(prompt)
    other = next(s for s in ("circle", "square", "triangle") if s != p.shape)
    twin, twin_prompt = data.sample_as(0, other)
    q = parse_prompt(twin_prompt)
    assert (q.shape, q.colour, q.direction, q.background) == (other, p.colour, p.direction, p.background)
    u8 = [v.permute(1, 2, 3, 0).add(1).mul(127.5).round().byte().numpy() for v in (video, twin)]
    a, b = (frame_stats(x, p.background_rgb) for x in u8)
    assert np.abs(wrapped(a.centroid - b.centroid, 32)).max() < 0.6  # the same place in every frame
    assert not torch.equal(video, twin)

    # the latent the decoder sees: shape code from the twin, everything else from the original
    cfg = make_config("vae", "tiny", {})
    vae = WanVAE(cfg.arch).eval()
    eps = torch.zeros(1, vae.z_dim, 2, 4, 4)
    seen = []
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(vae_stage, "reconstruct", lambda _vae, z: (seen.append(z), torch.zeros_like(video[None]))[1])
        vae_stage.vae_loss_and_recon(vae, twin[None], eps, cfg, outline=video[None])
        mu_v, mu_t = vae_stage.posterior(vae, video[None])[0], vae_stage.posterior(vae, twin[None])[0]
    assert torch.equal(seen[0][:, 3:6], mu_t[:, 3:6])
    assert torch.equal(seen[0][:, :3], mu_v[:, :3]) and torch.equal(seen[0][:, 6:], mu_v[:, 6:])

    # in a run: about P of the clips are swapped, each target a twin of its clip, and the outline the original
    base = {"runs_dir": str(tmp_path), "save_every": "20", "stats_samples": "8", "clip_frames": "5", "lr_warmup": "2"}
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "4", "lr": "3e-3"}))
    calls = []
    real = vae_stage.vae_loss_and_recon
    monkeypatch.setattr(vae_stage, "vae_loss_and_recon", lambda *a, **k: (calls.append((a[1], a[10])), real(*a, **k))[1])
    distill.run("vae", make_config("vae", "tiny", {**base, "steps": "3", "decoder_only": "true", "batch_size": "8",
                                                   "code_swap": "0.5", "out_dir": str(tmp_path / "swap")}))
    swapped = [not torch.equal(v, o) for target, outline in calls for v, o in zip(target, outline, strict=True)]
    assert len(swapped) == 24 and 5 <= sum(swapped) <= 19
    for bad in ("1.5", "-0.1"):
        with pytest.raises(ConfigError, match="--code-swap"):
            distill.run("vae", make_config("vae", "tiny", {**base, "steps": "1", "decoder_only": "true",
                                                           "code_swap": bad}))
    with pytest.raises(ConfigError, match="--code-swap.*--decoder-only true"):
        distill.run("vae", make_config("vae", "tiny", {"code_swap": "0.5", "steps": "1"}))


def test_a_vae_of_another_latent_width_trains_from_the_command_line(tmp_path) -> None:
    """--arch.z-dim 8 (with the DiT sized to match) used to stop on the preset's 16 latent statistics; the
    stage measures its own after training, so it starts from placeholders of the right length."""
    cfg = make_config("vae", "tiny", {"arch.z_dim": "8", "dit.in_dim": "8", "dit.out_dim": "8", "steps": "1",
                                      "image_steps": "1", "guide_steps": "0", "stats_samples": "2",
                                      "sample_every": "1", "runs_dir": str(tmp_path)})  # fmt: skip
    assert cfg.arch.latents_mean == (0.0,) * 8 and cfg.arch.latents_std == (1.0,) * 8
    distill.run("vae", cfg)
    vae = load_wan_vae(tmp_path / "shapes" / "vae" / "final.safetensors")
    assert vae.z_dim == 8 and len(vae.config.latents_std) == 8 and vae.config.latents_std != (1.0,) * 8
    from PIL import Image

    with Image.open(tmp_path / "shapes" / "vae" / "samples" / "step_000001.png") as strip:
        assert strip.size == (8 * 2 * 32, 32)  # 8 frames, each source | reconstruction, beside the mp4
