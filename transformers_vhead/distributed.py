"""What a distributed engine needs of a save: the full tensors of sharded parameters, gathered by every rank (a
collective), and a checkpoint written by rank 0 alone, there for every rank when the save returns.

transformers gathers only what it sharded itself: a model loaded with `from_pretrained(distributed_config=...)` has
`config.distributed_config`. Parameters sharded by `torch.distributed.fsdp.fully_shard` (FSDP2, as accelerate's FSDP2
and TRL apply it) are DTensors in `state_dict()`, and safetensors cannot write those ("Attempted to access the data
pointer on an invalid python storage"), for a bare transformers model as for ours.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ZeRO3ShardsSaveError


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_sharded(model: nn.Module) -> bool:
    """Whether a parameter of `model` is a DTensor (FSDP2's `fully_shard`, tensor parallelism)."""
    if not _distributed():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def gather_for_save(model: nn.Module, state_dict: dict | None) -> tuple[dict | None, bool]:
    """The state dict to save and whether it was gathered here. A sharded model's full state dict, on CPU, is kept on
    rank 0 (the other ranks get `{}`); every rank must call this. A `state_dict` given (accelerate's
    `get_state_dict`), or a model transformers sharded itself, is left as it is."""
    if state_dict is not None or getattr(model.config, "distributed_config", None) is not None or not is_sharded(model):
        return state_dict, False
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), True


def refuse_zero3_shards(model: nn.Module, state_dict: dict | None) -> None:
    """On the rank that writes: refuses to save DeepSpeed ZeRO-3 shards. Outside `deepspeed.zero.GatheredParameters`
    each rank holds empty tensors, which transformers' `save_pretrained` writes as they are (0-element tensors that
    no load accepts). It is not gathered here: under accelerate's idiom the other ranks pass `state_dict=None` too (what
    `get_state_dict` returns there), so a rank cannot tell a plain save it should gather for from one it should sit out,
    and a gather that only some ranks join hangs."""
    if state_dict is not None:
        return
    partitioned = [name for name, parameter in model.named_parameters() if _is_zero3_shard(parameter)]
    if partitioned:
        raise ZeRO3ShardsSaveError(
            f"{type(model).__name__}.save_pretrained was called without a state_dict, but {len(partitioned)} of its "
            f"parameters (e.g. {partitioned[0]}) are DeepSpeed ZeRO-3 shards: saving them would write empty tensors. "
            "On every rank, pass the gathered weights, `state_dict=accelerator.get_state_dict(model)` (or the "
            "DeepSpeed engine's `_zero3_consolidated_16bit_state_dict()`; both need "
            "`stage3_gather_16bit_weights_on_model_save: true`), or save inside "
            "`with deepspeed.zero.GatheredParameters(list(model.parameters())):`, with `is_main_process` true on "
            "rank 0 only."
        )


def _is_zero3_shard(parameter: torch.Tensor) -> bool:
    status = getattr(parameter, "ds_status", None)  # set by deepspeed's zero.Init; read without importing deepspeed
    return status is not None and status.name != "AVAILABLE"


def writes_checkpoint(is_main_process: bool) -> bool:
    """Whether this process writes the checkpoint: the main process, and when torch.distributed is up only rank 0
    (as transformers decides), so a rank given `is_main_process=True` by mistake never writes beside it."""
    return is_main_process and (not _distributed() or torch.distributed.get_rank() == 0)


def wait_for_writer(gathered: bool) -> None:
    """After a gathered save, every rank waits for rank 0's write (every rank is in the save: it gathered)."""
    if gathered:
        torch.distributed.barrier()
