"""Reward adapters (a LoRA plus a `score` head next to the policy's adapter) and sequence scores."""

import json
import threading

import pytest
import torch
from conftest import model_inputs, policy_lora, save_reward_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead.heads import ScoreHead


def reward_policy(llama_dir, reward_adapter_dir, **kwargs):
    return AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(), reward_adapter=reward_adapter_dir, **kwargs
    )


@pytest.fixture
def model(llama_dir, reward_adapter_dir):
    return reward_policy(llama_dir, reward_adapter_dir)


@pytest.fixture
def reward_model(llama_dir, reward_adapter_dir):
    """The reward model as peft and transformers load it: sequence classification with the reward adapter."""
    return PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1), reward_adapter_dir
    ).eval()


def test_reward_adapter_is_loaded_frozen_next_to_the_policy(model):
    assert isinstance(model.score, ScoreHead) and model.score.weight.dtype == torch.float32
    assert model.supports_rm_adapter and model.rm_adapter_name == "reward_adapter"
    assert sorted(model.pretrained_model.peft_config) == ["default", "reward_adapter"]
    assert model.active_adapters() == ["default"]
    reward_parameters = [p for name, p in model.named_parameters() if "reward_adapter" in name or "score" in name]
    assert reward_parameters and not any(parameter.requires_grad for parameter in reward_parameters)


def test_sequence_scores_equal_the_sequence_classification_model(model, reward_model):
    """Unpadded rows: transformers' `*ForSequenceClassification` reads the last token, as we do."""
    input_ids = model_inputs("llama", batch=3)["input_ids"]
    with torch.no_grad():
        expected = torch.cat([reward_model(input_ids=row[None]).logits for row in input_ids]).squeeze(-1)
    scores = model.compute_sequence_scores(input_ids)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)


def test_compute_reward_score_equals_trl(trl_ppo, llama_dir, reward_adapter_dir, model):
    inputs = model_inputs("llama")
    torch.manual_seed(0)
    trl_model = trl_ppo.AutoModelForCausalLMWithValueHead.from_pretrained(
        str(llama_dir), peft_config=policy_lora(), reward_adapter=str(reward_adapter_dir)
    )
    expected = trl_model.compute_reward_score(**inputs)
    scores = model.compute_reward_score(**inputs)
    assert scores.shape == (2, 7, 1)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)


def test_sequence_scores_do_not_depend_on_padding_side_or_pad_equal_to_eos(model):
    """The mask decides which token is last: eos inside the text and as the pad token are both handled."""
    eos = 2
    rows = [torch.tensor([5, 9, eos, 7, 11, eos]), torch.tensor([4, 8, 13, eos]), torch.tensor([6, 3, eos])]
    alone = torch.stack([model.compute_sequence_scores(row[None])[0] for row in rows])
    length = max(len(row) for row in rows)
    for side in ("left", "right"):
        input_ids = torch.full((len(rows), length), eos)
        attention_mask = torch.zeros_like(input_ids)
        for index, row in enumerate(rows):
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            input_ids[index, span], attention_mask[index, span] = row, 1
        batched = model.compute_sequence_scores(input_ids, attention_mask)
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5, msg=f"{side} padding")


def test_scoring_never_runs_the_lm_head(model):
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    try:
        model.compute_sequence_scores(**model_inputs("llama"))
        model.compute_reward_score(**model_inputs("llama"))
    finally:
        handle.remove()
    assert calls == []


def grad_flags(model) -> dict[str, bool]:
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


def test_scoring_puts_back_the_adapter_the_modes_and_requires_grad(model):
    model.train()
    model.v_head.eval()  # a mix of modes must come back as it was, not as one `train()`
    before = grad_flags(model)
    model.compute_sequence_scores(**model_inputs("llama"))
    model.compute_reward_score(**model_inputs("llama"))
    assert model.training and not model.v_head.training and model.pretrained_model.training
    assert model.active_adapters() == ["default"] and grad_flags(model) == before


def test_scoring_puts_everything_back_when_the_call_raises(model):
    model.train()
    before = grad_flags(model)
    with pytest.raises(IndexError):  # token ids beyond the vocabulary fail inside the embedding
        model.compute_sequence_scores(torch.full((2, 5), 10_000))
    assert model.training and model.active_adapters() == ["default"] and grad_flags(model) == before
    # and the policy still computes with its own adapter
    model.eval()
    expected = model(**model_inputs("llama")).logits
    with model.pretrained_model.disable_adapter():
        assert not torch.equal(model(**model_inputs("llama")).logits, expected)


def test_two_threads_scoring_at_once_get_correct_scores(model):
    """Reward scoring switches adapters on the shared model; a lock keeps one thread's switch from the other's
    forward. Each thread also runs the policy after its scores, unguarded by the test, so a switch leaking into it
    or a missing restore would show in its values."""
    batches = [model_inputs("llama", batch=2, length=9, seed=seed) for seed in range(2)]
    expected_scores = [model.compute_sequence_scores(**batch) for batch in batches]
    model.eval()
    expected_values = [model.compute_values(**batch) for batch in batches]
    errors, barrier = [], threading.Barrier(2)

    def work(index):
        barrier.wait()
        for _ in range(15):
            scores = model.compute_sequence_scores(**batches[index])
            if not torch.allclose(scores, expected_scores[index], rtol=0, atol=1e-6):
                errors.append(f"thread {index}: scores {scores} != {expected_scores[index]}")
        values = model.compute_values(**batches[index])  # the policy forward holds the lock shared by itself
        if not torch.allclose(values, expected_values[index], rtol=0, atol=1e-6):
            errors.append(f"thread {index}: policy values changed")

    threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_token_scores_and_normalisation_stored_with_the_reward_adapter(llama_dir, reward_adapter_dir):
    (reward_adapter_dir / "config.json").write_text(json.dumps({"mean": 0.25, "std": 2.0}))  # OpenRLHF's keys
    model = reward_policy(llama_dir, reward_adapter_dir)
    inputs = model_inputs("llama")
    raw, token_scores = model.compute_sequence_scores(**inputs, return_token_scores=True)
    assert token_scores.shape == (2, 7)
    torch.testing.assert_close(raw, token_scores[:, -1], rtol=0, atol=1e-6)
    normalised = model.compute_sequence_scores(**inputs, normalize=True)
    torch.testing.assert_close(normalised, (raw - 0.25) / 2.0, rtol=0, atol=1e-6)


def test_value_head_scores_without_a_reward_adapter(llama_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, score_mean=1.0, score_std=4.0).eval()
    input_ids = model_inputs("llama")["input_ids"]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0  # right padding: positions are unchanged, so the values at the kept tokens are too
    values = model.compute_values(input_ids, attention_mask=attention_mask)
    expected = torch.stack([values[0, -4], values[1, -1]])
    scores = model.compute_sequence_scores(input_ids, attention_mask)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    normalised = model.compute_sequence_scores(input_ids, attention_mask, normalize=True)
    torch.testing.assert_close(normalised, (expected - 1.0) / 4.0, rtol=0, atol=1e-6)


def test_normalize_without_stored_statistics_is_an_error(model):
    with pytest.raises(ValueError, match="mean and std"):
        model.compute_sequence_scores(**model_inputs("llama"), normalize=True)


def test_a_multi_label_reward_head_scores_every_label(llama_dir, tmp_path):
    adapter = save_reward_adapter(llama_dir, tmp_path / "two-labels", num_labels=2)
    model = reward_policy(llama_dir, adapter)
    assert model.compute_sequence_scores(**model_inputs("llama")).shape == (2, 2)
    assert model.compute_reward_score(**model_inputs("llama")).shape == (2, 7, 2)


def test_score_bias_is_read_from_the_score_keys_only(tmp_path):
    """TRL built the score Linear with a bias whenever *any* key had `bias` in it (e.g. LoRA `bias="all"`), then
    failed to load the bias-free score head."""
    from architectures import tiny_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gpt2")).save_pretrained(tmp_path / "gpt2")
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "gpt2", num_labels=1)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn"], bias="all", init_lora_weights=False)
    get_peft_model(reward, lora).save_pretrained(tmp_path / "reward")
    policy_config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"])
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        tmp_path / "gpt2", peft_config=policy_config, reward_adapter=tmp_path / "reward"
    )
    assert model.score.bias is None
    assert model.compute_sequence_scores(**model_inputs("gpt2")).shape == (2,)


def test_add_and_load_reward_modeling_adapter_keeps_trls_signature(llama_dir, reward_adapter_dir):
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), policy_lora())
    head = AutoModelForCausalLMWithValueHead.add_and_load_reward_modeling_adapter(
        peft_model, str(reward_adapter_dir), "rm"
    )
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (1, 32)
    model = AutoModelForCausalLMWithValueHead(
        peft_model, score_module=head, supports_rm_adapter=True, rm_adapter_name="rm"
    )
    assert model.compute_sequence_scores(**model_inputs("llama")).shape == (2,)
