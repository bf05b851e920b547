"""Bad PEFT and reward-adapter input gets a clear error, and leaves the model as it was."""

import json

import pytest
import torch
from architectures import tiny_config
from conftest import model_inputs, policy_lora, save_reward_adapter
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead.errors import (
    AdapterMismatchError,
    AdapterNotFoundError,
    EmptySequenceError,
    MissingScoreHeadError,
    PeftConfigError,
    RewardAdapterError,
    TransformersVheadError,
)


@pytest.fixture
def policy(llama_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())


def test_reward_adapter_on_a_model_without_peft(llama_dir, reward_adapter_dir):
    with pytest.raises(RewardAdapterError, match="needs a PEFT policy"):
        AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, reward_adapter=reward_adapter_dir)
    assert issubclass(RewardAdapterError, ValueError)  # what TRL raised


def test_reward_adapter_that_is_not_a_path(llama_dir):
    with pytest.raises(RewardAdapterError, match="local path or a hub id"):
        AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora(), reward_adapter=3)


def test_reward_adapter_path_without_adapter_files(llama_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterNotFoundError, match="holds no PEFT adapter"):
        AutoModelForCausalLMWithValueHead.from_pretrained(
            llama_dir, peft_config=policy_lora(), reward_adapter=tmp_path / "empty"
        )
    assert issubclass(AdapterNotFoundError, FileNotFoundError)


def test_reward_adapter_path_that_does_not_exist(llama_dir, tmp_path):
    with pytest.raises(AdapterNotFoundError, match="missing holds no PEFT adapter"):
        AutoModelForCausalLMWithValueHead.from_pretrained(
            llama_dir, peft_config=policy_lora(), reward_adapter=tmp_path / "missing"
        )


def test_adapter_config_without_weights_is_named(llama_dir, reward_adapter_dir):
    (reward_adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterNotFoundError, match="no adapter weights"):
        AutoModelForCausalLMWithValueHead.from_pretrained(
            llama_dir, peft_config=policy_lora(), reward_adapter=reward_adapter_dir
        )


def test_reward_adapter_for_another_base_model_leaves_the_policy_untouched(policy, tmp_path):
    other_config = tiny_config("llama")
    other_config.hidden_size, other_config.head_dim = 64, 16
    AutoModelForCausalLM.from_config(other_config).save_pretrained(tmp_path / "wider")
    other = save_reward_adapter(tmp_path / "wider", tmp_path / "wider-reward")
    with pytest.raises(AdapterMismatchError, match="64 wide|another base model"):
        policy._attach_reward_adapter(other, "reward_adapter", {})
    assert list(policy.pretrained_model.peft_config) == ["default"] and not policy.supports_rm_adapter


def test_lora_matrices_for_another_base_model_are_named(policy, llama_dir, tmp_path):
    """The score head fits (same hidden size) but the LoRA matrices do not (another intermediate size)."""
    other_config = tiny_config("llama")
    other_config.num_key_value_heads = 1  # v_proj's output shrinks
    AutoModelForCausalLM.from_config(other_config).save_pretrained(tmp_path / "other")
    other = save_reward_adapter(tmp_path / "other", tmp_path / "other-reward")
    with pytest.raises(AdapterMismatchError, match=r"v_proj.lora_B.weight of shape"):
        policy._attach_reward_adapter(other, "reward_adapter", {})
    assert list(policy.pretrained_model.peft_config) == ["default"]


def test_reward_adapter_without_a_score_head(policy, llama_dir, tmp_path):
    get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), policy_lora()).save_pretrained(tmp_path / "lm")
    with pytest.raises(MissingScoreHeadError, match=r"adapter_model.safetensors holds no `score` head.*lora_A"):
        policy._attach_reward_adapter(tmp_path / "lm", "reward_adapter", {})
    assert list(policy.pretrained_model.peft_config) == ["default"]


@pytest.mark.parametrize("peft_config", [{"r": 4}, "lora", object()])
def test_peft_config_that_is_not_one(llama_dir, peft_config):
    with pytest.raises(PeftConfigError, match="must be a peft.PeftConfig"):
        AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=peft_config)
    assert issubclass(PeftConfigError, ValueError)  # what TRL raised


@pytest.mark.parametrize(
    "prompt_config",
    [
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ],
)
def test_prompt_learning_is_refused_with_the_reason(llama_dir, prompt_config):
    with pytest.raises(PeftConfigError, match="virtual tokens"):
        AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=prompt_config)
    prompt_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), prompt_config)
    with pytest.raises(PeftConfigError, match="virtual tokens"):
        AutoModelForCausalLMWithValueHead.from_pretrained(prompt_model)


def test_adapters_loaded_in_place_by_transformers_are_refused_when_wrapping(llama_dir, tmp_path):
    get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), policy_lora()).save_pretrained(tmp_path / "lora")
    bare = AutoModelForCausalLM.from_pretrained(llama_dir)
    bare.load_adapter(tmp_path / "lora")
    with pytest.raises(PeftConfigError, match="call `load_adapter` / `add_adapter` on the value-head model"):
        AutoModelForCausalLMWithValueHead(bare)


def test_an_all_zero_attention_mask_row_is_an_error_not_a_garbage_score(llama_dir, reward_adapter_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(), reward_adapter=reward_adapter_dir
    )
    inputs = model_inputs("llama", batch=3)
    inputs["attention_mask"][1] = 0
    with pytest.raises(EmptySequenceError, match=r"Row\(s\) \[1\]"):
        model.compute_sequence_scores(**inputs)
    assert model.active_adapters() == ["default"]


def test_reward_score_of_a_model_without_a_reward_adapter(policy):
    with pytest.raises(RewardAdapterError, match="no reward adapter"):
        policy.compute_reward_score(torch.tensor([[5, 6]]))


def test_adapter_that_names_no_base_model(tmp_path, policy):
    policy.save_pretrained(tmp_path / "policy")
    config_file = tmp_path / "policy" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(TypeError, match="names no base model"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy")


def test_every_adapter_error_is_a_transformers_vhead_error():
    errors = (
        PeftConfigError,
        AdapterNotFoundError,
        AdapterMismatchError,
        RewardAdapterError,
        MissingScoreHeadError,
        EmptySequenceError,
    )
    assert all(issubclass(error, TransformersVheadError) for error in errors)
