"""PEFT policies: `peft_config`, `PeftModel` instances, adapter directories (ours and TRL's), transformers' adapter API,
and the value head saved and reloaded with the adapter."""

import json

import pytest
import torch
from conftest import build_bare, model_inputs, policy_lora, populate_hub_cache
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.utils import logging

from transformers_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead


def lora_parameters(model) -> dict[str, torch.Tensor]:
    return {name: parameter for name, parameter in model.named_parameters() if "lora_" in name}


def train_a_step(model, inputs) -> None:
    """One SGD step on the LM loss plus the mean value, so both the adapter and the head change."""
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    output = model(**inputs, labels=inputs["input_ids"])
    (output.loss + output.value.pow(2).mean()).backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


@pytest.fixture
def policy(llama_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora()).eval()


def test_peft_config_makes_a_trainable_lora_policy_with_a_trainable_head(policy):
    assert isinstance(policy.pretrained_model, PeftModelForCausalLM) and policy.is_peft_model
    assert policy.active_adapters() == ["default"]
    trainable = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    assert trainable == set(lora_parameters(policy)) | {"v_head.summary.weight", "v_head.summary.bias"}
    assert len(lora_parameters(policy)) == 8  # q_proj and v_proj, A and B, in both layers


def test_saved_policy_adapter_is_an_ordinary_adapter_of_the_base_model(policy, llama_dir, tmp_path):
    inputs = model_inputs("llama")
    policy.save_pretrained(tmp_path / "policy")
    assert sorted(path.name for path in (tmp_path / "policy").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "generation_config.json",
        "value_head.safetensors",
    ]
    adapter_config = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(llama_dir)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "policy").eval()
    with torch.no_grad():
        expected = plain(**inputs).logits
    assert torch.equal(policy(**inputs).logits, expected)


def test_value_head_trains_and_reloads_with_the_adapter(policy, tmp_path):
    """TRL #1650 / #2707: a reloaded PEFT policy used to come back with a random value head."""
    inputs = model_inputs("llama")
    fresh_head = policy.v_head.summary.weight.detach().clone()
    train_a_step(policy, inputs)
    assert not torch.equal(policy.v_head.summary.weight, fresh_head)
    policy.save_pretrained(tmp_path / "policy")

    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy").eval()
    assert reloaded.v_head_source.file == str(tmp_path / "policy" / "value_head.safetensors")
    for name, tensor in policy.v_head.state_dict().items():
        assert torch.equal(reloaded.v_head.state_dict()[name], tensor)
    trained = lora_parameters(policy)
    assert {name: tensor for name, tensor in lora_parameters(reloaded).items()}.keys() == trained.keys()
    assert all(torch.equal(tensor, trained[name]) for name, tensor in lora_parameters(reloaded).items())
    expected, got = policy(**inputs), reloaded(**inputs)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.value, expected.value)

    # the auto class finds the same model: the directory's config.json is ours
    through_auto = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    assert type(through_auto) is AutoModelForCausalLMWithValueHead and through_auto.is_peft_model
    assert torch.equal(through_auto(**inputs).value, got.value)


def test_a_reloaded_adapter_is_frozen_unless_is_trainable(policy, tmp_path):
    policy.save_pretrained(tmp_path / "policy")
    frozen = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy")
    assert not any(parameter.requires_grad for parameter in lora_parameters(frozen).values())
    assert frozen.v_head.summary.weight.requires_grad  # TRL: the head always trains
    trainable = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy", is_trainable=True)
    assert all(parameter.requires_grad for parameter in lora_parameters(trainable).values())


def test_the_policy_generation_config_comes_back_with_the_adapter(policy, llama_dir, tmp_path):
    """`save_pretrained` writes the policy's generation config beside its adapter; the reload uses it, not the base
    model's."""
    base_tokens = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir).generation_config.max_new_tokens
    policy.generation_config.max_new_tokens = 9
    policy.save_pretrained(tmp_path / "policy")
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy")
    assert base_tokens != 9 and reloaded.generation_config.max_new_tokens == 9
    assert reloaded.generation_config.to_dict() == policy.generation_config.to_dict()
    input_ids = model_inputs("llama")["input_ids"][:1]
    generated = reloaded.generate(input_ids=input_ids, do_sample=False)
    assert generated.shape[1] == input_ids.shape[1] + 9  # the reloaded setting is the one generate uses
    assert torch.equal(generated, policy.generate(input_ids=input_ids, do_sample=False))


def test_head_settings_come_back_with_the_adapter(llama_dir, tmp_path):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(), upcast_logits=False, summary_dropout_prob=0.0, score_mean=1.5
    )
    policy.save_pretrained(tmp_path / "policy")
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy")
    assert (reloaded.config.upcast_logits, reloaded.config.summary_dropout_prob) == (False, 0.0)
    assert reloaded.config.score_mean == 1.5


def test_a_peft_model_instance_is_wrapped_as_it_is(llama_dir):
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), policy_lora()).eval()
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model).eval()
    assert model.pretrained_model is peft_model
    assert torch.equal(model(**inputs).logits, expected.float())


def test_peft_config_is_ignored_with_a_warning_when_the_source_holds_an_adapter(policy, tmp_path, caplog):
    policy.save_pretrained(tmp_path / "policy")
    logging.enable_propagation()
    try:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy", peft_config=policy_lora(r=2))
    finally:
        logging.disable_propagation()
    assert "peft_config is ignored" in caplog.text
    assert model.pretrained_model.peft_config["default"].r == 4


def test_trl_peft_checkpoint_loads_exactly(trl_ppo, llama_dir, tmp_path):
    """TRL's PEFT layout: the adapter files plus a `pytorch_model.bin` holding only `v_head.*`."""
    torch.manual_seed(3)
    trl_model = trl_ppo.AutoModelForCausalLMWithValueHead.from_pretrained(str(llama_dir), peft_config=policy_lora())
    (tmp_path / "trl").mkdir()
    trl_model.save_pretrained(str(tmp_path / "trl"))  # TRL takes the directory positionally and needs it to exist
    assert (tmp_path / "trl" / "pytorch_model.bin").exists()
    trl_model.eval()
    inputs = model_inputs("llama")
    with torch.no_grad():
        trl_logits, _, trl_values = trl_model(**inputs)

    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "trl").eval()
    assert model.v_head_source.file == str(tmp_path / "trl" / "pytorch_model.bin")
    assert torch.equal(model.v_head.summary.weight, trl_model.v_head.summary.weight)
    output = model(**inputs)
    torch.testing.assert_close(output.value, trl_values, rtol=0, atol=1e-6)
    torch.testing.assert_close(output.logits, trl_logits, rtol=0, atol=1e-6)


def test_policy_adapter_loads_from_a_hub_id_in_the_offline_cache(policy, tmp_path):
    policy.save_pretrained(tmp_path / "policy")
    populate_hub_cache(tmp_path / "cache", "acme/lora-policy", tmp_path / "policy")
    model = AutoModelForCausalLMWithValueHead.from_pretrained("acme/lora-policy", cache_dir=tmp_path / "cache").eval()
    assert "models--acme--lora-policy" in model.v_head_source.file
    assert torch.equal(model.v_head.summary.weight, policy.v_head.summary.weight)
    inputs = model_inputs("llama")
    assert torch.equal(model(**inputs).logits, policy(**inputs).logits)


def test_transformers_adapter_api_works_on_the_value_head_model(llama_dir, tmp_path):
    torch.manual_seed(5)
    plain_adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), policy_lora())
    plain_adapter.save_pretrained(tmp_path / "plain-adapter")
    plain_adapter.eval()
    inputs = model_inputs("llama")
    with torch.no_grad():
        adapted = plain_adapter(**inputs).logits
        base = plain_adapter.get_base_model()
        with plain_adapter.disable_adapter():
            bare = plain_adapter(**inputs).logits
    del base

    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir).eval()
    model.load_adapter(tmp_path / "plain-adapter")
    assert model.active_adapters() == ["default"]
    assert torch.equal(model(**inputs).logits, adapted)
    model.add_adapter(policy_lora(r=2), adapter_name="second")
    assert model.active_adapters() == ["second"]
    model.set_adapter("default")
    assert torch.equal(model(**inputs).logits, adapted)
    model.disable_adapters()
    assert torch.equal(model(**inputs).logits, bare)
    model.enable_adapters()
    assert torch.equal(model(**inputs).logits, adapted)
    model.delete_adapter("second")
    assert list(model.pretrained_model.peft_config) == ["default"]


def test_adapter_api_without_an_adapter_says_to_load_one(llama_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="No adapter loaded"):
        model.active_adapters()


def test_seq2seq_policy_adapter_saves_and_reloads(tmp_path):
    build_bare("t5").save_pretrained(tmp_path / "t5")
    config = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, target_modules=["q", "v"], init_lora_weights=False)
    policy = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tmp_path / "t5", peft_config=config).eval()
    policy.save_pretrained(tmp_path / "policy")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "policy").eval()
    assert type(reloaded) is AutoModelForSeq2SeqLMWithValueHead and reloaded.is_peft_model
    inputs = model_inputs("t5")
    expected, got = policy(**inputs), reloaded(**inputs)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.value, expected.value)


# The PPO reference through the adapters


def test_as_reference_gives_the_base_model_and_puts_everything_back(policy, llama_dir):
    inputs = model_inputs("llama")
    bare = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        expected = bare(**inputs).logits
    policy.train()
    grads = {name: parameter.requires_grad for name, parameter in policy.named_parameters()}
    with policy.as_reference():
        assert not policy.training
        reference = policy(**inputs).logits
        assert not reference.requires_grad
    assert torch.equal(reference, expected)
    assert policy.training and policy.active_adapters() == ["default"]
    assert {name: parameter.requires_grad for name, parameter in policy.named_parameters()} == grads
    policy.eval()
    assert not torch.equal(policy(**inputs).logits, expected)  # the adapter is on again


def test_as_reference_puts_everything_back_when_the_block_raises(policy):
    policy.train()
    with pytest.raises(RuntimeError, match="inside"), policy.as_reference():
        raise RuntimeError("inside")
    assert policy.training and policy.active_adapters() == ["default"]
    assert all(not layer.disable_adapters for layer in policy.modules() if hasattr(layer, "lora_A"))


def test_reference_logprobs_are_the_base_models_token_logprobs(policy, llama_dir):
    inputs = model_inputs("llama")
    bare = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        logprobs = bare(**inputs).logits.float().log_softmax(-1)
    expected = logprobs[:, :-1].gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(policy.compute_reference_logprobs(**inputs), expected, rtol=0, atol=1e-5)


def test_a_starting_adapter_can_be_kept_as_the_frozen_reference(policy, tmp_path):
    """TRL #495: a policy that starts from a trained adapter must take its KL against that adapter, not the base."""
    inputs = model_inputs("llama")
    policy.save_pretrained(tmp_path / "sft")
    start = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "sft").eval()
    with torch.no_grad():
        starting_logits = start(**inputs).logits

    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "sft", is_trainable=True)
    model.copy_adapter_as_reference()
    assert model.ref_adapter_name == "ref" and model.active_adapters() == ["default"]
    assert not any(parameter.requires_grad for name, parameter in model.named_parameters() if ".ref." in name)
    train_a_step(model, inputs)
    assert not torch.equal(model(**inputs).logits, starting_logits)  # the policy moved ...
    with model.as_reference():
        assert torch.equal(model(**inputs).logits, starting_logits)  # ... its reference did not
    model.save_pretrained(tmp_path / "trained")
    assert not (tmp_path / "trained" / "ref").exists()  # the reference is an input of training, not saved
