"""accelerate's FSDP2 and FSDP1 on CPU (gloo), 2 ranks, in one `accelerate launch` with an FSDP2 config: what
`tests/test_engines.py` checks.

    accelerate launch --config_file <FSDP2 config> tests/engines/fsdp_accelerate.py OUTPUT_DIR

accelerate 1.16 turns FSDP on only for accelerator devices: `AcceleratorState` sets `DistributedType.FSDP` in its
branch for MULTI_GPU, MULTI_XPU, ... and never for MULTI_CPU, so on CPU this launch's FSDP config gives DDP, without a
word. The worker therefore sets the state a GPU run gets (`distributed_type` FSDP, the plugin accelerate parses from
the launch's config; for FSDP1 also the device `cpu`: FSDP1 refuses accelerate's `cpu:0` beside parameters on `cpu`),
and all after that is accelerate's own code: `prepare`, `backward`, `get_state_dict`, `unwrap_model`.

Each version trains the steps of `tiny_training` on this rank's half of the batch, then saves as accelerate documents
(`unwrap_model(model).save_pretrained(state_dict=accelerator.get_state_dict(model))`) and, for FSDP2, with a plain
`save_pretrained` on the unwrapped model too. Rank 0 reports the state dicts and the checkpoints' outputs.
"""

import os
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from launch import write_result
from tiny_training import LEARNING_RATE, checkpoint_report, rank_batch, tiny_model, train, write_tensors
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


def as_on_an_accelerator(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """The state accelerate gives an FSDP run on GPUs (see the module's docstring). As accelerate does, the process
    state gets the distributed type too: every `AcceleratorState()` copies it from there."""
    accelerator.state.fsdp_plugin = plugin
    for state in (accelerator.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
        if plugin.fsdp_version == 1:
            state.device = torch.device("cpu")


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained model's full state dict: `accelerator.get_state_dict` for FSDP2 (on rank 0, `{}` on the others).
    FSDP1's is torch's `get_model_state_dict` without CPU offload (on every rank): accelerate's asks FSDP1 for
    `FullStateDictConfig(offload_to_cpu=True, rank0_only=True)`, which on CPU crashes in torch 2.13 for any model
    (SIGSEGV in `_full_post_state_dict_hook`; with `use_orig_params=False` "setStorage: ... out of bounds for
    storage of size 0"): the unsharded parameters are freed before they are cloned."""
    if accelerator.is_fsdp2:
        return accelerator.get_state_dict(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def train_and_save(accelerator: Accelerator, name: str, output: str) -> tuple[dict, dict]:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = rank_batch(accelerator.process_index, accelerator.num_processes)
    losses = train(model, batch, optimizer, accelerator.backward)
    state_dict = full_state_dict(accelerator, model)  # every rank: a collective
    unwrapped = accelerator.unwrap_model(model)
    documented = os.path.join(output, f"{name}-get_state_dict")
    # a copy: transformers' save_pretrained empties the dict it writes
    unwrapped.save_pretrained(documented, is_main_process=accelerator.is_main_process, state_dict=dict(state_dict))
    checkpoints = {"get_state_dict": documented}
    if accelerator.is_fsdp2:
        checkpoints["plain"] = os.path.join(output, f"{name}-plain")
        unwrapped.save_pretrained(checkpoints["plain"], is_main_process=accelerator.is_main_process)
    result = {
        "prepared": type(model).__name__,
        "parameter_types": sorted({type(parameter).__name__ for parameter in model.parameters()}),
        "losses": accelerator.gather(torch.tensor([losses])).tolist(),
    }
    tensors = {}
    if accelerator.is_main_process:
        tensors = checkpoint_report(name, checkpoints, state_dict, tiny_model())
    accelerator.wait_for_everyone()
    return result, tensors


def main(output: str) -> None:
    accelerator = Accelerator()
    picked_on_cpu = str(accelerator.distributed_type)
    from_config = FullyShardedDataParallelPlugin()  # what the launch's config says (accelerate's FSDP_* variables)
    as_on_an_accelerator(accelerator, from_config)
    fsdp2, fsdp2_tensors = train_and_save(accelerator, "fsdp2", output)
    # FSDP1: the same config but for the version (and FSDP1's spelling of resharding after the forward)
    fsdp1_plugin = FullyShardedDataParallelPlugin(fsdp_version=1, reshard_after_forward="FULL_SHARD")
    as_on_an_accelerator(accelerator, fsdp1_plugin)
    fsdp1, fsdp1_tensors = train_and_save(accelerator, "fsdp1", output)
    if accelerator.is_main_process:
        write_tensors({**fsdp2_tensors, **fsdp1_tensors})
        config = {
            "version": from_config.fsdp_version,
            "state_dict_type": str(from_config.state_dict_type),
            "wrap": sorted(from_config.transformer_cls_names_to_wrap or []),
        }
        write_result({"picked_on_cpu": picked_on_cpu, "config": config, "fsdp2": fsdp2, "fsdp1": fsdp1})
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
