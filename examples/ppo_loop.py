"""A small, self-contained PPO loop with transformers-vhead, on a tiny Llama built from a config (CPU, seconds).

The policy learns to say "good": the reward is 1 for a response that contains "good", else 0. Each step samples
responses from fixed prompts, scores them, and runs a few epochs of clipped PPO updates on the policy and its value
head (TRL's PPO losses), with a per-token KL penalty against a frozen reference that shares the policy's lower layers.

    python examples/ppo_loop.py --steps 20 --seed 0 [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import transformers_vhead  # noqa: F401  (registers the value-head classes with AutoModelForCausalLM)
from transformers_vhead import AutoModelForCausalLMWithValueHead, create_reference_model
from transformers_vhead.demo import tiny_llama_config, tiny_tokenizer

PROMPTS = [
    "the critic says", "this answer is", "the policy learns", "a reward model gives",
    "the text was", "it is", "the value head scores", "so the model is",
]  # fmt: skip
TARGET_WORD = "good"


@dataclass
class PPOSettings:
    response_length: int = 8
    num_shared_layers: int = 1  # the reference shares the embeddings and layer 0 with the policy (both frozen)
    learning_rate: float = 3e-3
    ppo_epochs: int = 4  # passes over each batch of rollouts
    num_minibatches: int = 2
    kl_coef: float = 0.1  # weight of the per-token KL penalty against the reference
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clipping
    cliprange_value: float = 0.2  # value clipping, around the values of the rollout
    vf_coef: float = 0.1


@dataclass
class PPORun:
    model: AutoModelForCausalLMWithValueHead
    ref_model: AutoModelForCausalLMWithValueHead
    metrics: list[dict[str, float]]


def build_policy(directory: Path, seed: int) -> AutoModelForCausalLMWithValueHead:
    """A tiny random Llama with a fresh value head, saved to `directory` and loaded back as a user would load it."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = tiny_llama_config(tokenizer, hidden_size=32)
    # No dropout in the head: the values PPO trains must be the ones the rollout computed. The "normal" init (TRL's)
    # starts the critic visibly wrong, so its loss falling over the first steps shows it learning.
    model = AutoModelForCausalLMWithValueHead(
        LlamaForCausalLM(config), summary_dropout_prob=0.0, v_head_init_strategy="normal"
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory)  # -> AutoModelForCausalLMWithValueHead, head included


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t] | logits[:, t]), in fp32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens (rewards and values are 0 past each response's
    end, so nothing flows back from padding). Returns (advantages, returns)."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


@torch.no_grad()
def rollout(model, ref_model, prompts: dict[str, torch.Tensor], settings: PPOSettings, eos_id: int, target_id: int):
    """Samples responses and computes everything PPO needs from them, with the policy and reference frozen."""
    model.eval()
    prompt_length = prompts["input_ids"].shape[1]
    # Plain sampling (no top-k / top-p): the tokens must come from the distribution whose log-probs we train.
    sequences = model.generate(
        **prompts, max_new_tokens=settings.response_length, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
        pad_token_id=0, eos_token_id=eos_id,
    )  # fmt: skip
    responses = sequences[:, prompt_length:]
    # A response ends at its first EOS (kept, it is an action); what generate appends after it is padding.
    is_eos = responses == eos_id
    mask = ((is_eos.cumsum(1) - is_eos.long()) == 0).float()
    attention_mask = torch.cat([prompts["attention_mask"], mask.long()], dim=1)
    # Left-padded prompts: positions count attended tokens only, as generate counted them (Llama's rotary positions
    # would not mind the offset, but models with absolute positions, such as GPT-2, would score other log-probs).
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)

    # The policy's and the reference's log-probs and the policy's values in one call: the shared layers run once.
    output = model.forward_with_reference(
        ref_model, sequences, attention_mask=attention_mask, position_ids=position_ids, return_logprobs=True
    )
    # Entry t of the log-probs scores token t + 1: the response starts at prompt_length - 1.
    logprobs = output.logprobs[:, prompt_length - 1 :]
    ref_logprobs = output.ref_logprobs[:, prompt_length - 1 :]
    values = output.value[:, prompt_length - 1 : -1] * mask  # the value of the state each response token is chosen in

    scores = ((responses == target_id).float() * mask).amax(1)  # the rule-based reward: 1 if it says the target
    kl = (logprobs - ref_logprobs) * mask
    rewards = -settings.kl_coef * kl  # per-token KL penalty ...
    last_token = mask.sum(1).long() - 1
    rewards[torch.arange(len(rewards)), last_token] += scores  # ... and the score on each response's last token
    advantages, returns = gae(rewards, values, settings.gamma, settings.lam)
    return {
        "sequences": sequences, "attention_mask": attention_mask, "position_ids": position_ids, "mask": mask,
        "logprobs": logprobs, "values": values, "advantages": whiten(advantages, mask) * mask, "returns": returns,
        "scores": scores, "kl": kl.sum(1),
    }  # fmt: skip


def ppo_update(model, optimizer, batch: dict[str, torch.Tensor], settings: PPOSettings) -> dict[str, float]:
    """A few epochs of clipped PPO on one batch of rollouts; returns the mean policy and value losses."""
    model.train()
    prompt_length = batch["sequences"].shape[1] - batch["mask"].shape[1]
    pg_losses, vf_losses = [], []
    for _ in range(settings.ppo_epochs):
        for index in torch.randperm(len(batch["sequences"])).chunk(settings.num_minibatches):
            sequences, old_logprobs, old_values = (batch[k][index] for k in ("sequences", "logprobs", "values"))
            advantages, returns, mask = (batch[k][index] for k in ("advantages", "returns", "mask"))
            output = model(
                sequences, attention_mask=batch["attention_mask"][index], position_ids=batch["position_ids"][index]
            )
            logprobs = token_logprobs(output.logits[:, prompt_length - 1 : -1], sequences[:, prompt_length:])
            values = output.value[:, prompt_length - 1 : -1]

            # Clipped value loss (TRL): no gain from moving the values more than cliprange_value from the rollout's.
            clipped_values = old_values + (values - old_values).clamp(
                -settings.cliprange_value, settings.cliprange_value
            )
            vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
            # Clipped policy loss: no gain from moving the ratio new / old beyond 1 +- cliprange.
            ratio = torch.exp(logprobs - old_logprobs)
            clipped_ratio = ratio.clamp(1 - settings.cliprange, 1 + settings.cliprange)
            pg_loss = masked_mean(torch.max(-advantages * ratio, -advantages * clipped_ratio), mask)

            optimizer.zero_grad()
            (pg_loss + settings.vf_coef * vf_loss).backward()
            optimizer.step()
            pg_losses.append(pg_loss.item())
            vf_losses.append(vf_loss.item())
    return {"policy_loss": sum(pg_losses) / len(pg_losses), "value_loss": sum(vf_losses) / len(vf_losses)}


def run_ppo(steps: int = 20, seed: int = 0, output_dir: str | Path | None = None, settings: PPOSettings | None = None):
    """Builds the policy and its reference and trains for `steps` PPO steps. With `output_dir`, the initial model is
    saved to `output_dir/initial` and the trained one to `output_dir/policy`. Returns a [`PPORun`]."""
    settings = settings or PPOSettings()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(output_dir) if output_dir is not None else Path(scratch)
        model = build_policy(root / "initial", seed)
        tokenizer = tiny_tokenizer()
        # Frozen copy for the KL penalty. The shared part is the policy's own tensors, frozen in the policy too,
        # so it costs no memory and forward_with_reference computes it once for both models.
        ref_model = create_reference_model(model, num_shared_layers=settings.num_shared_layers)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
        tokenizer.padding_side = "left"  # generate appends to the right end of each prompt
        prompts = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        eos_id, target_id = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(TARGET_WORD)

        metrics = []
        for step in range(steps):
            batch = rollout(model, ref_model, prompts, settings, eos_id, target_id)
            losses = ppo_update(model, optimizer, batch, settings)
            metrics.append(
                {"step": step, "reward": batch["scores"].mean().item(), "kl": batch["kl"].mean().item(), **losses}
            )
            print(
                f"step {step:3d}  reward {metrics[-1]['reward']:6.3f}  kl {metrics[-1]['kl']:7.4f}  "
                f"policy loss {losses['policy_loss']:8.4f}  value loss {losses['value_loss']:7.4f}"
            )
        if steps:
            print(f"sample: {tokenizer.decode(batch['sequences'][0], skip_special_tokens=True)!r}")
        if output_dir is not None:  # reload it with AutoModelForCausalLM.from_pretrained(output_dir / "policy")
            model.save_pretrained(root / "policy")
            tokenizer.save_pretrained(root / "policy")
    return PPORun(model, ref_model, metrics)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where to save the initial and trained policy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tensors this small run faster on one thread than split across several
    transformers.utils.logging.disable_progress_bar()  # no bars for saving and loading a 100 kB model
    return run_ppo(args.steps, args.seed, args.output_dir).metrics


if __name__ == "__main__":
    main()
