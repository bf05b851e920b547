"""What the ZeRO-3 worker (`deepspeed_zero3.py`) and its single-process twin in `tests/test_deepspeed.py` share: the
DeepSpeed config, the optimizer's settings and the loss. Imports no deepspeed (its import takes seconds)."""

import torch

SEED, LR, STEPS, MAX_GRAD_NORM = 0, 0.05, 2, 1.0

# Persistence thresholds 0: every parameter of the tiny model is partitioned (the default keeps small ones whole on
# every rank, which would test nothing). No fp16/bf16 section: fp32 end to end, so values compare with plain torch.
ZERO3 = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_model_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_clipping": MAX_GRAD_NORM,  # DeepSpeed's default too; the twin clips by the same global norm
    "zero_allow_untested_optimizer": True,  # a plain torch optimizer: no DeepSpeed op to JIT-compile on CPU
    "steps_per_print": 10**9,
}


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum, not Adam: the comparison is of DeepSpeed's gradients and steps with plain torch's, and Adam's
    first steps are about lr * sign(gradient), so a gradient that nearly cancels (an element of ~1e-9 summed from
    terms of ~1e-2, in another order over the two ranks) moves by up to lr either way (seen: 4e-4 at lr 1e-3). SGD's
    step is linear in the gradient, so the float32 rounding of the sums stays at ~1e-7."""
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def loss_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """LM loss plus the values' squared error, so the logits and the values both get gradients."""
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = output.logits[:, :-1].flatten(0, 1)
    lm = torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:].flatten())
    return lm + ((output.value - batch["returns"]) ** 2).mean()
