"""``python -m training.distill STAGE``: CausVid's recipe, stage by stage, one process or ``torchrun``.

Stages (docs/training.md): ``vae`` (the Shapes VAE from scratch), ``precompute`` (videos -> latent shards), ``teacher`` (bidirectional flow
matching, or a causal teacher with ``--kind causal``), ``ode-pairs`` (the teacher's 50-step CFG
trajectories at the student's timesteps), ``ode-init`` (causal student regressed onto x0) and ``dmd``
(asymmetric distribution matching distillation). All randomness of step s on rank r comes from
generators seeded by (seed, s, r), so ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from causvid_core.checkpoint import load_model
from causvid_core.config import chunk_layout
from causvid_core.model import CausalWanModel
from causvid_core.sampling import FlowSchedule, add_noise, denoising_timesteps, sample_teacher, x0_from_v

from . import dist
from .config import (
    ConfigError,
    DMDConfig,
    OdeInitConfig,
    OdePairsConfig,
    PrecomputeConfig,
    RunConfig,
    TeacherConfig,
    causal_folder,
    describe_fields,
    parse_cli,
    stage_dir,
    stage_name,
    to_json,
)
from .data import ShardSource, build_source, latent_shape, uncond_context
from .logging_utils import MetricLog, Progress, plot_losses
from .losses import (
    cfg_combine,
    chunk_step_indices,
    dmd_gradient,
    dmd_loss,
    dmd_timesteps,
    flow_matching_loss,
    grid_timesteps,
    ode_regression_loss,
    temporal_difference_loss,
)
from .state import CheckpointManager, Trainable

StepFn = Callable[[int], dict[str, float]]


class TrainingError(RuntimeError):
    """A run stopped on purpose (non-finite loss); the message names the step and the last good checkpoint."""


class TrainingStopped(TrainingError):
    """SIGTERM or Ctrl-C: the step finished, a checkpoint was saved; ``code`` is the exit status (143 / 130)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class NonFiniteLoss(Exception):
    def __init__(self, name: str, value: float) -> None:
        super().__init__(name, value)
        self.name, self.value = name, value


# -- small helpers ---------------------------------------------------------------------------
def step_generator(seed: int, step: int, rank: int, salt: int = 0) -> torch.Generator:
    """The torch generator of (seed, step, rank): data, noise and timesteps are a function of these."""
    mixed = int(np.random.SeedSequence([seed, step, rank, salt]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(mixed & ((1 << 63) - 1))


def randn(shape: torch.Size | tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(tuple(shape), generator=gen).to(device)


def checked(name: str, loss: Tensor, step: int, cfg: RunConfig, ctx: dist.DistContext) -> float:
    """Mean of ``loss`` over ranks; raises ``NonFiniteLoss`` before any update when it is NaN or Inf."""
    value = dist.mean_across_ranks(loss, ctx)
    if not math.isfinite(value):
        raise NonFiniteLoss(name, value)
    return value


def poison(loss: Tensor, step: int, cfg: RunConfig) -> Tensor:
    """Test hook: NaN loss at ``--debug-nan-at-step``."""
    return loss * float("nan") if step + 1 == cfg.debug_nan_at_step else loss


def update(t: Trainable, loss: Tensor, cfg: RunConfig) -> float:
    """zero_grad, backward, clip to ``grad_clip``, step; returns the gradient norm before clipping."""
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = dist.clip_grad(t.model, cfg.grad_clip)
    t.opt.step()
    return float(norm)


def adamw(model: nn.Module, lr: float, cfg: RunConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def make_command(stage: str, cfg: RunConfig, extra: str = "") -> str:
    """The command that makes ``stage``'s output for this run (its preset, name and runs folder)."""
    return f"python -m training.distill {stage} --preset {cfg.preset} --name {cfg.name} --runs-dir {cfg.runs_dir}{extra}"


def require(path: str | None, default: Path, what: str, made_by: str, flag: str) -> Path:
    """An input checkpoint or folder, with an error naming the stage and command that make it."""
    p = Path(path) if path else default
    if not p.exists():
        if not made_by:
            raise ConfigError(f"{what} {p} not found (check {flag})")
        stage = made_by.split()[3]
        raise ConfigError(
            f"{what} {p} not found; the {stage!r} stage makes it: {made_by} (or pass {flag} PATH)"
        )
    return p


def block_causal(cfg: RunConfig, frames: int) -> dict[str, Any]:
    """The model's keyword arguments for block-causal attention over ``frames`` latent frames: the preset's
    chunks, each seeing only what a stream's rolling cache holds when it is made (sink and window chunks).
    A clip no longer than the window trains plain block-causal attention; a longer one trains the attention the
    stream will use past its window, where the oldest chunks have left the cache."""
    c = cfg.causal
    return {"chunk_sizes": chunk_layout(frames, c.chunk_frames, c.first_chunk_frames),
            "sink_chunks": c.sink_chunks, "window_chunks": c.window_chunks}  # fmt: skip


def load_dit(path: Path, cfg: RunConfig, device: torch.device, trainable: bool) -> CausalWanModel:
    """Load a checkpoint in float32 and check it matches the run's ``dit`` config."""
    model, _ = load_model(path, dtype=torch.float32, device=device)
    if model.config != cfg.dit:
        raise ConfigError(
            f"{path} holds a model with config {model.config}, but this run's --preset {cfg.preset} "
            f"expects {cfg.dit}; use the same --preset / --dit.* as the stage that made it"
        )
    model.gradient_checkpointing = cfg.grad_ckpt
    return model.train().requires_grad_(True) if trainable else model.eval().requires_grad_(False)


def recorded_kind(path: Path) -> str | None:
    """'bidirectional' or 'causal' for a teacher checkpoint of ``teacher`` (its recorded --kind); None when
    the file records no teacher training (a Wan checkpoint, a student)."""
    from causvid_core.bundle import file_metadata

    text = file_metadata(Path(path)).get("causvid_training")
    record = json.loads(text) if text else {}
    return record.get("kind") if record.get("stage_config") == "TeacherConfig" else None


def teacher_path(cfg: RunConfig, kind: str, given: str | None, what: str, option: str) -> Path:
    """``given``, else this run's teacher of ``kind`` (teacher/ or teacher-causal/), with the command that
    makes it when it is missing."""
    folder = "teacher-causal" if kind == "causal" else "teacher"
    made = make_command("teacher", cfg, " --kind causal" if kind == "causal" else "")
    return require(given, stage_dir(cfg, folder) / "final.safetensors", what, made, option)


def chain_stage(cfg: OdeInitConfig | DMDConfig, stage: str) -> tuple[Path, str]:
    """The folder ``stage`` writes for the teacher of ``cfg.teacher_kind`` (``ode-pairs`` or
    ``ode-pairs-causal-teacher``, ...) and the command that makes it."""
    causal = cfg.teacher_kind == "causal"
    made = make_command(stage, cfg, " --teacher-kind causal" if causal else "")
    return stage_dir(cfg, causal_folder(stage) if causal else stage), made


def check_kind(path: Path, kind: str, option: str) -> None:
    """Refuse a teacher checkpoint trained as the other kind: sampled with the wrong mask it scores nonsense."""
    found = recorded_kind(path)
    if found is not None and found != kind:
        raise ConfigError(
            f"{path} is a {found} teacher (trained with teacher --kind {found}) but {option} is {kind}; "
            f"pass {option} {found}, or a {kind} teacher checkpoint"
        )


def count_params(cfg: RunConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in CausalWanModel(cfg.dit).parameters())


def memory_report(models: dict[str, bool], cfg: RunConfig, ctx: dist.DistContext) -> str:
    """Weights (fp32) + grads (fp32) + AdamW moments (2 x fp32) for trained models; weights for frozen ones."""
    n = count_params(cfg)
    shard = ctx.world_size if ctx.fsdp else 1
    parts, total = [], 0.0
    for name, trainable in models.items():
        gib = n * (16 / shard if trainable else 4) / 2**30  # frozen models are not sharded
        total += gib
        parts.append(f"{name} {gib:.3f} GiB ({'trained: weights+grads+AdamW' if trainable else 'frozen'})")
    per = "per rank (FSDP)" if shard > 1 else "per process"
    return (
        f"memory estimate {per}, {n / 1e6:.2f}M params per model, activations not included: "
        + ", ".join(parts)
        + f"; total {total:.3f} GiB"
    )


class StopFlag:
    """SIGTERM or a first Ctrl-C sets a flag; the loop saves and stops at the end of the step. A second
    Ctrl-C stops at once (what was saved before stays)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.name = "SIGTERM"
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            print("\nCtrl-C: saving at the end of this step (Ctrl-C again stops at once)", file=sys.stderr,
                  flush=True)  # fmt: skip
        self.name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        self.requested = True

    @property
    def code(self) -> int:
        return 143 if self.name == "SIGTERM" else 130

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


# -- the loop ------------------------------------------------------------------------------
def lr_scale(step: int, cfg: RunConfig) -> float:
    """The lr multiplier at ``step``: linear warm-up over ``lr_warmup`` steps, then constant, then (when
    ``lr_decay`` > 0) a linear fall to 0.1 over the last ``lr_decay`` share of the steps. A small
    model trained at constant lr ends wherever the noise of its last updates left it; the decay
    settles it (the job an EMA of the weights does in larger recipes)."""
    scale = min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup > 0 else 1.0
    if cfg.lr_decay > 0:
        start = cfg.steps * (1.0 - cfg.lr_decay)
        if step >= start:
            scale *= 1.0 - 0.9 * (step - start) / max(cfg.steps - start, 1.0)
    return scale


def set_lr(trainables: list[Trainable], scale: float) -> None:
    """Every parameter group's lr = its base lr (``train_loop`` sets it from the config) times ``scale``."""
    for t in trainables:
        for group in t.opt.param_groups:
            group["lr"] = group["base_lr"] * scale


def _check_sample_vae(cfg: RunConfig) -> None:
    """Before step 0: the VAE that decodes the DiT stages' sample videos is there (``--vae run``: this run's
    vae stage), so a missing one stops the run now, not at its first sample."""
    from .data import run_vae_path

    if cfg.vae != "run":  # pool, embedded:NAME, a file or a preset: build_codec names what is wrong
        return
    try:
        run_vae_path(cfg)
    except ConfigError as err:
        raise ConfigError(
            f"{err}; it decodes the sample videos every {cfg.sample_every} steps (--sample-every 0: none)"
        ) from None


def train_loop(
    cfg: RunConfig,
    ctx: dist.DistContext,
    trainables: list[Trainable],
    step_fn: StepFn,
    sample_fn: Callable[[int, Path], None] | None = None,
) -> dict[str, Any]:
    """Run ``step_fn`` from the start (or the resumed step) to ``cfg.steps`` with logs and checkpoints."""
    stage = stage_name(cfg)
    folder = stage_dir(cfg, stage)
    if sample_fn is not None and cfg.sample_every and isinstance(cfg, (TeacherConfig, OdeInitConfig, DMDConfig)):
        _check_sample_vae(cfg)
    ckpt = CheckpointManager(folder, stage, cfg, ctx)
    start, last_good = 0, ckpt.latest()
    # the lr each optimiser was built with (the config's): a checkpoint's saved lr must not override it,
    # so a run resumed with a lower --lr (after a NaN, say) really uses it
    bases = [[group["lr"] for group in t.opt.param_groups] for t in trainables]
    if last_good is not None:
        saved = ckpt.read_state(last_good)
        if saved.get("stage") != stage:  # another stage's folder (an --out-dir mix-up): never mixed in
            raise ConfigError(
                f"{folder} holds checkpoints of the {saved.get('stage')!r} stage, not {stage!r}: choose "
                "another --out-dir (or --name)"
            )
    if cfg.resume and last_good is not None:
        if saved["step"] > cfg.steps:
            raise ConfigError(
                f"{last_good.name} is at step {saved['step']}, past --steps {cfg.steps}: pass --steps "
                f"{saved['step']} or more to continue it, or use its step_*.safetensors as they are"
            )
        changed = _changed_options(saved.get("config"), cfg)
        if changed:
            _say(ctx, f"resuming with changed options: {'; '.join(changed)}")
        try:
            start = ckpt.load(last_good, trainables, saved)["step"]
        except RuntimeError as err:  # a weight of another shape: the model options changed
            raise ConfigError(
                f"{last_good.name} does not fit the model these options build ({str(err).splitlines()[0][:200]}); "
                f"resume with the options it was trained with{' (changed: ' + '; '.join(changed) + ')' if changed else ''}"
            ) from None
        _say(ctx, f"resumed {stage} from {last_good} at step {start}")
        if start < cfg.steps:  # a finished run continued to more steps: its old final is not this run's
            for old in folder.glob("final*.safetensors"):
                old.unlink()
    elif cfg.resume:
        _say(ctx, f"--resume: no checkpoint in {folder} yet, starting at step 0")
    elif last_good is not None:
        raise ConfigError(
            f"{folder} already holds checkpoints (latest {last_good.name}); pass --resume to continue "
            "that run, or choose another --name"
        )
    log = MetricLog(folder, start) if ctx.is_main else None
    progress = Progress(cfg.steps, start, cfg.log_every, ctx.is_main)
    stopped = False
    wall = log.rows[-1].get("wall_s", 0.0) if log is not None and log.rows else 0.0  # continues on resume
    for t, lrs in zip(trainables, bases, strict=True):
        for group, lr in zip(t.opt.param_groups, lrs, strict=True):
            group["base_lr"] = lr
    with StopFlag() as stop:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            set_lr(trainables, lr_scale(step, cfg))
            try:
                metrics = step_fn(step)
            except NonFiniteLoss as err:
                if log is not None:
                    log.flush()
                raise TrainingError(
                    f"{stage}: {err.name} is {err.value} at step {step + 1}; stopped without saving "
                    f"this state. Last good checkpoint: {last_good or 'none (no checkpoint yet)'}; "
                    "continue from it with --resume (a lower --lr may help)"
                ) from None
            done = step + 1
            wall += time.perf_counter() - t0
            if log is not None:
                log.add({"step": done, **metrics, "lr": trainables[0].opt.param_groups[0]["lr"], "wall_s": wall})
            progress.update(done, metrics)
            stopped = dist.any_across_ranks(stop.requested, ctx)
            if done % cfg.save_every == 0 or done == cfg.steps or stopped:
                last_good = ckpt.save(done, trainables, {}) or ckpt.state_path(done)
                if log is not None:
                    log.flush()
                    plot_losses(log.rows, folder / "loss.png", f"{cfg.name} / {stage}")
            if (
                sample_fn
                and ctx.is_main
                and cfg.sample_every
                and (done % cfg.sample_every == 0 or done == cfg.steps)
            ):
                sample_fn(done, folder)
            if stopped:
                progress.close()
                raise TrainingStopped(
                    f"{stop.name}: saved {stage} at step {done} of {cfg.steps} in {folder}; continue with the "
                    "same command and --resume", stop.code,
                )  # fmt: skip
    progress.close()
    final = [] if stopped else ckpt.finalize(cfg.steps, trainables)
    if ctx.distributed:
        for t in trainables:
            print(f"rank {ctx.rank}: {t.prefix} digest {dist.digest(t.model)}", flush=True)
    return {
        "stage": stage,
        "folder": folder,
        "rows": log.rows if log else [],
        "final": final,
        "stopped": stopped,
    }


def _changed_options(saved_json: str | None, cfg: RunConfig) -> list[str]:
    """``key: old -> new`` for every option a resumed run changes (--resume itself aside)."""
    if not saved_json:
        return []

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = flat(json.loads(saved_json)), flat(json.loads(to_json(cfg)))
    keys = sorted(k for k in set(old) | set(new) if k != "resume" and old.get(k) != new.get(k))
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in keys]


def _say(ctx: dist.DistContext, msg: str) -> None:
    if ctx.is_main:
        print(msg, flush=True)


# -- stages --------------------------------------------------------------------------------
def teacher_schedule(cfg: TeacherConfig) -> FlowSchedule:
    """The grid the teacher's training timesteps are drawn from: ``--train-shift``, else the sampler's shift."""
    if cfg.train_shift is None:
        return FlowSchedule.from_config(cfg.sampling)
    return FlowSchedule.from_config(dataclasses.replace(cfg.sampling, shift=cfg.train_shift))


def run_teacher(cfg: TeacherConfig, ctx: dist.DistContext) -> dict[str, Any]:
    """Flow-matching loss MSE(v, eps - x0) at t drawn from the shifted grid (per chunk when causal), plus
    ``motion_weight`` times the temporal-difference loss when it is set."""
    dev = ctx.device
    _say(ctx, memory_report({"teacher": True}, cfg, ctx))
    if cfg.init:
        raw = load_dit(require(cfg.init, Path(cfg.init), "--init checkpoint", "", "--init"), cfg, dev, True)
    else:
        torch.manual_seed(cfg.seed)
        raw = CausalWanModel(cfg.dit).to(dev).train()
        raw.gradient_checkpointing = cfg.grad_ckpt
    model = dist.wrap(raw, ctx)
    t = Trainable("step", model, adamw(model, cfg.lr, cfg), raw)
    source = build_source(cfg)
    schedule = teacher_schedule(cfg)
    uncond = uncond_context(cfg).to(dev)

    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(cfg.seed, step, ctx.rank)
        batch = source.get(_indices(cfg, ctx, step, len(source)))
        x0, text = batch.latents.to(dev), batch.context.to(dev)
        b, f = x0.shape[0], x0.shape[2]
        drop = torch.rand(b, generator=gen) < cfg.text_dropout
        text = torch.where(drop.to(dev)[:, None, None], uncond.expand_as(text), text)
        mask = block_causal(cfg, f) if cfg.kind == "causal" else {}
        chunks = mask.get("chunk_sizes")
        if chunks:  # one timestep per chunk, repeated over its frames: [B, F]
            tt, sigma = grid_timesteps(schedule, (b, len(chunks)), gen)
            rep = torch.tensor(chunks)
            tt, sigma = tt.repeat_interleave(rep, 1), sigma.repeat_interleave(rep, 1)
        else:
            tt, sigma = grid_timesteps(schedule, (b,), gen)
        eps = randn(x0.shape, gen, dev)
        x_t = add_noise(x0, eps, sigma.to(dev))
        with dist.autocast(ctx, cfg.amp):
            v = model(x_t, tt.to(dev), text, **mask)
        loss = flow_matching_loss(v, eps, x0)
        out = {}
        if cfg.motion_weight > 0:  # logged apart, so runs with and without it compare on the flow loss
            motion = temporal_difference_loss(v, eps, x0)
            out = {"flow_loss": dist.mean_across_ranks(loss, ctx), "motion_loss": dist.mean_across_ranks(motion, ctx)}
            loss = loss + cfg.motion_weight * motion
        loss = poison(loss, step, cfg)
        value = checked("loss", loss, step, cfg, ctx)
        return {"loss": value, **out, "grad_norm": update(t, loss, cfg)}

    def sample_fn(step: int, folder: Path) -> None:
        _sample_teacher_video(raw, cfg, source, uncond, folder / "samples" / f"step_{step:06d}.mp4")

    return train_loop(cfg, ctx, [t], step_fn, sample_fn)


def _indices(cfg: RunConfig, ctx: dist.DistContext, step: int, size: int) -> list[int]:
    from .data import sample_indices

    return sample_indices(step, ctx.rank, ctx.world_size, cfg.batch_size, cfg.seed, size or None)


def keep_indices(cfg: OdePairsConfig) -> tuple[list[int], list[float]]:
    """Indices of the teacher's Euler steps at the student's timesteps (e.g. [0, 36, 44] for [1000, 757, 522])."""
    from causvid_core.sampling import teacher_sigmas

    grid = (teacher_sigmas(cfg.num_steps, cfg.sampling.shift)[:-1] * 1000).tolist()
    keep = []
    for t in denoising_timesteps(cfg.sampling):
        i = int(np.argmin([abs(g - t) for g in grid]))
        if abs(grid[i] - t) > 1.5:
            raise ConfigError(
                f"student timestep {t} is not on the teacher's {cfg.num_steps}-step shift-{cfg.sampling.shift} "
                f"schedule (nearest {grid[i]:.1f} at index {i}); change --num-steps or --sampling.denoising-steps"
            )
        keep.append(i)
    return keep, [grid[i] for i in keep] + [0.0]


def run_ode_pairs(cfg: OdePairsConfig, ctx: dist.DistContext) -> dict[str, Any]:
    """Teacher trajectories with CFG from seeded noise, stored in resumable shards of ``shard_size``."""
    from .data import check_shard_settings, write_shard

    dev = ctx.device
    causal = cfg.teacher_kind == "causal"
    path = teacher_path(cfg, cfg.teacher_kind, cfg.teacher, f"{cfg.teacher_kind} teacher checkpoint", "--teacher")
    check_kind(path, cfg.teacher_kind, "--teacher-kind")
    _say(ctx, memory_report({"teacher": False}, cfg, ctx))
    teacher = load_dit(path, cfg, dev, trainable=False)
    source = build_source(cfg)
    keep, kept_t = keep_indices(cfg)
    _say(ctx, f"keeping teacher steps {keep} (t = {[round(t, 1) for t in kept_t]}) and x0")
    # a causal teacher denoises every chunk at once under its block-causal mask, as it is evaluated
    frames = latent_shape(cfg)[1]
    mask = block_causal(cfg, frames) if causal else {}
    folder = stage_dir(cfg, stage_name(cfg))
    neg = uncond_context(cfg, cfg.negative).to(dev)
    n_shards = math.ceil(cfg.num_samples / cfg.shard_size)
    settings = {"teacher": Path(path), "teacher_kind": cfg.teacher_kind, "guidance": cfg.guidance,
                "num_steps": cfg.num_steps, "noise_seed": cfg.seed, "shard_size": cfg.shard_size,
                "num_frames": cfg.num_frames, "steady_targets": cfg.steady_targets}  # fmt: skip
    codec = None
    if cfg.steady_targets:
        from .data import build_codec
        from .student_clips import steady_targets

        settings["vae"] = cfg.vae
        codec = build_codec(cfg, dev)
        _say(ctx, f"steadying each x0 along a straight path with the VAE {cfg.vae}")
    written = []
    for j in range(ctx.rank, n_shards, ctx.world_size):
        out = folder / f"shard_{j:05d}.safetensors"
        if out.exists():
            check_shard_settings(out, settings)
            _say(ctx, f"{out.name} exists, skipped")
            continue
        idx = list(range(j * cfg.shard_size, min(cfg.num_samples, (j + 1) * cfg.shard_size)))
        prompts, text = source.prompts([i % (len(source) or cfg.num_samples) for i in idx])
        trajs, steadied = [], []
        for a in range(0, len(idx), cfg.batch_size):
            sub = idx[a : a + cfg.batch_size]
            noise = torch.stack([torch.randn(latent_shape(cfg), generator=step_generator(cfg.seed, i, 0, 7))
                                 for i in sub]).to(dev)  # fmt: skip
            with torch.no_grad(), dist.autocast(ctx, False):
                cond = teacher.encode_context(text[a : a + len(sub)].to(dev))
                unc = teacher.encode_context(neg.expand(len(sub), -1, -1))
                x0, kept = sample_teacher(teacher, noise, cond, unc, num_steps=cfg.num_steps,
                                          shift=cfg.sampling.shift, guidance=cfg.guidance, keep_steps=keep,
                                          **mask)  # fmt: skip
            if codec is not None:
                x0, done = steady_targets(x0, prompts[a : a + len(sub)], codec)
                steadied += done
            trajs.append(torch.stack([*kept, x0], dim=1).cpu())  # [b, K+1, C, F, h, w]
        meta = {"prompts": prompts, "sample_indices": idx, "noise_seed": cfg.seed, "teacher": str(path),
                "teacher_kind": cfg.teacher_kind,
                "keep_steps": keep, "timesteps": kept_t, "config": json.loads(to_json(cfg))}  # fmt: skip
        if codec is not None:
            meta["steadied"] = steadied
        write_shard(
            out, {"trajectory": torch.cat(trajs), "context": text, "timesteps": torch.tensor(kept_t)}, meta
        )
        written.append(out)
        steady = f", {sum(steadied)} steadied (the rest keep the teacher's x0)" if codec is not None else ""
        _say(ctx, f"wrote {out} ({len(idx)} samples{steady})")
        if len(written) == 1:  # this run's first pair decoded, to see what ode-init will learn before it runs
            preview = folder / "samples" / f"{out.stem}.mp4"
            try:
                _write_latent_video(trajs[0][:1, -1], cfg, preview)
                _say(ctx, f"its first sample, {prompts[0]!r}, decoded to {preview}")
            except Exception as err:  # noqa: BLE001 - a preview never costs the pairs already written
                _say(ctx, f"warning: no preview of {out.name} ({type(err).__name__}: {err}); the pairs are kept")
    dist.barrier(ctx)
    return {"stage": "ode-pairs", "folder": folder, "written": written}


def _pairs(cfg: OdeInitConfig | DMDConfig) -> ShardSource:
    default, made = chain_stage(cfg, "ode-pairs")
    folder = require(cfg.pairs, default, "ODE pair folder", made, "--pairs")
    pairs = ShardSource(folder, "trajectory", made)
    stored = pairs.meta("timesteps")[:-1]
    steps = denoising_timesteps(cfg.sampling)
    if len(stored) != len(steps) or max(abs(a - b) for a, b in zip(stored, steps, strict=True)) > 1.5:
        raise ConfigError(
            f"the ODE pairs in {folder} were stored at t = {stored}, the student's list is {steps}; "
            "make pairs for this list (ode-pairs with the same --sampling.denoising-steps)"
        )
    return pairs


def _student_input(
    x_traj: Tensor | None,
    x0: Tensor,
    idx: Tensor,
    steps: list[float],
    schedule: FlowSchedule,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-frame student input: trajectory points (ODE) or x0 re-noised; returns (x_t, t [B, F], sigma)."""
    t = torch.tensor(steps, dtype=torch.float32)[idx]  # [B, F]
    sigma = schedule.sigma(t)
    if x_traj is not None:  # [B, K+1, C, F, h, w] -> the point at idx for each frame
        b, _, c, f, h, w = x_traj.shape
        g = idx.view(b, 1, 1, f, 1, 1).expand(b, 1, c, f, h, w).to(x_traj.device)
        return torch.gather(x_traj, 1, g).squeeze(1), t, sigma
    eps = torch.randn(tuple(x0.shape), generator=gen).to(x0.device)
    return add_noise(x0, eps, sigma.float().to(x0.device)), t, sigma


def run_ode_init(cfg: OdeInitConfig, ctx: dist.DistContext) -> dict[str, Any]:
    """Causal student regressed onto x0 from trajectory points, each chunk at its own step of the list."""
    dev = ctx.device
    path = teacher_path(cfg, cfg.teacher_kind, cfg.teacher, f"{cfg.teacher_kind} teacher checkpoint", "--teacher")
    check_kind(path, cfg.teacher_kind, "--teacher-kind")
    pairs = _pairs(cfg)
    _say(ctx, memory_report({"student": True}, cfg, ctx))
    raw = load_dit(path, cfg, dev, trainable=True)
    model = dist.wrap(raw, ctx)
    t = Trainable("step", model, adamw(model, cfg.lr, cfg), raw)
    schedule = FlowSchedule.from_config(cfg.sampling)
    steps = denoising_timesteps(cfg.sampling, schedule)

    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(cfg.seed, step, ctx.rank)
        batch = pairs.get(_indices(cfg, ctx, step, len(pairs)))
        traj, text = batch.latents.to(dev), batch.context.to(dev)
        b, f = traj.shape[0], traj.shape[3]
        mask = block_causal(cfg, f)
        idx = chunk_step_indices(b, mask["chunk_sizes"], len(steps), gen, cfg.clean_chunks)
        x_t, tt, sigma = _student_input(traj, traj[:, -1], idx, steps + [0.0], schedule, gen)
        with dist.autocast(ctx, cfg.amp):
            v = model(x_t, tt.to(dev), text, **mask)
        x0_pred = x0_from_v(x_t, v, sigma.to(dev))
        loss = poison(ode_regression_loss(x0_pred, traj[:, -1], tt.to(dev)), step, cfg)
        value = checked("loss", loss, step, cfg, ctx)
        return {"loss": value, "grad_norm": update(t, loss, cfg)}

    def sample_fn(step: int, folder: Path) -> None:
        _sample_student_video(
            raw, cfg, pairs.get([0]).context[:1], folder / "samples" / f"step_{step:06d}.mp4"
        )

    return train_loop(cfg, ctx, [t], step_fn, sample_fn)


def _dmd_models(
    cfg: DMDConfig, ctx: dist.DistContext
) -> tuple[CausalWanModel, CausalWanModel, CausalWanModel]:
    """(generator, critic, real score) from their checkpoints, with errors naming the stage that makes each."""
    dev = ctx.device
    real_path = teacher_path(cfg, cfg.teacher_kind, cfg.teacher, f"{cfg.teacher_kind} teacher checkpoint", "--teacher")
    check_kind(real_path, cfg.teacher_kind, "--teacher-kind")
    critic_kind = cfg.critic_kind_used
    if cfg.critic_init is None and critic_kind == cfg.teacher_kind:
        critic_path = real_path
    else:
        critic_path = teacher_path(cfg, critic_kind, cfg.critic_init, "critic init checkpoint", "--critic-init")
    if cfg.skip_ode_init:
        gen_path = teacher_path(cfg, cfg.teacher_kind, cfg.generator_init or cfg.teacher, "generator init",
                                "--generator-init")  # fmt: skip
    else:
        default, made = chain_stage(cfg, "ode-init")
        gen_path = require(cfg.generator_init, default / "final.safetensors", "ODE-init student checkpoint", made,
                           "--generator-init")  # fmt: skip
    _say(
        ctx,
        f"generator <- {gen_path}, critic ({critic_kind}) <- {critic_path}, "
        f"real score ({cfg.teacher_kind}) <- {real_path}",
    )
    return (
        load_dit(gen_path, cfg, dev, True),
        load_dit(critic_path, cfg, dev, True),
        load_dit(real_path, cfg, dev, False),
    )


def score_x0(
    model: nn.Module, x_t: Tensor, t: Tensor, text: Any, sigma: Tensor, mask: dict[str, Any] | None
) -> Tensor:
    """x0 predicted by a score model at one t per sample (t [B]; repeated per frame when causal, that is when
    ``mask`` holds block-causal keyword arguments, ``block_causal``'s)."""
    return x0_from_v(x_t, model(x_t, _frame_t(t, x_t, mask), text, **(mask or {})), sigma)


def _frame_t(t: Tensor, x_t: Tensor, mask: dict[str, Any] | None) -> Tensor:
    """One t per sample [B] as a block-causal model takes it: [B, F], the same t on every frame."""
    return t[:, None].expand(-1, x_t.shape[2]) if mask else t


def dmd_generator_loss(
    x: Tensor,
    t: Tensor,
    sigma: Tensor,
    eps: Tensor,
    text: Tensor,
    uncond: Tensor,
    real: nn.Module,
    critic: nn.Module,
    guidance: float,
    real_mask: dict[str, Any] | None = None,
    critic_mask: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """DMD loss of generator samples ``x``: real score with CFG, critic conditional only (no grad to either).
    ``real_mask`` / ``critic_mask``: run that score block-causally with these keyword arguments (``block_causal``'s:
    a causal teacher / critic)."""
    with torch.no_grad():
        x_t = add_noise(x.detach(), eps, sigma)
        fake = score_x0(critic, x_t, t, text, sigma, critic_mask)
        cond = score_x0(real, x_t, t, text, sigma, real_mask)
        unc = score_x0(real, x_t, t, uncond.expand_as(text), sigma, real_mask)
        real_x0 = cfg_combine(cond, unc, guidance)
    grad = dmd_gradient(x, real_x0, fake)
    return dmd_loss(x, grad), grad


def critic_loss(
    critic: nn.Module, x_fake: Tensor, t: Tensor, sigma: Tensor, eps: Tensor, text: Tensor,
    mask: dict[str, Any] | None = None,
) -> Tensor:  # fmt: skip
    """Flow MSE (v - (eps - x))^2 of the critic on student samples ``x_fake`` only (block-causal with ``mask``,
    ``block_causal``'s keyword arguments)."""
    x_t = add_noise(x_fake.detach(), eps, sigma)
    return flow_matching_loss(critic(x_t, _frame_t(t, x_t, mask), text, **(mask or {})), eps, x_fake.detach())


def run_dmd(cfg: DMDConfig, ctx: dist.DistContext) -> dict[str, Any]:
    """Asymmetric DMD: the critic steps every iteration, the generator every ``critic_steps``-th."""
    dev = ctx.device
    source = _pairs(cfg) if cfg.input == "ode" else build_source(cfg)
    _say(ctx, memory_report({"generator": True, "critic": True, "real score": False}, cfg, ctx))
    g_raw, c_raw, real = _dmd_models(cfg, ctx)
    g_model, c_model = dist.wrap(g_raw, ctx), dist.wrap(c_raw, ctx)
    gen_t = Trainable("step", g_model, adamw(g_model, cfg.lr, cfg), g_raw)
    crit_t = Trainable("critic", c_model, adamw(c_model, cfg.critic_lr or cfg.lr, cfg), c_raw)
    schedule = FlowSchedule.from_config(cfg.sampling)
    steps = denoising_timesteps(cfg.sampling, schedule)
    uncond = uncond_context(cfg).to(dev)

    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(cfg.seed, step, ctx.rank)
        batch = source.get(_indices(cfg, ctx, step, len(source)))
        lat, text = batch.latents.to(dev), batch.context.to(dev)
        x0 = lat[:, -1] if cfg.input == "ode" else lat  # ODE-final latents or data latents
        b, f = x0.shape[0], x0.shape[2]
        mask = block_causal(cfg, f)
        x_in, t_in, sig_in = _student_input(
            None, x0, chunk_step_indices(b, mask["chunk_sizes"], len(steps), gen), steps, schedule, gen
        )
        t_in, sig_in = t_in.to(dev), sig_in.to(dev)
        t = dmd_timesteps(b, gen, shift=cfg.sampling.shift, min_t=cfg.min_t, max_t=cfg.max_t)
        sigma = schedule.sigma(t).float().to(dev)
        t, eps_g, eps_c = t.to(dev), randn(x0.shape, gen, dev), randn(x0.shape, gen, dev)
        real_mask = mask if cfg.teacher_kind == "causal" else None
        critic_mask = mask if cfg.critic_kind_used == "causal" else None
        out: dict[str, float] = {}
        if step % cfg.critic_steps == 0:
            with dist.autocast(ctx, cfg.amp):
                x = x0_from_v(x_in, g_model(x_in, t_in, text, **mask), sig_in)
                loss, grad = dmd_generator_loss(
                    x, t, sigma, eps_g, text, uncond, real, c_raw, cfg.guidance, real_mask, critic_mask
                )
            loss = poison(loss, step, cfg)
            out["gen_loss"] = checked("generator loss", loss, step, cfg, ctx)
            out["gen_grad_norm"] = update(gen_t, loss, cfg)
        with torch.no_grad(), dist.autocast(ctx, cfg.amp):
            x_fake = x0_from_v(x_in, g_raw(x_in, t_in, text, **mask), sig_in)
        with dist.autocast(ctx, cfg.amp):
            loss_c = poison(critic_loss(c_model, x_fake, t, sigma, eps_c, text, critic_mask), step, cfg)
        out["critic_loss"] = checked("critic loss", loss_c, step, cfg, ctx)
        out["critic_grad_norm"] = update(crit_t, loss_c, cfg)
        return out

    def sample_fn(step: int, folder: Path) -> None:
        _sample_student_video(
            g_raw, cfg, source.get([0]).context[:1], folder / "samples" / f"step_{step:06d}.mp4"
        )

    return train_loop(cfg, ctx, [gen_t, crit_t], step_fn, sample_fn)


# -- samples -------------------------------------------------------------------------------
def _write_latent_video(latents: Tensor, cfg: RunConfig, path: Path) -> None:
    from causvid_core.pipeline import to_uint8_frames

    from .data import build_codec
    from .logging_utils import write_strip, write_video

    frames = to_uint8_frames(build_codec(cfg).decode(latents.cpu())).numpy()  # the first sample, [T, H, W, 3]
    write_video(frames, path, fps=16)
    write_strip(frames, path.with_suffix(".png"))  # the same sample as 8 frames in one image


def _sample_teacher_video(
    model: CausalWanModel, cfg: TeacherConfig, source: Any, uncond: Tensor, path: Path
) -> None:
    dev = next(model.parameters()).device
    text = source.prompts([0])[1][:1].to(dev)
    noise = torch.randn((1, *latent_shape(cfg)), generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
    mask = block_causal(cfg, noise.shape[2]) if cfg.kind == "causal" else {}
    with torch.no_grad():
        x0, _ = sample_teacher(model, noise, model.encode_context(text), model.encode_context(uncond),
                               num_steps=cfg.sample_steps, shift=cfg.sampling.shift,
                               guidance=cfg.sample_guidance, **mask)  # fmt: skip
    _write_latent_video(x0, cfg, path)


def _sample_student_video(model: CausalWanModel, cfg: RunConfig, text: Tensor, path: Path) -> None:
    from causvid_core.stream import StreamingGenerator

    c, f, h, w = latent_shape(cfg)
    was_training = model.training
    model.eval()
    stream = StreamingGenerator(model, text, (h, w), seed=cfg.seed, sampling=cfg.sampling, causal=cfg.causal)
    parts, got = [], 0
    while got < f:
        parts.append(stream.next_chunk(min(cfg.causal.chunk_frames, f - got)))
        got += parts[-1].shape[2]
    model.train(was_training)
    _write_latent_video(torch.cat(parts, dim=2), cfg, path)


# -- entry points --------------------------------------------------------------------------
def _run_vae(cfg: Any, ctx: dist.DistContext) -> dict[str, Any]:
    from .vae_stage import run_vae

    return run_vae(cfg, ctx)


RUNNERS: dict[str, Callable[[Any, dist.DistContext], dict[str, Any]]] = {
    "vae": _run_vae,
    "teacher": run_teacher,
    "ode-pairs": run_ode_pairs,
    "ode-init": run_ode_init,
    "dmd": run_dmd,
}


def run(stage: str, cfg: RunConfig) -> dict[str, Any]:
    """Run one stage with an already built config (in-process entry point for tests and scripts)."""
    from .data import run_precompute

    ctx = dist.init_distributed(cfg.device, cfg.fsdp)
    failed = True
    try:
        if ctx.is_main:
            print(f"== {stage} ({stage_name(cfg)}), world size {ctx.world_size}, device {ctx.device}")
            print(to_json(cfg), flush=True)
        t0 = time.perf_counter()
        runner = run_precompute if isinstance(cfg, PrecomputeConfig) else RUNNERS[stage]
        result = runner(cfg, ctx)
        _say(ctx, f"== {stage} done in {time.perf_counter() - t0:.1f} s")
        failed = False
        return result
    finally:
        if ctx.distributed:  # a failed rank leaves without the barrier: the others wait in a collective that
            dist.shutdown(wait=not failed)  # it never joins, and torchrun stops them once this one exits


USAGE = (
    "usage: python -m training.distill {vae,precompute,teacher,ode-pairs,ode-init,dmd} [--preset NAME] [--key value ...]\n"
    "       python -m training.distill STAGE --help   (lists every option)"
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``STAGE --preset P --key value ...`` and run the stage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return {}
    stage = argv[0]
    if stage not in (*RUNNERS, "precompute"):
        import difflib

        close = difflib.get_close_matches(stage, [*RUNNERS, "precompute"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown stage {stage!r}{hint}; {USAGE}")
    if "--help" in argv or "-h" in argv:
        at = argv.index("--preset") if "--preset" in argv else -1
        preset = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), "shapes")
        if 0 <= at < len(argv) - 1:
            preset = argv[at + 1]
        print(describe_fields(stage, preset))
        return {}
    return run(stage, parse_cli(stage, argv[1:]))


def cli() -> int:
    """Console entry: clear one-line errors instead of tracebacks for bad input and stopped runs."""
    try:
        main()
    except TrainingStopped as err:  # stopped on request, the checkpoint saved: not "done", not a success
        _error_line(str(err))
        return err.code
    except (ConfigError, TrainingError) as err:
        _error_line(f"error: {err}")
        return 2
    return 0


def _error_line(text: str) -> None:
    """One write per message, rank 0's as it is and another rank's after "rank N: ": the ranks of a torchrun
    job share stderr, and print's separate newline let one rank's message run into another's. Every rank
    says its own (an error can be one rank's alone, e.g. a GPU index past the machine's)."""
    rank, world = dist.launch_rank()
    sys.stderr.write((f"rank {rank}: " if world > 1 and rank else "") + text + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(cli())
