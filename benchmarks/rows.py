"""The rows of the table, the implementations compared and the targets: plain data, no torch import."""

from __future__ import annotations

from dataclasses import dataclass, field

BARE, OURS, TRL = "bare", "transformers-vhead", "trl"
BF16_NO_UPCAST = "bf16 forward, upcast_logits=False"
REFERENCE_MEMORY, POLICY_AND_REFERENCE = "reference memory", "policy + reference"
DDP_STEP = "DDP step"
# The reference rows' model: the layers, not the LM head, cost most of a forward (about 90% at these sizes), as in
# the models PPO trains, so sharing the lower half of them has something to save.
LAYERS_DOMINATE = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "intermediate_size": 1376,
}


@dataclass(frozen=True)
class Target:
    """The most a row may cost as a multiple of bare transformers (None: no target, the ratio is informative); `kept`:
    the most a reference may keep beyond the policy, as a multiple of the policy's unshared part."""

    time: float | None = None
    memory: float | None = None
    kept: float | None = None


@dataclass(frozen=True)
class Row:
    """One row of the table: what is measured, which implementations take part, and our target."""

    name: str
    what: str
    implementations: tuple[str, ...] = (BARE, OURS, TRL)
    target: Target = Target()
    checkpoints: bool = False  # reads the checkpoints that `python -m benchmarks.measure prepare` saves
    # Sizes of its own (Workload fields) over the defaults; flags given to the runner override them. The checkpoints
    # are saved at the run's workload, so a row that reads them has none.
    workload: dict[str, int] = field(default_factory=dict)
    # More than 1: the row runs in this many processes (gloo), forked by one measuring process per round after its
    # imports, in which its implementations take turns call by call (a launch costs more than a row's calls).
    processes: int = 1


ROWS = (
    Row(
        "forward",
        "policy scoring: logits + values vs the bare causal LM's forward (use_cache=False)",
        target=Target(time=1.03, memory=1.02),
    ),
    Row(
        "value-only",
        "critic / reward: values vs the bare backbone's forward (no LM head); TRL has no value-only call, so its "
        "column is its full forward",
        target=Target(time=1.05, memory=1.05),
    ),
    Row(
        "generate", "greedy rollouts of a fixed number of new tokens vs the bare model's generate", target=Target(1.02)
    ),
    Row(
        "load",
        "from_pretrained of a saved checkpoint (ours through AutoModelForCausalLM) vs the bare checkpoint's",
        target=Target(1.10),
        checkpoints=True,
    ),
    Row("bf16 forward", "the forward with the base in bf16; logits are upcast to fp32 (as TRL does), the head is fp32"),
    Row(BF16_NO_UPCAST, "the bf16 forward with our `upcast_logits=False`: no fp32 copy of the logits", (BARE, OURS)),
    Row(
        "reward score",
        "reward-adapter scoring: one score per sequence from a LoRA reward adapter and its `score` head, loaded next "
        "to a LoRA policy on the same base, vs the bare backbone's forward with the reward adapter active (no LM head, "
        "no score head); TRL's column is its per-token compute_reward_score with the last token picked",
        target=Target(time=1.10, memory=1.10),
        checkpoints=True,
    ),
    Row(
        REFERENCE_MEMORY,
        "create_reference_model(model, num_shared_layers=k), k = half the layers, vs a full copy (the bare column: "
        "create_reference_model(model)); time and peak are the creation's, and the line under the table says what the "
        "reference keeps beyond the policy; TRL's column is its create_reference_model with the same k on its "
        "value-head model (a deep copy of the whole model first)",
        target=Target(kept=1.01),
        workload=LAYERS_DOMINATE,
    ),
    Row(
        POLICY_AND_REFERENCE,
        "the policy's logits and values and the reference's logits (reference with k = half the layers) from "
        "forward_with_reference, which runs the shared layers once, vs the policy's forward then the reference's "
        "(the bare column); TRL's column is the same two forwards of its value-head model and its reference",
        target=Target(time=0.82),
        workload=LAYERS_DOMINATE,
    ),
    Row(
        DDP_STEP,
        "one training step under DistributedDataParallel in 2 processes (gloo): the forward with logits and values, "
        "LM loss + value MSE, backward (the gradients' all-reduce), SGD step, vs the bare causal LM's step on its LM "
        "loss; each process its own batch",
        (BARE, OURS),
        target=Target(time=1.05),
        processes=2,
    ),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}
