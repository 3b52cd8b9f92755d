"""PyTorch's own distributed engine: one CPU process, or ``torchrun`` with DDP / FSDP.

``torch.distributed`` is initialised only when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA). Rank 0
alone writes checkpoints and logs; every rank draws its own data (rank-offset seeds).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import Tensor, nn


@dataclass
class DistContext:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun set them for this process; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto", fsdp: bool = False) -> DistContext:
    """Read torchrun's environment and start the process group when there is more than one rank."""
    rank, world = launch_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        from .config import ConfigError

        dev = torch.device("cuda", local if dev.index is None else dev.index)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.index >= count:  # torch's own answer is "invalid device ordinal"
            raise ConfigError(
                f"rank {rank} would use GPU {dev.index}, but this machine has {count} CUDA GPU(s): run torchrun "
                f"with --nproc_per_node {max(count, 1)} or fewer (one rank per GPU), or --device cpu"
            )
        torch.cuda.set_device(dev)
    if fsdp and world <= 1:
        fsdp = False  # nothing to shard in one process
    if fsdp and dev.type != "cuda":
        from .config import ConfigError

        raise ConfigError(
            "--fsdp needs CUDA GPUs (PyTorch's FSDP does not shard on the CPU); drop --fsdp to use DDP"
        )
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, local, dev, fsdp)


def shutdown(wait: bool = True) -> None:
    """Leave the process group (if one was started); ``wait``: after every rank has got here. A rank that
    failed passes ``wait=False``: the others are blocked in a collective it will never join, so a barrier
    would hang both (until gloo's 30-minute timeout) with the error not yet printed."""
    if tdist.is_initialized():
        if wait:
            tdist.barrier()
        tdist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        tdist.barrier()


def mean_across_ranks(value: Tensor, ctx: DistContext) -> float:
    """The mean of a scalar over ranks (NaN anywhere gives NaN everywhere)."""
    v = value.detach().float().reshape(1).clone()
    if ctx.distributed:
        tdist.all_reduce(v)
        v /= ctx.world_size
    return float(v.item())


def any_across_ranks(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when any rank says True (stop requests)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    tdist.all_reduce(t)
    return bool(t.item() > 0)


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP (or FSDP with ``--fsdp``) around a trainable model; the model itself in one process."""
    if not ctx.distributed:
        return model
    if ctx.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
            return size_based_auto_wrap_policy(module, recurse, nonwrapped_numel, min_num_params=int(1e6))

        device_id = ctx.device if ctx.device.type == "cuda" else None
        return FSDP(model, auto_wrap_policy=policy, device_id=device_id, use_orig_params=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (FSDP models are returned as they are)."""
    return model.module if hasattr(model, "module") and not _is_fsdp(model) else model


def _is_fsdp(model: nn.Module) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel"


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole state dict on the CPU (gathered from every rank under FSDP; call it on all ranks)."""
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(True, True)):
            sd = model.state_dict()
    else:
        sd = unwrap(model).state_dict()
    return {k: v.detach().to("cpu").clone() for k, v in sd.items()}


def optim_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """An optimiser state dict that can be saved by rank 0 (full under FSDP; call on all ranks)."""
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.optim_state_dict(model, opt)
    return opt.state_dict()


def load_optim_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load what ``optim_state`` returned."""
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        state = FSDP.optim_state_dict_to_load(model, opt, state)
    opt.load_state_dict(state)


def load_full_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Load a full state dict into a plain, DDP or FSDP model."""
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(False, False)):
            model.load_state_dict(sd)
    else:
        unwrap(model).load_state_dict(sd)


def clip_grad(model: nn.Module, max_norm: float) -> Tensor:
    """Clip the global gradient norm (FSDP computes it over all shards)."""
    if _is_fsdp(model):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def autocast(ctx: DistContext, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA when enabled; nothing on the CPU."""
    if enabled and ctx.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def digest(model: nn.Module) -> str:
    """A short hash of the parameters, to check that every rank holds the same weights."""
    h = hashlib.sha256()
    for key, value in sorted(full_state_dict(model).items()):
        h.update(key.encode())
        h.update(value.float().numpy().tobytes())
    return h.hexdigest()[:16]
