"""The critic protocol of RL code written for transformers' classifiers: `getattr(model, model.base_model_prefix)`
called with `output_hidden_states=True`, then `model.score(hidden_states[-1])` (TRL's `PPOTrainer` and `get_reward`,
verl, OpenRLHF). Our model serves as it is, with the numbers of `compute_values` / `compute_sequence_scores`."""

from __future__ import annotations

import pytest
import torch
from architectures import CAUSAL_FAMILIES
from conftest import build_bare, model_inputs, policy_lora

from transformers_vhead import AutoModelForCausalLMWithValueHead, create_reference_model
from transformers_vhead.heads import ScoreHead

PAD = 0


def protocol_values(model, **inputs) -> torch.Tensor:
    """What a caller of the protocol computes: the backbone, then `score` on the last hidden state."""
    output = getattr(model, model.base_model_prefix)(**inputs, return_dict=True, output_hidden_states=True)
    return model.score(output.hidden_states[-1]).squeeze(-1)


def critic(family: str = "llama", seed: int = 0) -> AutoModelForCausalLMWithValueHead:
    return AutoModelForCausalLMWithValueHead.from_pretrained(
        build_bare(family, seed=seed), v_head_init_strategy="normal"
    ).eval()


@pytest.mark.parametrize("family", sorted(CAUSAL_FAMILIES))
@torch.no_grad()
def test_the_protocol_gives_the_values_of_compute_values(family):
    model = critic(family)
    inputs = model_inputs(family)
    assert model.score is model.v_head
    assert torch.equal(protocol_values(model, **inputs), model.compute_values(**inputs))


def test_score_is_a_view_of_the_value_head_not_a_second_module(tmp_path):
    model = critic()
    assert not any("score" in key for key in model.state_dict())
    assert "score" not in dict(model.named_modules())
    model.save_pretrained(tmp_path / "critic")
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "critic")
    assert reloaded.score is reloaded.v_head and torch.equal(reloaded.score.summary.weight, model.v_head.summary.weight)


def test_score_is_the_reward_adapters_head_when_there_is_one(llama_dir, reward_adapter_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(), reward_adapter=reward_adapter_dir
    )
    assert isinstance(model.score, ScoreHead)  # TRL's attribute, as before
    assert model.score is model._modules["score"] and model.score is not model.v_head


@torch.no_grad()
def test_trl_get_reward_reads_the_numbers_of_compute_sequence_scores(trl_ppo):
    from trl.experimental.utils import get_reward

    model = critic()
    context_length = 4
    # left-padded queries, responses padded on the right: what PPOTrainer scores
    query_responses = torch.tensor(
        [
            [PAD, PAD, 5, 6, 7, 8, 9, PAD, PAD],
            [10, 11, 12, 13, 14, 15, 16, 17, 18],
            [PAD, 20, 21, 22, 23, PAD, PAD, PAD, PAD],
        ]
    )
    token_values, rewards, lengths = get_reward(model, query_responses, PAD, context_length)

    attention_mask = (query_responses != PAD).long()
    assert lengths.tolist() == [6, 8, 4]  # the last response token of each row
    scores = model.compute_sequence_scores(query_responses, attention_mask)
    torch.testing.assert_close(rewards, scores, rtol=0, atol=1e-6)
    position_ids = attention_mask.cumsum(1) - attention_mask  # get_reward's positions, given to ours
    values = model.compute_values(query_responses, attention_mask=attention_mask, position_ids=position_ids)
    attended = attention_mask.bool()
    torch.testing.assert_close(token_values.squeeze(-1)[attended], values[attended], rtol=0, atol=1e-6)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def _changed(before: dict[str, torch.Tensor], model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not torch.equal(before[name], parameter)}


def test_trl_ppo_trainer_trains_with_ours_as_policy_reference_value_and_reward_model(trl_ppo, tmp_path):
    """Two PPO steps of TRL 1.12's trainer, every model ours: the policy's own layers and the critic train; the layers
    it shares with the reference, the reference and the reward model stay as they were."""
    from datasets import Dataset

    from transformers_vhead.demo import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    policy = critic(seed=0).train()
    reference = create_reference_model(policy, num_shared_layers=1)
    value_model = critic(seed=1).train()
    reward_model = critic(seed=2)
    trainer_args = trl_ppo.PPOConfig(
        output_dir=str(tmp_path / "ppo"),
        per_device_train_batch_size=4,
        num_mini_batches=1,
        total_episodes=8,  # 2 steps of 4 episodes
        num_ppo_epochs=1,
        response_length=6,
        num_sample_generations=0,
        learning_rate=1e-2,
        stop_token="eos",
        missing_eos_penalty=1.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    prompts = [[4 + (3 * row + column) % 30 for column in range(3 + row % 2)] for row in range(8)]
    trainer = trl_ppo.PPOTrainer(
        args=trainer_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=Dataset.from_dict({"input_ids": prompts}),
    )
    before = {name: _snapshot(model) for name, model in trainer_models(trainer).items()}
    trainer.train()

    assert trainer.state.global_step == 2
    changed = {name: _changed(before[name], model) for name, model in trainer_models(trainer).items()}
    shared = set(reference.shared_trunk.parameters)
    assert "pretrained_model.model.layers.0.mlp.up_proj.weight" in shared
    trained = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    assert trained and not shared & trained  # the shared layers are frozen in the policy too
    assert changed["policy"] and changed["policy"] <= trained  # the policy's own layers train, nothing else
    assert changed["policy"] - {n for n in trained if n.startswith("v_head.")}  # its LM, not only its (unused) head
    assert any(name.startswith("v_head.") for name in changed["value"])  # the critic's head learns
    assert changed["reference"] == set() and changed["reward"] == set()
    for name in shared:  # still the policy's memory
        assert reference.get_parameter(name).data_ptr() == policy.get_parameter(name).data_ptr()


def trainer_models(trainer) -> dict[str, torch.nn.Module]:
    return {
        "policy": trainer.policy_model,
        "reference": trainer.ref_model,
        "value": trainer.value_model,
        "reward": trainer.reward_model,
    }
