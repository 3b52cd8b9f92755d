"""One dataclass config per training stage, chosen by ``--preset`` and overridden with ``--key value``.

Every field is typed; the command line is parsed against those types (``--steps 10``, nested fields
with dots: ``--dit.num-layers 4``, bools as bare flags: ``--grad-ckpt``). The whole config is printed
at start and saved into every checkpoint as JSON, so a run can always be traced back to its settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from causvid_core.config import PRESETS, CausalConfig, DiTConfig, SamplingConfig, VAEConfig


class ConfigError(ValueError):
    """A bad command line or config value; the message names the key and the fix."""


@dataclass
class RunConfig:
    """Settings shared by every stage."""

    name: str = "shapes"  # run name: outputs go to {runs_dir}/{name}/{stage}/
    runs_dir: str = "runs"
    preset: str = "shapes"
    dit: DiTConfig = field(default_factory=DiTConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    # data: 'shapes' renders Shapes videos on the fly; otherwise a folder of latent shards (precompute)
    data: str = "shapes"
    # 'pool' (stand-in), 'run' (this run's vae stage), 'embedded:NAME', a VAE preset or a VAE checkpoint path
    vae: str = "pool"
    height: int = 64
    width: int = 64
    num_frames: int = 33  # pixel frames, 1 + 4k
    data_size: int = 0  # > 0: cycle over this many distinct samples (small reproducible runs)
    text_seed: int = 0  # seed of the Shapes text encoder table
    # optimisation
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    lr_warmup: int = 0  # steps of linear lr warm-up from 0
    lr_decay: float = 0.0  # share of the last steps over which lr falls linearly to 10% (0: constant)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    seed: int = 0
    # runtime
    device: str = "auto"  # 'auto' = cuda when present, else cpu
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    grad_ckpt: bool = False
    fsdp: bool = False
    save_every: int = 100
    log_every: int = 10
    sample_every: int = 0  # 0: no sample videos during training (one is still made at the end if > 0)
    resume: bool = False
    out_dir: str | None = None  # override the stage folder
    debug_nan_at_step: int = -1  # test hook: poison the loss at this step


@dataclass
class TeacherConfig(RunConfig):
    """Flow-matching training of the bidirectional teacher (or a causal one, ``--kind causal``)."""

    init: str | None = None  # fine-tune from this checkpoint
    text_dropout: float = 0.1  # share of samples trained with the empty prompt (for CFG)
    kind: str = "bidirectional"  # or 'causal': block-causal, one timestep per chunk (Table 4 ablation)
    sample_steps: int = 20
    sample_guidance: float = 6.0
    # shift of the training timestep grid; default: the sampler's (sampling.shift). A small model on few
    # tokens spends much of a shift-8 grid above sigma 0.9 (docs/training.md); the net is t-conditioned, so
    # sampling with another shift afterwards is fine
    train_shift: float | None = None
    # weight of the temporal-difference loss added to the flow loss (training/losses.py): the error in each
    # latent frame relative to its neighbours, i.e. the motion; 0 trains on the flow loss alone
    motion_weight: float = 0.0


@dataclass
class OdePairsConfig(RunConfig):
    """The teacher's multi-step CFG trajectories, stored at the student's timesteps."""

    teacher: str | None = None  # default: {runs_dir}/{name}/teacher/final.safetensors (teacher-causal when causal)
    # 'causal': sample a block-causal teacher (teacher --kind causal) chunk-causally, as it was trained;
    # the pairs go to ode-pairs-causal-teacher so they cannot be mistaken for the bidirectional teacher's
    teacher_kind: str = "bidirectional"
    negative: str | None = None  # safetensors with 'context' [1, L, D]; default: the empty prompt
    num_samples: int = 64
    shard_size: int = 16
    num_steps: int = 50
    guidance: float = 6.0
    # replace each x0 by the VAE's latents of the prompt's object drawn exactly along the straight path, at the
    # prompt's velocity, through where the teacher drew it (Shapes prompts; student_clips.steady_targets): the
    # student learns even steps instead of the teacher's jitter. A drawing with no clean path keeps its x0
    steady_targets: bool = False


@dataclass
class OdeInitConfig(RunConfig):
    """Regression of the causal student onto the ODE pairs' x0."""

    teacher: str | None = None  # the student's initial weights; default: the teacher of teacher_kind
    # 'causal': start from the causal teacher and regress onto its pairs (ode-pairs --teacher-kind causal);
    # the student goes to ode-init-causal-teacher
    teacher_kind: str = "bidirectional"
    pairs: str | None = None  # default: {runs_dir}/{name}/ode-pairs (ode-pairs-causal-teacher when causal)
    # share of chunks given as their clean x0 at t = 0, as context only (no loss on them): what the student's
    # cache holds at inference, where every earlier chunk was written at t = 0. The reference draws each
    # chunk's step from [1000, 757, 522, 0], so a quarter of its chunks are clean: the default. 0 never shows
    # the student clean context (this stage until session 37, versions 5-17 of the Shapes model)
    clean_chunks: float = 0.25


@dataclass
class DMDConfig(RunConfig):
    """Asymmetric DMD: frozen real score, trainable critic, causal generator."""

    teacher: str | None = None  # real score; default teacher/final (or teacher-causal/final)
    teacher_kind: str = "bidirectional"  # or 'causal'
    # the critic (fake score) mirrors the real score by default: the same kind (block-causal for a causal
    # teacher) and the same initial weights, so the two agree where the student already matches the data
    # (on Shapes a bidirectional critic beside the causal teacher scored the same; the ODE init decides)
    critic_kind: str | None = None  # default: teacher_kind
    critic_init: str | None = None  # default: the teacher of critic_kind
    # default: ode-init/final, ode-init-causal-teacher/final with a causal teacher (the teacher with
    # --skip-ode-init); the pairs likewise come from the real score's kind unless --pairs names them
    generator_init: str | None = None
    skip_ode_init: bool = False
    input: str = "ode"  # generator input: 'ode' (ODE-final latents) or 'data' (data latents)
    pairs: str | None = None
    guidance: float = 3.5
    critic_steps: int = 5  # critic steps per generator step
    critic_lr: float | None = None  # default: lr
    min_t: float = 20.0
    max_t: float = 980.0

    @property
    def critic_kind_used(self) -> str:
        """The critic's kind: ``critic_kind``, else the real score's."""
        return self.critic_kind or self.teacher_kind


@dataclass
class PrecomputeConfig(RunConfig):
    """Encode videos (Shapes, or a folder with captions) to sharded latent + text-embedding files."""

    videos: str = "shapes"  # 'shapes' or a folder of mp4 files with captions
    text_embeddings: str | None = None  # safetensors 'context' [N, L, D] + metadata 'captions'
    text_encoder: str | None = None  # umT5 weights (Wan .pth / ComfyUI safetensors; tokenizer.json beside)
    num_samples: int = 256
    shard_size: int = 64


CENTROID_READS = ("moment", "edge", "coverage")  # --centroid-read: how the decoder stage's centroid term reads the shift


@dataclass
class VAETrainConfig(RunConfig):
    """The Wan-architecture VAE trained on Shapes clips: L1 + MSE reconstruction and a small KL term.

    After the last step the per-channel mean and std of the posterior means over ``stats_samples``
    clips are stored in the weights' metadata, so ``encode`` gives unit-scale latents for the DiT.
    """

    arch: VAEConfig = field(default_factory=lambda: PRESETS["shapes"].vae)
    clip_frames: int = 9  # pixel frames per training clip, 1 + 4k
    kl_weight: float = 1e-4
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    object_weight: float = 10.0  # loss weight of object pixels (those far from the background)
    image_steps: int = 0  # first steps train on single frames (image_batch of them): cheap, diverse
    image_batch: int = 16
    lr_warmup: int = 100  # the VAE's own defaults for the shared lr schedule (RunConfig)
    lr_decay: float = 0.3
    skip_grad_norm: float = 20.0  # a step whose gradient norm (before clipping) exceeds this is skipped
    guide_steps: int = 0  # pooled-colour guide at full weight this long, then faded out as long again
    guide: str = "pool"  # 'pool' (8x8 mean colour, rank 3), 'quadrants' (4x4 means, rank 12), or 'colour':
    # the 8x8 mean colour on the first 3 latent channels only, no decoding from the guide
    rollback_factor: float = 3.0  # loss above this x the median of the last 20: undo the last update
    stats_samples: int = 256
    inflate: bool = True  # at the switch to clips, temporal layers start as the image network (stills)
    mask_weight: float = 0.0  # soft-segmentation loss at the metrics' 80-from-background threshold
    centroid_weight: float = 0.0  # smooth-L1 loss of the per-frame object centroid (px): the figures' motion
    # how --centroid-weight reads the object's shift: 'moment' (the centroids' difference), 'edge' (one
    # Lucas-Kanade step on the true outline, which pushes corners no harder than the sides) or 'coverage' (the
    # centroids the figures take, faint edge pixels weighed by their distance from the background)
    centroid_read: str = "moment"
    # --centroid-weight on the offset's change from frame to frame (the object's steps), not on the offset
    centroid_motion: bool = False
    # px where --centroid-weight's smooth-L1 loss turns from quadratic to linear (slope 1): temporal quality
    # pays about linearly for every tenth of a pixel, which a term quadratic up to 1 px barely pushes
    centroid_delta: float = 1.0
    # the object's fill ratio (area / bounding box) and box size, soft-segmented as the figures segment, against
    # the true object's: a decoder rounds the corners it is unsure of, which costs few pixels but names the shape
    box_weight: float = 0.0
    colour_weight: float = 0.0  # extra MSE between the 8x8 cell means of the reconstruction and the clip
    object_colour_weight: float = 0.0  # squared error of the object's mean colour in every frame
    shape_weight: float = 0.0  # latent channels 3-5 of the object's cells regress onto a code of its shape
    motion_weight: float = 0.0  # latent channels 6-7 of the object's cells (4-frame groups) regress onto its direction
    colour_code_weight: float = 0.0  # latent channels 8-10 of the object's cells regress onto its colour (RGB)
    temporal_only: bool = False  # train only the past taps and the temporal resampling (the stills stay as they are)
    decoder_only: bool = False  # fine-tune the decoder of ``init`` (encoder frozen: same latents); 'vae-decoder'
    # decoder fine-tune only: its first N steps train on single frames (image_batch of them), then clips. Frame
    # steps are cheap (16 frames cost about a fifth of a step of four 17-frame clips) and teach the spatial layers
    # edges and corners; they never touch the past-frame taps, so the temporal layers stay as the init left them
    # (no inflation)
    decoder_frame_steps: int = 0
    # decoder fine-tune only: the decoder sees its latents plus this many of the init's latent stds of noise
    # per channel (a DiT's latents lie off the encoder's; a decoder fitted to the encoder's alone breaks them up)
    latent_noise: float = 0.0
    # channels the decoder sees without that noise, e.g. '0-2': the pooled colour a --guide colour VAE keeps
    # there is read as brightness, so noise on it teaches a decoder to paint a black background grey
    clean_channels: str = ""
    # decoder fine-tune only: each clip's latents also move by one offset per channel (the same over every frame
    # and place), this many of the init's latent stds: a DiT's latents drift off the encoder's as a whole, and a
    # decoder never shown that turns a slightly-off black background grey a second into a long video
    latent_shift: float = 0.0
    # per-channel exceptions to --latent-shift, 'CHANNELS:STDS,...' (e.g. '3-6:0.5,13:0.4'): a DiT's latents drift
    # further on some channels than on others (scripts/latent_drift.py measures it), and one offset size for all
    # either leaves a decoder fragile on those or blurs the rest
    latent_shift_channels: str = ""
    # decoder fine-tune only: this share of clips is decoded from latents whose shape code (channels 3-5) is that
    # of the same video drawn as another shape, every other channel the original's, and must come out as that
    # other video: meant to make a decoder draw the shape the code names (version 6's barely reads the code;
    # 300 steps of this did not change that, docs/training.md)
    code_swap: float = 0.0
    # adversarial term: a patch discriminator (final_disc.safetensors) tells the reconstruction's frames from
    # the clip's, and the decoder pays this weight x its hinge loss. Pixel losses average a corner the
    # decoder is unsure of into a curve (every shape comes back a circle); this asks for edges that look real
    adv_weight: float = 0.0
    disc_channels: int = 32  # the discriminator's first width (then 2x)
    disc_lr: float | None = None  # the discriminator's lr (default --lr); on the same schedule as the VAE's
    # decoder fine-tune only: a student DiT checkpoint (its run's ode-init or dmd final) whose own latents the
    # decoder also learns, each with the video the student meant (training/student_clips.py: the prompt's object
    # drawn exactly along the student's smoothed path). The shipped student writes the shape code right in every
    # latent frame, and decoders fitted to the encoder's latents draw it as a blob; this teaches them its latents
    student: str | None = None
    student_clips: int = 800  # clips made from --student (kept in the stage's folder; about 0.55 s each on 2 cores)
    student_batch: int = 2  # --student clips per step, beside --batch-size clips of the encoder's latents
    # each --student clip draws a window of 1 + (N - 1) / 4 latent frames per step (N = 1 + 4k frames at the clip's
    # start, N + 3 elsewhere; 0: the whole clip) at a random place, the decoder's causal cache primed without gradient
    # on the latents before it (as a stream decodes them): every place in the clip is learned at about half the
    # cost of the whole (N = 17 of 33), and the time buys steps
    student_frames: int = 0
    # processes (one thread each) that make the --student clips; 0: one per core, at most 8 (2 cores: 2.84 clips/s,
    # one two-thread process 2.14)
    student_workers: int = 0
    # frames of the centred moving average over each --student clip's deviation from a straight path at the
    # prompt's speed, before its target is drawn along it; 0: none of the deviation, the straight path through
    # the clip's mean position (the shards keep the measured path, so any value reuses them)
    student_smooth: int = 5
    # each --student clip's latents also move by one offset per channel, this many of the init's latent stds: the
    # student's latents drift off their 2-second selves over minutes, which the clips (2 seconds each) never show
    student_shift: float = 0.0
    # per-channel exceptions to --student-shift, as --latent-shift-channels (version 15: '3-5:0'): the offsets
    # that keep a long video's colour also blur the shape when given to the shape code (channels 3-5)
    student_shift_channels: str = ""
    init: str | None = None  # start from these VAE weights (default with --decoder-only: this run's vae/final)


STAGE_CONFIGS: dict[str, type[RunConfig]] = {
    "vae": VAETrainConfig,
    "teacher": TeacherConfig,
    "ode-pairs": OdePairsConfig,
    "ode-init": OdeInitConfig,
    "dmd": DMDConfig,
    "precompute": PrecomputeConfig,
}

# Small Shapes model (see SHAPES.md): ~3M parameters, 16 tokens per latent frame at 64x64.
SHAPES_DIT = PRESETS["shapes"].dit

_COMMON: dict[str, dict[str, Any]] = {
    "tiny": {
        "dit": PRESETS["tiny"].dit, "causal": PRESETS["tiny"].causal, "height": 32, "width": 32,
        "num_frames": 21, "batch_size": 2, "steps": 20, "lr": 1e-3, "save_every": 10, "log_every": 5,
        "data_size": 2, "vae": "pool", "amp": False,
    },
    "shapes": {
        "dit": SHAPES_DIT, "causal": PRESETS["shapes"].causal, "height": 64, "width": 64, "num_frames": 33, "batch_size": 8,
        "lr": 3e-4, "vae": "run", "save_every": 200, "log_every": 10, "sample_every": 500,
    },
    "wan2.1-t2v-1.3b": {
        "dit": PRESETS["wan2.1-t2v-1.3b"].dit, "height": 480, "width": 832, "num_frames": 81,
        "batch_size": 1, "lr": 2e-6, "vae": "wan2.1", "grad_ckpt": True, "save_every": 100,
    },
}  # fmt: skip
_STAGE: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "vae": {"arch": PRESETS["tiny"].vae, "clip_frames": 5, "stats_samples": 4},
        "ode-pairs": {"num_samples": 4, "shard_size": 2},
        "dmd": {"steps": 10, "lr": 1e-4, "critic_steps": 2},
        "precompute": {"num_samples": 4, "shard_size": 2},
    },
    "shapes": {
        "vae": {"steps": 3000, "image_steps": 2200, "batch_size": 4, "lr": 5e-5, "grad_clip": 1.0,
                "weight_decay": 0.0, "lr_warmup": 200, "object_weight": 3.0, "guide_steps": 600,
                "save_every": 100, "sample_every": 500},
        # embedded:shapes ran these stages on 2 ranks (scripts/train_shapes.sh): batches are per rank. Since
        # version 3 the teacher's 7000 steps are its first run (teacher-base), continued for 3500 more
        "teacher": {"steps": 7000, "lr_warmup": 100, "lr_decay": 0.3},
        "ode-pairs": {"num_samples": 512, "shard_size": 64},
        "ode-init": {"steps": 1000, "lr": 1e-4, "lr_decay": 0.3, "batch_size": 4},
        "dmd": {"steps": 1000, "lr": 2e-5, "batch_size": 4},
        "precompute": {"num_samples": 3072, "shard_size": 256},
    },
    "wan2.1-t2v-1.3b": {
        "teacher": {"steps": 1000, "lr": 1e-5},
        "ode-pairs": {"num_samples": 1536, "shard_size": 16},
        "ode-init": {"steps": 3000, "lr": 2e-6},
        "dmd": {"steps": 1000},
    },
}
TRAIN_PRESETS: tuple[str, ...] = tuple(_COMMON)


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    """Where a stage writes: {runs_dir}/{name}/{stage} (or ``out_dir``)."""
    if cfg.out_dir and stage == stage_name(cfg):
        return Path(cfg.out_dir)
    return Path(cfg.runs_dir) / cfg.name / stage


def causal_folder(stage: str) -> str:
    """The folder of a stage made from the causal teacher ('ode-pairs' -> 'ode-pairs-causal-teacher')."""
    return f"{stage}-causal-teacher"


def stage_name(cfg: RunConfig) -> str:
    """The folder name of the stage this config runs; variants are named so they cannot be confused."""
    if isinstance(cfg, TeacherConfig):
        return "teacher-causal" if cfg.kind == "causal" else "teacher"
    if isinstance(cfg, VAETrainConfig):
        if cfg.decoder_only:
            return "vae-student" if cfg.student else "vae-decoder"
        return "vae"
    if isinstance(cfg, DMDConfig):
        name = "dmd"
        if cfg.skip_ode_init:
            name += "-no-ode-init"
        if cfg.teacher_kind == "causal":
            name += "-causal-teacher"
        if cfg.critic_kind_used != cfg.teacher_kind:  # a critic that does not mirror the real score
            name += f"-{cfg.critic_kind_used}-critic"
        return name
    if isinstance(cfg, (OdePairsConfig, OdeInitConfig)) and cfg.teacher_kind == "causal":
        return causal_folder("ode-pairs" if isinstance(cfg, OdePairsConfig) else "ode-init")
    return {OdePairsConfig: "ode-pairs", OdeInitConfig: "ode-init", PrecomputeConfig: "latents"}[type(cfg)]


# -- overrides -----------------------------------------------------------------------------
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _parse_value(text: str, tp: Any, key: str) -> Any:
    """Convert a command-line string to the field's type, with a clear error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(text, inner[0], key)
    if origin is tuple:
        return tuple(_parse_value(part.strip(), args[0], key) for part in text.split(",") if part.strip())
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects a bool (true/false), got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"--{key} expects {tp.__name__}, got {text!r}") from None
    return text


RENAMED = {"warmup_steps": "lr_warmup"}  # old option names, answered with the new one


def apply_overrides(cfg: Any, overrides: dict[str, Any], *, strings: bool = False, prefix: str = "") -> Any:
    """Return ``cfg`` with dotted keys replaced (values parsed from strings when ``strings``); ``prefix``:
    the dotted path of ``cfg`` inside the stage config, for messages (``dit.``)."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    table = _fields(type(cfg))
    for raw_key, value in overrides.items():
        key = raw_key.replace("-", "_")
        head, _, rest = key.partition(".")
        if head in RENAMED and head not in table:
            raise ConfigError(f"--{raw_key} is now --{RENAMED[head].replace('_', '-')} (the same option in every stage)")
        if head not in table:
            close = difflib.get_close_matches(head, list(table), n=3)
            hint = f"; did you mean {', '.join('--' + prefix + c.replace('_', '-') for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown option --{prefix}{raw_key} for {type(cfg).__name__}{hint} "
                f"(known: {', '.join(sorted(table))})"
            )
        _, tp = table[head]
        if rest:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"--{raw_key}: {head} has no sub-fields")
            nested.setdefault(head, {})[rest] = value
        elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
            nested.setdefault(head, {}).update(value)
        else:
            flat[head] = _parse_value(value, tp, raw_key) if strings and isinstance(value, str) else value
    for head, sub in nested.items():
        flat[head] = apply_overrides(getattr(cfg, head), {f"{k}": v for k, v in sub.items()}, strings=strings,
                                     prefix=f"{prefix}{head.replace('_', '-')}.")  # fmt: skip
    try:
        return dataclasses.replace(cfg, **flat)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid value in {sorted(overrides)}: {err}") from None


def parse_cli(stage: str, argv: list[str]) -> RunConfig:
    """``--preset P --key value ...`` -> the stage's config (preset first, then the overrides)."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_CONFIGS)}")
    preset, pairs = "shapes", {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options are written --key value")
        key = arg[2:]
        value: str = "true"
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "preset":
            preset = value
        else:
            pairs[key] = value
    return make_config(stage, preset, pairs)


def make_config(stage: str, preset: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a stage config from a training preset plus overrides (strings are parsed)."""
    if preset not in _COMMON:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(TRAIN_PRESETS)}")
    cfg = STAGE_CONFIGS[stage](preset=preset)
    base = {**_COMMON[preset], **_STAGE.get(preset, {}).get(stage, {})}
    cfg = apply_overrides(cfg, {k: v for k, v in base.items() if k in _fields(type(cfg))})
    cfg = apply_overrides(cfg, overrides or {}, strings=True)
    arch = getattr(cfg, "arch", None)
    if isinstance(cfg, VAETrainConfig) and len(arch.latents_mean) != arch.z_dim and not any(
        k.replace("-", "_").startswith(("arch.latents_mean", "arch.latents_std")) for k in (overrides or {})
    ):  # --arch.z-dim N alone: placeholder statistics of N channels (the stage measures the real ones)
        z = arch.z_dim
        cfg = dataclasses.replace(cfg, arch=dataclasses.replace(arch, latents_mean=(0.0,) * z, latents_std=(1.0,) * z))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks with messages that name the fix."""
    if (cfg.num_frames - 1) % 4:
        raise ConfigError(
            f"--num-frames {cfg.num_frames} must be 1 + 4k (the VAE's 4x time stride), e.g. 21 or 33"
        )
    if cfg.height % 16 or cfg.width % 16:
        raise ConfigError(f"--height/--width ({cfg.height}x{cfg.width}) must be multiples of 16")
    for key in ("steps", "batch_size", "save_every", "log_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}")
    if isinstance(cfg, TeacherConfig):
        if cfg.kind not in ("bidirectional", "causal"):
            raise ConfigError(f"--kind must be 'bidirectional' or 'causal', got {cfg.kind!r}")
        if cfg.train_shift is not None and not cfg.train_shift > 0:
            raise ConfigError(f"--train-shift must be a positive number (e.g. 3), got {cfg.train_shift}")
        if not cfg.motion_weight >= 0:
            raise ConfigError(f"--motion-weight must be 0 or more (e.g. 1), got {cfg.motion_weight}")
    if isinstance(cfg, (DMDConfig, OdePairsConfig, OdeInitConfig)):
        if cfg.teacher_kind not in ("bidirectional", "causal"):
            raise ConfigError(f"--teacher-kind must be 'bidirectional' or 'causal', got {cfg.teacher_kind!r}")
    if isinstance(cfg, OdeInitConfig) and not 0.0 <= cfg.clean_chunks < 1.0:
        raise ConfigError(
            f"--clean-chunks is the share of chunks given clean (0 to below 1; the reference's 0.25), got {cfg.clean_chunks}"
        )
    if isinstance(cfg, DMDConfig):
        if cfg.critic_kind not in (None, "bidirectional", "causal"):
            raise ConfigError(f"--critic-kind must be 'bidirectional' or 'causal', got {cfg.critic_kind!r}")
        if cfg.input not in ("ode", "data"):
            raise ConfigError(f"--input must be 'ode' or 'data', got {cfg.input!r}")
        if cfg.critic_steps < 1:
            raise ConfigError(f"--critic-steps must be at least 1, got {cfg.critic_steps}")
    if isinstance(cfg, VAETrainConfig):
        if cfg.centroid_delta <= 0:
            raise ConfigError(f"--centroid-delta {cfg.centroid_delta}: the centroid term's quadratic part needs a positive width in px")
        if cfg.centroid_read not in CENTROID_READS:
            raise ConfigError(f"--centroid-read must be one of {', '.join(CENTROID_READS)}, got {cfg.centroid_read!r}")
        if (cfg.clip_frames - 1) % 4:
            raise ConfigError(f"--clip-frames {cfg.clip_frames} must be 1 + 4k, e.g. 9 or 13")
        if cfg.arch.z_dim != cfg.dit.in_dim:
            raise ConfigError(
                f"--arch.z-dim {cfg.arch.z_dim} differs from the DiT's --dit.in-dim {cfg.dit.in_dim}: "
                "the DiT works on the VAE's latents, so they must match"
            )
    if isinstance(cfg, OdePairsConfig) and cfg.steady_targets:
        if cfg.data != "shapes":
            raise ConfigError(
                f"--steady-targets true measures the path of a Shapes prompt's object, but --data is {cfg.data!r}: "
                "use it with --data shapes, or leave it false"
            )
        if cfg.vae == "pool":
            raise ConfigError(
                "--steady-targets true draws the teacher's latents to measure them and encodes the drawing back, "
                "which the pool codec cannot: pass --vae run, embedded:NAME or a VAE file"
            )
    if isinstance(cfg, OdePairsConfig | PrecomputeConfig) and cfg.shard_size < 1:
        raise ConfigError("--shard-size must be at least 1")


def to_json(cfg: RunConfig) -> str:
    """The config as JSON (stored in checkpoints and printed at start)."""
    return json.dumps({"stage_config": type(cfg).__name__, **dataclasses.asdict(cfg)})


def describe_fields(stage: str, preset: str = "shapes") -> str:
    """``--help`` text: every option with its type and its value under ``preset`` (what a run gets unset)."""
    cfg = make_config(stage, preset)
    lines = [f"python -m training.distill {stage} [--preset {'|'.join(TRAIN_PRESETS)}] [--key value ...]",
             f"defaults of --preset {preset} (--preset NAME --help lists another preset's):"]  # fmt: skip
    for name, (_f, tp) in _fields(type(cfg)).items():
        default = getattr(cfg, name)
        if dataclasses.is_dataclass(tp):
            for sub, (_sf, stp) in _fields(tp).items():
                sd = getattr(default, sub)
                lines.append(f"  --{name}.{sub.replace('_', '-')} ({_tname(stp)}, default {sd})")
        else:
            lines.append(f"  --{name.replace('_', '-')} ({_tname(tp)}, default {default})")
    return "\n".join(lines)


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))
