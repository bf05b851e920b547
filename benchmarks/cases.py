"""What each row of the table runs, for each implementation: bare transformers, transformers-vhead and TRL 1.12.

Every case gets the same seeded weights and inputs, and returns the zero-argument call that `measure` times. Calls
that TRL and bare transformers make the same way are written once; what differs is which model answers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead, create_reference_model, pack_batch
from transformers_vhead.varlen_attention import ATTN_IMPLEMENTATION as VARLEN_ATTENTION

from .rows import (
    BARE,
    BF16_NO_UPCAST,
    DDP_STEP,
    LOGPROB_ROWS,
    OURS,
    PACKED,
    POLICY_AND_REFERENCE,
    PPO_BACKWARD,
    REFERENCE_MEMORY,
    TRL,
)
from .workload import Workload

REWARD_ADAPTER = "reward-adapter"  # the reward row's adapter, saved next to the checkpoints of the load row
REWARD_NAME = "reward_adapter"  # the name the adapter gets in the bare PeftModel (the value heads' default)


def trl_value_head_class() -> type:
    """TRL 1.12's `AutoModelForCausalLMWithValueHead` (its value heads live in `trl.experimental.ppo`)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead as TRLModel

    return TRLModel


def trl_logprob_functions() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """TRL 1.12's `selective_log_softmax` (the log-probs its PPO trainer takes) and `entropy_from_logits`."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    return selective_log_softmax, entropy_from_logits


def trl_create_reference_model() -> Callable[..., torch.nn.Module]:
    """TRL 1.12's `create_reference_model`: a deep copy of the whole model whose shared parameters then get the
    model's tensors as `.data`."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.utils import create_reference_model as trl_create

    return trl_create


def bare_model(workload: Workload, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(workload.seed)
    config = LlamaConfig(
        vocab_size=workload.vocab_size,
        hidden_size=workload.hidden_size,
        num_hidden_layers=workload.num_hidden_layers,
        num_attention_heads=workload.num_attention_heads,
        intermediate_size=workload.intermediate_size,
        max_position_embeddings=max(2048, workload.seq_len + workload.new_tokens),
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def inputs(workload: Workload) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(workload.seed)
    input_ids = torch.randint(3, workload.vocab_size, (workload.batch_size, workload.seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def with_value_head(implementation: str, model: LlamaForCausalLM, **head_settings) -> torch.nn.Module:
    """The bare model itself, or that same model (same weights) wrapped by our value head or TRL's."""
    if implementation == BARE:
        return model
    if implementation == OURS:
        return AutoModelForCausalLMWithValueHead.from_pretrained(model, **head_settings).eval()
    return trl_value_head_class().from_pretrained(model, **head_settings).eval()


def lora(task_type: str, **settings) -> LoraConfig:
    """The LoRA settings of the reward row's adapters, the policy's ("CAUSAL_LM") and the reward model's ("SEQ_CLS")."""
    return LoraConfig(task_type=task_type, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **settings)


def save_reward_adapter(workload: Workload, directory: str) -> None:
    """A LoRA reward adapter with its `score` head, trained for the bare checkpoint (here: random, seeded), as peft
    saves a `SEQ_CLS` adapter. `init_lora_weights=False` makes its LoRA matrices non-zero, so it changes the output."""
    torch.manual_seed(workload.seed + 1)
    classifier = AutoModelForSequenceClassification.from_pretrained(os.path.join(directory, BARE), num_labels=1)
    reward = get_peft_model(classifier, lora("SEQ_CLS", init_lora_weights=False))
    reward.save_pretrained(os.path.join(directory, REWARD_ADAPTER))


def save_checkpoints(workload: Workload, directory: str) -> None:
    """The same weights saved three ways for the load row (plain, by transformers-vhead, by TRL when installed), and
    a reward adapter for the plain one."""
    model = bare_model(workload)
    model.save_pretrained(os.path.join(directory, BARE))
    with_value_head(OURS, model).save_pretrained(os.path.join(directory, OURS))
    save_reward_adapter(workload, directory)
    try:
        trl_model = with_value_head(TRL, model)
    except ImportError:
        return
    trl_model.save_pretrained(os.path.join(directory, TRL))


def reward_scoring(implementation: str, batch: dict[str, torch.Tensor], checkpoints: str) -> Callable[[], object]:
    """Scores with the reward adapter next to a fresh LoRA policy. Bare: the backbone (no LM head) of a PeftModel
    with both adapters and the reward adapter active; ours: one score per sequence; TRL: its per-token scores, of
    which the last token's is picked."""
    base, reward = os.path.join(checkpoints, BARE), os.path.join(checkpoints, REWARD_ADAPTER)
    if implementation == BARE:
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base), lora("CAUSAL_LM"))
        peft_model.load_adapter(reward, REWARD_NAME, is_trainable=False)
        peft_model.set_adapter(REWARD_NAME)
        backbone = peft_model.eval().get_base_model().model
        return lambda: backbone(**batch, use_cache=False)
    model_class = AutoModelForCausalLMWithValueHead if implementation == OURS else trl_value_head_class()
    model = model_class.from_pretrained(base, peft_config=lora("CAUSAL_LM"), reward_adapter=reward).eval()
    if implementation == OURS:
        return lambda: model.compute_sequence_scores(**batch)
    return lambda: model.compute_reward_score(**batch)[:, -1]


def reference_maker(implementation: str, workload: Workload) -> tuple[torch.nn.Module, Callable[[], torch.nn.Module]]:
    """A value-head policy (TRL's for TRL) and the call that makes its reference: a full copy for bare, the lower half
    of the layers shared for ours and TRL."""
    policy = with_value_head(OURS if implementation == BARE else implementation, bare_model(workload))
    if implementation == BARE:
        return policy, lambda: create_reference_model(policy)
    create = create_reference_model if implementation == OURS else trl_create_reference_model()
    return policy, lambda: create(policy, num_shared_layers=workload.shared_layers)


def storages(model: torch.nn.Module) -> dict[int, int]:
    """The distinct storages behind a model's parameters and buffers: address -> bytes."""
    tensors = [*model.parameters(), *model.buffers()]
    return {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}


def kept_bytes(reference: torch.nn.Module, policy: torch.nn.Module) -> int:
    """What the reference keeps beyond the policy: its storages that are not the policy's."""
    own = storages(policy)
    return sum(size for address, size in storages(reference).items() if address not in own)


def unshared_bytes(policy: torch.nn.Module, num_shared_layers: int) -> int:
    """The bytes of the policy's parameters that a reference sharing `num_shared_layers` layers cannot share: all but
    the embeddings and the lower layers (so layers k and up, the final norm, the LM head and the value head)."""
    language_model = policy.pretrained_model
    shared = [language_model.get_input_embeddings(), *language_model.model.layers[:num_shared_layers]]
    excluded = {id(parameter) for module in shared for parameter in module.parameters()}
    return sum(parameter.nbytes for parameter in policy.parameters() if id(parameter) not in excluded)


def sizes(row: str, implementation: str, workload: Workload) -> dict[str, int]:
    """What a cell reports besides time and peak: for the reference memory row, the bytes its reference keeps beyond
    the policy and the policy's unshared part (the target's measure)."""
    if row != REFERENCE_MEMORY:
        return {}
    policy, make_reference = reference_maker(implementation, workload)
    return {
        "kept_bytes": kept_bytes(make_reference(), policy),
        "unshared_bytes": unshared_bytes(policy, workload.shared_layers),
    }


def policy_and_reference(implementation: str, workload: Workload, batch: dict) -> Callable[[], object]:
    """Ours: the one-pass forward_with_reference; bare and TRL: the policy's forward, then the reference's, as TRL's
    PPO ran them. Bare's policy and reference are ours (its reference shares the layers, but runs them again)."""
    policy, make_reference = reference_maker(OURS if implementation == BARE else implementation, workload)
    reference = make_reference()
    if implementation == OURS:
        return lambda: policy.forward_with_reference(reference, **batch)
    return lambda: (policy(**batch, use_cache=False), reference(**batch, use_cache=False))


def ddp_step(implementation: str, workload: Workload) -> Callable[[], None]:
    """One training step under DistributedDataParallel (in the process group `measure` joined): bare, the causal
    LM's loss; ours, the same LM loss plus the values' squared error to zero returns. Each rank has a batch of its own;
    the step's backward all-reduces the gradients. Gradients are on for the step: `measure` times under `no_grad`."""
    from torch.nn.parallel import DistributedDataParallel

    model = with_value_head(implementation, bare_model(workload)).train()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    batch = inputs(replace(workload, seed=workload.seed + torch.distributed.get_rank()))
    returns = torch.zeros(batch["input_ids"].shape)

    def step() -> None:
        with torch.enable_grad():
            output = ddp(**batch, labels=batch["input_ids"], use_cache=False)
            loss = output.loss
            if implementation == OURS:
                loss = loss + torch.nn.functional.mse_loss(output.value, returns)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def spread_batch(workload: Workload) -> dict[str, torch.Tensor]:
    """The packed row's batch: lengths spread evenly from 1/16 of `seq_len` (at least 2) to all of it, right padded
    with id 0."""
    batch = inputs(workload)
    lengths = torch.linspace(max(2, workload.seq_len // 16), workload.seq_len, workload.batch_size).round().long()
    mask = (torch.arange(workload.seq_len) < lengths[:, None]).long()
    return {"input_ids": batch["input_ids"] * mask, "attention_mask": mask}


def logprob_model(implementation: str, workload: Workload) -> torch.nn.Module:
    """The value-head model of a log-prob row: ours for the full-logits path (bare) too, TRL's for TRL."""
    return with_value_head(OURS if implementation == BARE else implementation, bare_model(workload))


def logprob_call(implementation: str, model: torch.nn.Module, entropy: bool) -> Callable[..., tuple]:
    """`(log-probs, values[, entropy])` of a batch, `(batch, seq - 1)` each (the values of the first `seq - 1`
    tokens, the ones whose next token is scored): bare, the full-logits path through our forward; ours,
    compute_logprobs; TRL, its forward and its own log-prob (and entropy) functions."""
    if implementation == OURS:

        def ours(input_ids, attention_mask) -> tuple:
            output = model.compute_logprobs(input_ids, attention_mask, return_entropy=entropy, return_values=True)
            return (output.logprobs, output.value[:, :-1]) + ((output.entropy,) if entropy else ())

        return ours
    if implementation == BARE:

        def bare(input_ids, attention_mask) -> tuple:
            output = model(input_ids, attention_mask=attention_mask, use_cache=False)
            logprobs = torch.log_softmax(output.logits[:, :-1].float(), dim=-1)  # the whole (batch, seq - 1, vocab)
            found = (logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1), output.value[:, :-1])
            return found + ((-(logprobs.exp() * logprobs).sum(-1),) if entropy else ())

        return bare
    selective_log_softmax, entropy_from_logits = trl_logprob_functions()

    def trl(input_ids, attention_mask) -> tuple:
        logits, _, values = model(input_ids, attention_mask=attention_mask, use_cache=False)
        logits = logits[:, :-1]
        found = (selective_log_softmax(logits, input_ids[:, 1:]), values[:, :-1])
        return found + ((entropy_from_logits(logits),) if entropy else ())

    return trl


def ppo_rollout(workload: Workload) -> dict[str, torch.Tensor]:
    """What a PPO step compares the new log-probs and values with, `(batch, seq - 1)`: the rollout's log-probs (near
    the untrained model's, -log(vocab)), advantages, values and returns; seeded."""
    generator = torch.Generator().manual_seed(workload.seed + 2)
    shape = (workload.batch_size, workload.seq_len - 1)
    noise = [torch.randn(shape, generator=generator) for _ in range(4)]
    return {
        "logprobs": -math.log(workload.vocab_size) + 0.1 * noise[0],
        "advantages": noise[1],
        "values": 0.1 * noise[2],
        "returns": noise[3],
    }


def ppo_loss(logprobs, values, entropy, rollout: dict[str, torch.Tensor]) -> torch.Tensor:
    """The clipped PPO loss of TRL's trainer (ratio clip 0.2, value clip 0.2, value coefficient 0.1) with an entropy
    bonus of 0.01."""
    ratio = torch.exp(logprobs - rollout["logprobs"])
    advantages = rollout["advantages"]
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
    old_values, returns = rollout["values"], rollout["returns"]
    clipped = old_values + (values - old_values).clamp(-0.2, 0.2)
    vf_loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2).mean()
    return pg_loss + 0.1 * vf_loss - 0.01 * entropy.mean()


def ppo_loss_maker(implementation: str, workload: Workload) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """A value-head model (TRL's for TRL; dropout off, as TRL's PPO trainer has it) and the call that computes its
    PPO loss on the row's batch, with the autograd graph (run it with gradients on)."""
    model = logprob_model(implementation, workload)
    compute, batch, rollout = logprob_call(implementation, model, entropy=True), inputs(workload), ppo_rollout(workload)
    return model, lambda: ppo_loss(*compute(**batch), rollout)


def ppo_backward(implementation: str, workload: Workload) -> Callable[[], None]:
    """Forward and backward of the PPO loss; the parameter gradients are set to None after the step, as an optimizer
    step's `zero_grad` does, so each step allocates them again (and the peak counts them)."""
    model, loss = ppo_loss_maker(implementation, workload)

    def step() -> None:
        with torch.enable_grad():
            loss().backward()
        model.zero_grad(set_to_none=True)

    return step


def packed_logprobs(implementation: str, workload: Workload) -> Callable[[], tuple]:
    """Log-probs and values of the spread batch: bare, compute_logprobs on the padded batch under sdpa; ours, packed,
    under our varlen attention (one causal sdpa per sequence), then unpacked to the padded layout (0 at the
    padding)."""
    model, batch = logprob_model(OURS, workload), spread_batch(workload)
    if implementation == BARE:
        return lambda: model.compute_logprobs(**batch, return_values=True)
    model.set_attn_implementation(VARLEN_ATTENTION)

    def packed() -> tuple:
        packed = pack_batch(**batch)
        output = model.compute_logprobs(**packed, return_values=True)
        return packed.unpack(output.logprobs, next_token=True), packed.unpack(output.value)

    return packed


def logprob_case(row: str, implementation: str, workload: Workload) -> Callable[[], object]:
    """The call of a log-prob row ([`rows.LOGPROB_ROWS`])."""
    if row == PPO_BACKWARD:
        return ppo_backward(implementation, workload)
    if row == PACKED:
        return packed_logprobs(implementation, workload)
    compute, batch = logprob_call(implementation, logprob_model(implementation, workload), False), inputs(workload)
    return lambda: compute(**batch)


def build(row: str, implementation: str, workload: Workload, checkpoints: str) -> Callable[[], object]:
    """The call to time for one cell of the table."""
    if row == DDP_STEP:
        return ddp_step(implementation, workload)
    if row in LOGPROB_ROWS:
        return logprob_case(row, implementation, workload)
    batch = inputs(workload)
    if row == "load":
        if implementation == TRL:
            trl_class = trl_value_head_class()
            return lambda: trl_class.from_pretrained(os.path.join(checkpoints, TRL))
        # AutoModelForCausalLM picks our class from the saved config: the path users take.
        return lambda: AutoModelForCausalLM.from_pretrained(os.path.join(checkpoints, implementation))
    if row == "reward score":
        return reward_scoring(implementation, batch, checkpoints)
    if row == REFERENCE_MEMORY:
        return reference_maker(implementation, workload)[1]
    if row == POLICY_AND_REFERENCE:
        return policy_and_reference(implementation, workload, batch)

    dtype = torch.bfloat16 if row.startswith("bf16") else torch.float32
    head_settings = {"upcast_logits": False} if row == BF16_NO_UPCAST and implementation == OURS else {}
    model = with_value_head(implementation, bare_model(workload, dtype), **head_settings)
    if row == "value-only":
        if implementation == BARE:
            return lambda: model.base_model(**batch, use_cache=False)
        if implementation == OURS:
            return lambda: model.compute_values(**batch)
    if row == "generate":
        n = workload.new_tokens
        return lambda: model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return lambda: model(**batch, use_cache=False)
