"""DeepSpeed ZeRO-3 on CPU (gloo), 2 ranks, everything `tests/test_deepspeed.py` checks in one launch (the import of
deepspeed and the process start-up cost more than the checks).

`DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc-per-node=2 tests/engines/deepspeed_zero3.py FIXTURES`, where
FIXTURES is the directory the test filled. Rank 0 writes tensors there (`*.safetensors`, the saved checkpoints) and the
rest through `write_result`.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported: no probing for a GPU

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed_common import SEED, STEPS, ZERO3, loss_of, make_optimizer  # noqa: E402
from launch import write_result  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled  # noqa: E402

from transformers_vhead import AutoModelForCausalLMWithValueHead, create_reference_model  # noqa: E402
from transformers_vhead.errors import ReferenceModelError, ZeRO3ShardsSaveError  # noqa: E402


def gathered(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full copies of the (partitioned) parameters whose names start with `prefix`; every rank must call this."""
    named = [(name, p) for name, p in model.named_parameters() if name.startswith(prefix)]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {name: p.detach().clone() for name, p in named}


def partitioned(model: torch.nn.Module) -> bool:
    """Whether every parameter is a ZeRO-3 shard (empty here, its full shape in `ds_shape`)."""
    return all(p.ds_status.name == "NOT_AVAILABLE" and p.numel() == 0 for p in model.parameters())


def on_every_rank(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main(fixtures: Path) -> None:
    # No compiled op: on CPU, deepspeed's communication backend JIT-builds its shared-memory all-reduce
    # (`deepspeed_shm_comm`: about a minute of g++ on a fresh machine) when `__compatible_ops__` lists it, after
    # probing every op with compiler subprocesses. Set before the first read, the dict is what deepspeed keeps; with
    # nothing in it, the collectives are gloo's.
    deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    hf_ds_config = HfDeepSpeedConfig(ZERO3)  # kept alive: transformers holds it by weak reference
    result = {"world_size": dist.get_world_size(), "zero3_enabled": is_deepspeed_zero3_enabled()}
    heads = {}

    # 1. a fresh head on a plain LM, built under zero.Init (seeded as the test's model without ZeRO)
    torch.manual_seed(SEED)
    fresh = AutoModelForCausalLMWithValueHead.from_pretrained(
        fixtures / "plain", v_head_init_strategy="normal", v_head_initializer_range=0.2
    )
    result["fresh_partitioned"] = partitioned(fresh)
    heads["fresh"] = gathered(fresh, "v_head.")
    del fresh

    # 1b. saved heads: ours, a bias-free HF classifier's `score`, LLaMA-Factory's `value_head.safetensors` beside an LM
    for name in ("vhead", "seqcls", "factory"):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(fixtures / name, summary_dropout_prob=0.0)
        heads[name] = gathered(model, "v_head.")
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(fixtures / "vhead", summary_dropout_prob=0.0)

    # 3. create_reference_model refuses the partitioned policy and leaves it as it was
    flags = {name: p.requires_grad for name, p in policy.named_parameters()}
    shards = {name: p.ds_tensor.clone() for name, p in policy.named_parameters()}
    refusals = []
    for num_shared_layers in (1, None):
        try:
            create_reference_model(policy, num_shared_layers=num_shared_layers)
            refusals.append(None)
        except ReferenceModelError as error:
            refusals.append({"class": type(error).__name__, "value_error": isinstance(error, ValueError)})
            result["refusal_message"] = str(error)
    result["refusals"] = refusals
    result["unchanged_after_refusal"] = (
        flags == {name: p.requires_grad for name, p in policy.named_parameters()}
        and all(torch.equal(shards[name], p.ds_tensor) for name, p in policy.named_parameters())
        and not hasattr(policy, "shared_trunk")
    )

    # 2. STEPS steps on this rank's half of a fixed global batch; DeepSpeed averages the gradients over the ranks
    data = load_file(fixtures / "batch.safetensors")
    half = data["input_ids"].shape[0] // dist.get_world_size()
    batch = {key: tensor[rank * half : (rank + 1) * half] for key, tensor in data.items()}
    engine, *_ = deepspeed.initialize(model=policy, optimizer=make_optimizer(policy), config=ZERO3)
    engine.train()
    losses = []
    for _ in range(STEPS):
        loss = loss_of(engine, batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    result["losses"] = on_every_rank(losses)
    trained = gathered(engine.module)

    # 2b. saves. accelerate's idiom: every rank calls, with the gathered state dict (rank 0's; None on the others)
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # what accelerate's get_state_dict returns
    engine.module.save_pretrained(fixtures / "saved_state_dict", state_dict=state_dict, is_main_process=rank == 0)
    # inside GatheredParameters the parameters are whole on every rank, so a plain save_pretrained writes them
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        engine.module.save_pretrained(fixtures / "saved_gathered", is_main_process=rank == 0)
    # a plain save of the shards: the writer refuses (transformers would write 0-element tensors), the others return
    try:
        engine.module.save_pretrained(fixtures / "saved_shards", is_main_process=rank == 0)
        refused = None
    except ZeRO3ShardsSaveError as error:
        refused = {"class": type(error).__name__, "message": str(error)}
    result["shards_save"] = on_every_rank(refused)
    result["shards_save_wrote"] = sorted(path.name for path in (fixtures / "saved_shards").glob("*"))
    result["partitioned_after_saves"] = partitioned(engine.module)

    # 3b. what the refusal offers instead for a PEFT policy: the reference through the adapters. A saved adapter (and
    # its value head beside it) loads under zero.Init; copy_adapter_as_reference before deepspeed.initialize, so the
    # copy is partitioned with the rest; after a step, the reference's logits are those of the adapter as loaded.
    peft_policy = AutoModelForCausalLMWithValueHead.from_pretrained(fixtures / "adapter", is_trainable=True)
    heads["adapter"] = gathered(peft_policy, "v_head.")
    peft_policy.copy_adapter_as_reference()
    peft_engine, *_ = deepspeed.initialize(model=peft_policy, optimizer=make_optimizer(peft_policy), config=ZERO3)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), peft_engine.module.as_reference():
        reference_before = peft_engine(**inputs).logits
    peft_engine.train()
    peft_engine.backward(loss_of(peft_engine, batch))
    peft_engine.step()
    with torch.no_grad(), peft_engine.module.as_reference():
        reference_after = peft_engine(**inputs).logits
    with torch.no_grad():
        policy_after = peft_engine(**inputs).logits
    result["peft_reference_unchanged"] = torch.equal(reference_before, reference_after)
    result["peft_policy_moved"] = (policy_after - reference_after).abs().max().item()

    if rank == 0:
        save_file({"logits": reference_after}, fixtures / "reference_logits.safetensors")  # rows of rank 0's half
        save_file(trained, fixtures / "trained.safetensors")
        for name, head in heads.items():
            save_file(head, fixtures / f"head_{name}.safetensors")
        write_result(result)
    dist.barrier()
    del hf_ds_config
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Everything is written and the process group is gone; the interpreter's own teardown of what deepspeed and the
    # inductor import (Muon) left takes ~4 s more per rank here, so end now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
