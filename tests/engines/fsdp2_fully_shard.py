"""FSDP2 (`torch.distributed.fsdp.fully_shard`, per decoder layer, then the whole model) on CPU, 2 ranks, launched by
torchrun: what `tests/test_engines.py` checks.

    torchrun --nproc-per-node=2 tests/engines/fsdp2_fully_shard.py BASE CHECKPOINT PEFT_CHECKPOINT

The steps of `tiny_training` on this rank's half of the batch, then `save_pretrained` on the sharded model with no
`state_dict=`, on every rank with `is_main_process=rank == 0`, as users call it; the same for a LoRA policy on the
language model saved at BASE. Rank 0 reports the gathered full state dicts, the sharded models' outputs on the probe,
and what every rank found in the checkpoints when its save returned.
"""

import os
import sys

import torch
import torch.distributed as dist
from launch import write_result
from tiny_training import checkpoint_report, outputs_of, policy_lora, rank_batch, tiny_model, train, write_tensors
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """`fully_shard` on every decoder layer, then on the whole value-head model (the root: embeddings, final norm, LM
    head and value head)."""
    for layer in model.pretrained_model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train_and_save(name: str, model, checkpoint: str, fresh) -> tuple[dict, dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shard(model, init_device_mesh("cpu", (world_size,)))
    sharded = {type(parameter).__name__ for parameter in model.parameters()}
    losses = train(model, rank_batch(rank, world_size))
    trained = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sharded_outputs = outputs_of(model)  # every rank runs the sharded forward
    model.save_pretrained(checkpoint, is_main_process=rank == 0)
    found = sorted(os.listdir(checkpoint))  # the save returned: rank 0's files must be there for every rank
    every_rank = [None] * world_size
    dist.all_gather_object(every_rank, {"losses": losses, "found": found})
    result = {"parameter_types": sorted(sharded), "ranks": every_rank}
    tensors = {}
    if rank == 0:
        tensors = checkpoint_report(name, {"checkpoint": checkpoint}, trained, fresh)
        tensors.update({f"{name}.{key}.sharded": tensor for key, tensor in sharded_outputs.items()})
    return result, tensors


def main(base: str, checkpoint: str, peft_checkpoint: str) -> None:
    dist.init_process_group("gloo")
    full, full_tensors = train_and_save("full", tiny_model(), checkpoint, tiny_model())
    policy, fresh_policy = (tiny_model(base, peft_config=policy_lora()) for _ in range(2))
    peft, peft_tensors = train_and_save("peft", policy, peft_checkpoint, fresh_policy)
    if dist.get_rank() == 0:
        write_tensors({**full_tensors, **peft_tensors})
        write_result({"full": full, "peft": peft})
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
