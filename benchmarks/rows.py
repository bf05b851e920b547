"""The rows of the table, the implementations compared and the targets: plain data, no torch import."""

from __future__ import annotations

from dataclasses import dataclass

BARE, OURS, TRL = "bare", "transformers-vhead", "trl"
BF16_NO_UPCAST = "bf16 forward, upcast_logits=False"


@dataclass(frozen=True)
class Target:
    """The most a row may cost as a multiple of bare transformers (None: no target, the ratio is informative)."""

    time: float | None = None
    memory: float | None = None


@dataclass(frozen=True)
class Row:
    """One row of the table: what is measured, which implementations take part, and our target."""

    name: str
    what: str
    implementations: tuple[str, ...] = (BARE, OURS, TRL)
    target: Target = Target()
    checkpoints: bool = False  # reads the checkpoints that `python -m benchmarks.measure prepare` saves


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
)
ROWS_BY_NAME = {row.name: row for row in ROWS}
