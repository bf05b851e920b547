"""The rows of the table, the implementations compared and the targets: plain data, no torch import."""

from __future__ import annotations

from dataclasses import dataclass, field

BARE, OURS, TRL = "bare", "transformers-vhead", "trl"
BF16_NO_UPCAST = "bf16 forward, upcast_logits=False"
REFERENCE_MEMORY, POLICY_AND_REFERENCE = "reference memory", "policy + reference"
DDP_STEP = "DDP step"
LOGPROBS, LOGPROBS_LARGE_VOCAB = "log-probs + values", "log-probs + values at vocab 151936"
PPO_BACKWARD, PACKED = "PPO backward", "packed vs padded"
LOGPROB_ROWS = (LOGPROBS, LOGPROBS_LARGE_VOCAB, PPO_BACKWARD, PACKED)
# The log-prob rows' sequences: 512 tokens, PPO's prompt + response. The full-logits path holds three fp32 tensors of
# (batch, seq, vocab): the logits, the contiguous copy log_softmax makes of them without the last position, its output;
# at vocab 32000 and 8 x 512, 500 MiB each; at Qwen2's vocab of 151936, 2.3 GiB each, 6.9 GiB in all.
LOGPROB_LENGTH = {"seq_len": 512}
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
    Row(
        LOGPROBS,
        "the next-token log-probs (fp32) and values of a batch, no_grad: compute_logprobs(return_values=True), which "
        "runs the LM head and log-softmax a chunk of positions at a time, vs the full-logits path (the bare column): "
        "our forward (the full fp32 logits and the values), then log_softmax and gather in fp32, as a PPO loop does "
        "today (log_softmax copies the sliced logits first: three (batch, seq, vocab) fp32 tensors at once); TRL's "
        "column is its value-head forward, then its own selective_log_softmax",
        target=Target(time=1.05, memory=0.15),
        workload=LOGPROB_LENGTH,
    ),
    Row(
        LOGPROBS_LARGE_VOCAB,
        f"the {LOGPROBS} row at Qwen2's vocab (151936; the full fp32 logits of 8 x 512 are 2.3 GiB, the full-logits "
        "path peaks at three times that, 6.9 GiB)",
        target=Target(time=1.05, memory=0.15),
        workload={**LOGPROB_LENGTH, "vocab_size": 151936},
    ),
    Row(
        PPO_BACKWARD,
        "forward and backward of a PPO loss (clipped ratio of new to old log-probs, entropy bonus, clipped value MSE; "
        "parameter gradients included, set to None after each step) through compute_logprobs(return_entropy=True, "
        "return_values=True), vs the full-logits path (the bare column): our forward, then log_softmax in fp32 for the "
        "log-probs (gather) and the entropy; TRL's column is its value-head forward with its selective_log_softmax and "
        "entropy_from_logits",
        target=Target(memory=0.25),
        workload=LOGPROB_LENGTH,
    ),
    Row(
        PACKED,
        "log-probs + values of a batch whose lengths are spread evenly from 1/16 of the length to all of it (32..512), "
        "right padded: pack_batch (one row, position ids restarting at 0, no padding), compute_logprobs on it under "
        "attn_implementation='vhead_sdpa_varlen' (one causal sdpa per packed sequence) and unpack back to the padded "
        "layout, vs compute_logprobs on the padded batch under sdpa (the bare column); TRL cannot pack",
        (BARE, OURS),
        target=Target(time=0.65),
        workload=LOGPROB_LENGTH,
    ),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}
