"""The training every engine test runs, and what rank 0 reports of it.

A tiny seeded Llama with a value head (no dropout: the ranks and the single-process run must compute the same thing),
a fixed global batch split in equal halves across the ranks, a loss on both the logits and the values, plain SGD. DDP
and FSDP average the gradients over the ranks, so with equal halves they take the same steps as one process on the
whole batch (`single_process_run`), up to the order of float additions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead

SEED, VOCAB_SIZE, GLOBAL_BATCH, SEQ_LEN, STEPS, LEARNING_RATE = 0, 64, 4, 8, 2, 0.5
TENSORS = "tensors.safetensors"  # what rank 0 reports as tensors, beside the JSON result (in the launch's directory)


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ_LEN,
        pad_token_id=0,
    )


def tiny_language_model() -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    return LlamaForCausalLM(tiny_config())


def tiny_model(base: str | os.PathLike | None = None, **head_settings) -> AutoModelForCausalLMWithValueHead:
    """The same weights on every rank and in the test process (seeded), in train mode: `tiny_language_model` with a
    fresh value head, or the language model saved at `base` (with `peft_config=`: a LoRA policy on it)."""
    language_model = tiny_language_model() if base is None else base
    torch.manual_seed(SEED)
    return AutoModelForCausalLMWithValueHead.from_pretrained(
        language_model, summary_dropout_prob=0.0, **head_settings
    ).train()


def policy_lora():
    """The LoRA of the PEFT policy runs (peft is imported only by them); random B, not zeros, so that both matrices
    train from the first step."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )


def global_batch() -> dict[str, torch.Tensor]:
    """Token ids and value targets of every step: `(STEPS, GLOBAL_BATCH, SEQ_LEN)`."""
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(3, VOCAB_SIZE, (STEPS, GLOBAL_BATCH, SEQ_LEN), generator=generator)
    returns = torch.randn(STEPS, GLOBAL_BATCH, SEQ_LEN, generator=generator)
    return {"input_ids": input_ids, "returns": returns}


def rank_batch(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's equal share of every step's global batch."""
    rows = GLOBAL_BATCH // world_size
    return {name: tensor[:, rank * rows : (rank + 1) * rows] for name, tensor in global_batch().items()}


def probe_inputs() -> torch.Tensor:
    """The token ids the trained model's values and logits are compared on."""
    return global_batch()["input_ids"][0]


def loss_of(model: torch.nn.Module, input_ids: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """LM loss plus the values' squared error, both means over equal shares: the ranks' mean is the whole batch's."""
    output = model(input_ids=input_ids, labels=input_ids)
    return output.loss + torch.nn.functional.mse_loss(output.value, returns)


def train(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer=None, backward=None) -> list[float]:
    """`STEPS` SGD steps, one per step's slice of `batch`; returns the losses. `backward` is the engine's
    (`accelerator.backward`), else `loss.backward()`."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for step in range(STEPS):
        loss = loss_of(model, batch["input_ids"][step], batch["returns"][step])
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def single_process_run(**head_settings) -> tuple[AutoModelForCausalLMWithValueHead, list[float]]:
    """What the engines must reproduce: the same steps on the whole global batch in one process."""
    model = tiny_model(**head_settings)
    return model, train(model, global_batch())


@torch.no_grad()
def outputs_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model.eval()
    output = model(input_ids=probe_inputs())
    return {"value": output.value, "logits": output.logits}


def checkpoint_report(
    name: str, checkpoints: dict[str, str | os.PathLike], trained: dict[str, torch.Tensor], fresh: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """For rank 0: the trained full state dict (`<name>.trained.<parameter>`), the outputs on the probe of `fresh` (an
    unsharded model of the same kind) given it (`<name>.<output>.trained`), and those of each checkpoint reloaded
    with `AutoModelForCausalLM`, as users load it (`<name>.<checkpoint>.<output>`), all computed here with the same
    threads."""
    fresh.load_state_dict(trained)
    report = {f"{name}.trained.{key}": tensor for key, tensor in trained.items()}
    report.update({f"{name}.{key}.trained": tensor for key, tensor in outputs_of(fresh).items()})
    for kind, checkpoint in checkpoints.items():
        reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
        report.update({f"{name}.{kind}.{key}": tensor for key, tensor in outputs_of(reloaded).items()})
    return report


def write_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """For rank 0: tensors for the test, to `TENSORS` in the launch's directory."""
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, Path(TENSORS))
