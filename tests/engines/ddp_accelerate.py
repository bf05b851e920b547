"""DDP through `accelerate launch` on CPU (MULTI_CPU, gloo): what `tests/test_engines.py` checks.

`accelerate.prepare(model, optimizer)`, the steps of `tiny_training` on this rank's half of the batch with
`accelerator.backward`, then `unwrap_model(model).save_pretrained(CHECKPOINT)` on the main process.
"""

import sys

import torch
from accelerate import Accelerator
from launch import write_result
from tiny_training import LEARNING_RATE, checkpoint_report, rank_batch, tiny_model, train, write_tensors


def main(checkpoint: str) -> None:
    accelerator = Accelerator()
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = rank_batch(accelerator.process_index, accelerator.num_processes)
    losses = train(model, batch, optimizer, accelerator.backward)
    every_rank = accelerator.gather(torch.tensor([losses])).tolist()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(checkpoint)
        write_tensors(checkpoint_report("ddp", {"checkpoint": checkpoint}, unwrapped.state_dict(), tiny_model()))
        result = {
            "distributed_type": str(accelerator.distributed_type),
            "num_processes": accelerator.num_processes,
            "prepared": type(model).__name__,
            "losses": every_rank,
        }
        write_result(result)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
