"""Reference models that share the policy's lower layers: `create_reference_model` and the one-pass
`forward_with_reference`, across the architecture matrix."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from architectures import FAMILIES, tiny_config
from conftest import bare_class, build_bare, is_seq2seq, model_inputs, value_head_class
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.utils import logging

from transformers_vhead import SharedTrunk, create_reference_model
from transformers_vhead.errors import LayerStackNotFoundError, ReferenceModelError
from transformers_vhead.reference import find_layer_stack, next_token_logprobs

NUM_LAYERS = 4


def policy_of(family: str, num_layers: int = NUM_LAYERS, seed: int = 0):
    return value_head_class(family)(build_bare(family, seed, num_layers)).eval()


def storages(model: torch.nn.Module) -> dict[int, int]:
    """data_ptr -> bytes of every distinct parameter and buffer tensor."""
    tensors = [*model.parameters(), *model.buffers()]
    return {tensor.data_ptr(): tensor.numel() * tensor.element_size() for tensor in tensors if tensor.numel()}


def upper_modules_ran(reference, trunk: SharedTrunk) -> list[str]:
    """Runs nothing itself: returns a list that the reference's layer submodules append their names to when called."""
    calls: list[str] = []
    for index, block in enumerate(reference.get_submodule(trunk.layers)):
        for name, module in block.named_modules():
            if name:
                module.register_forward_pre_hook(lambda m, args, label=f"{index}.{name}": calls.append(label))
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layer_stack_is_found_in_every_architecture(family):
    policy = policy_of(family)
    name, layers = find_layer_stack(policy)
    assert len(layers) == NUM_LAYERS
    assert type(layers[0]).__name__.endswith(("Layer", "Block"))
    assert policy.get_submodule(name) is layers
    if is_seq2seq(family):
        assert "decoder" in name  # the decoder's layers, not the encoder's


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_layers_are_the_policys_own_tensors_and_the_copy_costs_only_the_rest(family):
    policy = policy_of(family)
    trainable_before = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    reference = create_reference_model(policy, num_shared_layers=2)

    trunk = reference.shared_trunk
    assert trunk.num_shared_layers == 2 and trunk.layers == find_layer_stack(policy)[0]
    shared = set(trunk.parameters)
    assert any(".0." in name for name in shared) and any(".1." in name for name in shared)
    assert not any(f"{trunk.layers}.{index}." in name for name in shared for index in (2, 3))
    for name in shared:
        own, referenced = policy.get_parameter(name), reference.get_parameter(name)
        assert referenced is not own and referenced.data_ptr() == own.data_ptr()  # same tensor, own Parameter
    # TRL's semantics: the reference is frozen and in eval mode; the shared part is frozen in the policy too.
    assert not reference.training and not any(parameter.requires_grad for parameter in reference.parameters())
    assert {name for name, parameter in policy.named_parameters() if parameter.requires_grad} == (
        trainable_before - shared
    )
    # The reference's new storage is exactly the unshared part of the policy.
    own_storage = storages(policy)
    extra = sum(size for pointer, size in storages(reference).items() if pointer not in own_storage)
    unshared = sum(
        parameter.numel() * parameter.element_size()
        for name, parameter in policy.named_parameters()
        if name not in shared
    )
    assert extra <= unshared + sum(buffer.numel() * buffer.element_size() for buffer in policy.buffers())
    assert extra >= unshared


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_equals_a_separate_reference_forward_and_runs_the_shared_layers_once(family):
    policy = policy_of(family)
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs(family)
    with torch.no_grad():
        expected_policy = policy(**inputs, use_cache=False)
        expected_reference = reference(**inputs, use_cache=False).logits

    calls = upper_modules_ran(reference, reference.shared_trunk)
    output = policy.forward_with_reference(reference, **inputs, return_logprobs=True)

    assert calls and not any(call.startswith(("0.", "1.")) for call in calls)  # shared layers did not run again
    assert any(call.startswith("3.") for call in calls)
    torch.testing.assert_close(output.logits, expected_policy.logits, rtol=0, atol=0)
    torch.testing.assert_close(output.value, expected_policy.value, rtol=0, atol=0)
    torch.testing.assert_close(output.ref_logits, expected_reference, rtol=0, atol=1e-5)
    tokens = inputs["decoder_input_ids"] if is_seq2seq(family) else inputs["input_ids"]
    torch.testing.assert_close(output.logprobs, next_token_logprobs(expected_policy.logits, tokens), rtol=0, atol=1e-5)
    torch.testing.assert_close(output.ref_logprobs, next_token_logprobs(expected_reference, tokens), rtol=0, atol=1e-5)
    manual = expected_reference[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(output.ref_logprobs, manual, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_after_training_the_policy_the_reference_is_unchanged_and_one_pass_still_equals_it(family):
    # Whatever the policy runs before the branch must be shared, or training would move the policy's branch state
    # away from the reference's (BART runs its layernorm_embedding before the layers but registers it after them).
    policy = policy_of(family).train()
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs(family)
    with torch.no_grad():
        before = reference(**inputs, use_cache=False).logits

    optimizer = torch.optim.SGD([parameter for parameter in policy.parameters() if parameter.requires_grad], lr=1.0)
    output = policy.forward_with_reference(reference, **inputs)
    (output.logits.square().mean() + output.value.square().mean()).backward()
    optimizer.step()

    with torch.no_grad():
        torch.testing.assert_close(reference(**inputs, use_cache=False).logits, before, rtol=0, atol=0)
        moved = policy(**inputs, use_cache=False).logits
    assert not torch.allclose(moved, output.logits.detach())  # the policy did train
    after = policy.forward_with_reference(reference, **inputs)
    torch.testing.assert_close(after.ref_logits, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(after.logits, moved, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_one_pass_under_gradient_checkpointing_in_train_mode(family):
    policy = policy_of(family)
    reference = create_reference_model(policy, num_shared_layers=2)
    policy.activation_checkpointing_enable()
    policy.train()  # dropout rates are 0 in the test models, so the shared layers stay deterministic
    inputs = model_inputs(family)
    output = policy.forward_with_reference(reference, **inputs)
    output.value.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(output.ref_logits, reference(**inputs, use_cache=False).logits, rtol=0, atol=1e-5)
    top_layer = policy.get_submodule(reference.shared_trunk.layers)[NUM_LAYERS - 1]
    assert all(parameter.grad is not None for parameter in top_layer.parameters())


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("num_shared_layers", [0, NUM_LAYERS - 1])
def test_one_pass_at_the_ends_of_the_range(family, num_shared_layers):
    policy = policy_of(family)
    reference = create_reference_model(policy, num_shared_layers=num_shared_layers)
    inputs = model_inputs(family)
    with torch.no_grad():
        expected = reference(**inputs, use_cache=False).logits
    output = policy.forward_with_reference(reference, **inputs)
    torch.testing.assert_close(output.ref_logits, expected, rtol=0, atol=1e-5)
    if num_shared_layers == 0:  # the embeddings only
        assert not any(f"{reference.shared_trunk.layers}." in name for name in reference.shared_trunk.parameters)


def warnings_of(caplog, call):
    logging.enable_propagation()
    caplog.clear()
    with caplog.at_level("WARNING", logger="transformers_vhead"):
        result = call()
    return result, [record.getMessage() for record in caplog.records]


def test_a_full_copy_shares_nothing_and_one_pass_falls_back_saying_so(caplog):
    policy = policy_of("gpt2")
    reference = create_reference_model(policy)
    assert not any(parameter.requires_grad for parameter in reference.parameters()) and not reference.training
    assert all(parameter.requires_grad for parameter in policy.parameters())  # TRL: nothing frozen in the policy
    assert not set(storages(reference)) & set(storages(policy))
    assert not hasattr(reference, "shared_trunk")

    inputs = model_inputs("gpt2")
    output, messages = warnings_of(caplog, lambda: policy.forward_with_reference(reference, **inputs))
    assert any("shares no layers" in message for message in messages)
    with torch.no_grad():
        torch.testing.assert_close(output.ref_logits, reference(**inputs, use_cache=False).logits, rtol=0, atol=0)
    # Once per reference and reason: not at every step, but again for another reference.
    assert warnings_of(caplog, lambda: policy.forward_with_reference(reference, **inputs))[1] == []
    another = create_reference_model(policy)
    _, messages = warnings_of(caplog, lambda: policy.forward_with_reference(another, **inputs))
    assert any("shares no layers" in message for message in messages)


DROPOUT_RATES = ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def branch_states(policy, trunk: SharedTrunk, inputs, seeds) -> list[torch.Tensor]:
    """What leaves the policy's last shared layer in one forward per seed."""
    states: list[torch.Tensor] = []

    def keep(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    handle = policy.get_submodule(trunk.layers)[trunk.num_shared_layers - 1].register_forward_hook(keep)
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(seed)
            policy(**inputs, use_cache=False)
    handle.remove()
    return states


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_is_seen_where_it_changes_the_shared_layers_output_and_only_in_train_mode(family, caplog):
    # The oracle: two train-mode forwards with different seeds give different states at the branch point exactly when
    # dropout acts before it. With the families' dropout rates on, the one pass must then fall back, saying so.
    config = tiny_config(family, NUM_LAYERS)
    for name in DROPOUT_RATES + ("dropout_rate", "activation_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.3)
    torch.manual_seed(0)
    policy = value_head_class(family)(bare_class(family).from_config(config)).train()
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs(family)
    first, second = branch_states(policy, reference.shared_trunk, inputs, seeds=(1, 2))
    assert not torch.equal(first, second)

    calls = upper_modules_ran(reference, reference.shared_trunk)
    output, messages = warnings_of(caplog, lambda: policy.forward_with_reference(reference, **inputs))
    assert any("dropout is active" in message for message in messages)
    assert any(call.startswith("0.") for call in calls)  # the reference ran its shared layers itself
    with torch.no_grad():
        torch.testing.assert_close(output.ref_logits, reference(**inputs, use_cache=False).logits, rtol=0, atol=0)

    policy.eval()
    calls.clear()
    output, messages = warnings_of(caplog, lambda: policy.forward_with_reference(reference, **inputs))
    assert messages == [] and not any(call.startswith("0.") for call in calls)


def test_train_mode_without_dropout_keeps_the_one_pass(caplog):
    policy = policy_of("llama").train()  # the test models' dropout rates are 0
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs("llama")
    first, second = branch_states(policy, reference.shared_trunk, inputs, seeds=(1, 2))
    assert torch.equal(first, second)
    calls = upper_modules_ran(reference, reference.shared_trunk)
    _, messages = warnings_of(caplog, lambda: policy.forward_with_reference(reference, **inputs))
    assert messages == [] and not any(call.startswith("0.") for call in calls)


def test_active_dropout_in_the_shared_layers_falls_back_to_the_full_reference(caplog):
    torch.manual_seed(0)
    bare = build_bare("llama", num_layers=NUM_LAYERS)
    bare.config.attention_dropout = 0.5
    for layer in bare.model.layers:
        layer.self_attn.attention_dropout = 0.5
    policy = value_head_class("llama")(bare).train()
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs("llama")

    output, messages = warnings_of(caplog, lambda: policy.forward_with_reference(reference, **inputs))
    assert any("dropout is active" in message for message in messages)
    with torch.no_grad():  # the reference is in eval mode: its own full forward, no dropout
        torch.testing.assert_close(output.ref_logits, reference(**inputs, use_cache=False).logits, rtol=0, atol=0)

    policy.eval()
    output, messages = warnings_of(caplog, lambda: policy.forward_with_reference(reference, **inputs))
    assert messages == []
    with torch.no_grad():
        torch.testing.assert_close(output.ref_logits, reference(**inputs, use_cache=False).logits, rtol=0, atol=1e-5)


def test_one_pass_uses_no_cache_whatever_it_is_asked():
    policy = policy_of("llama")
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs("llama")
    output = policy.forward_with_reference(reference, **inputs, use_cache=True, return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(output.ref_logits, reference(**inputs).logits, rtol=0, atol=1e-5)
    cache = policy(**inputs, use_cache=True).past_key_values
    for name in ("past_key_values", "cache"):
        with pytest.raises(ValueError, match="takes no cache"):
            policy.forward_with_reference(reference, **inputs, **{name: cache})


def test_another_thread_using_the_reference_meanwhile_runs_its_shared_layers():
    policy = policy_of("llama")
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs, other_inputs = model_inputs("llama"), model_inputs("llama", seed=1)
    with torch.no_grad():
        expected, expected_other = (reference(**batch, use_cache=False).logits for batch in (inputs, other_inputs))
    caller, results = threading.get_ident(), {}

    def other_thread():
        with torch.no_grad():
            results["other"] = reference(**other_inputs, use_cache=False).logits

    def run_other_thread_now(module, args):  # while the caller's one pass has the shared layers replaying
        if threading.get_ident() == caller and "other" not in results:
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()

    upper_layer = reference.get_submodule(reference.shared_trunk.layers)[2]
    handle = upper_layer.register_forward_pre_hook(run_other_thread_now)
    output = policy.forward_with_reference(reference, **inputs)
    handle.remove()

    torch.testing.assert_close(results["other"], expected_other, rtol=0, atol=0)
    torch.testing.assert_close(output.ref_logits, expected, rtol=0, atol=1e-5)


def test_shared_layers_trained_again_are_refused():
    policy = policy_of("llama")
    reference = create_reference_model(policy, num_shared_layers=2)
    policy.get_parameter(reference.shared_trunk.parameters[0]).requires_grad_(True)
    with pytest.raises(ReferenceModelError, match="the reference would change with every step"):
        policy.forward_with_reference(reference, **model_inputs("llama"))


def test_the_reference_is_an_ordinary_model_converting_or_moving_it_leaves_the_policy_alone(caplog):
    policy = policy_of("llama")
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs("llama")
    with torch.no_grad():
        policy_logits = policy(**inputs).logits
        reference_logits = reference(**inputs).logits

    reference.to(torch.float64)
    assert all(parameter.dtype == torch.float32 for parameter in policy.parameters())
    output, messages = warnings_of(caplog, lambda: policy.forward_with_reference(reference, **inputs))
    assert any("no longer one tensor of both models" in message for message in messages)
    torch.testing.assert_close(output.logits, policy_logits, rtol=0, atol=0)
    torch.testing.assert_close(output.ref_logits.float(), reference_logits, rtol=0, atol=1e-5)

    reference.to("meta")  # a device move: the policy keeps its weights where they are
    assert all(parameter.device.type == "cpu" for parameter in policy.parameters())
    with torch.no_grad():
        torch.testing.assert_close(policy(**inputs).logits, policy_logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bart"])
def test_the_reference_saves_and_loads_like_any_model(family, tmp_path):
    policy = policy_of(family)
    reference = create_reference_model(policy, num_shared_layers=2)
    reference.save_pretrained(tmp_path / "reference")
    auto_class = AutoModelForSeq2SeqLM if is_seq2seq(family) else AutoModelForCausalLM
    loaded = auto_class.from_pretrained(tmp_path / "reference").eval()

    assert type(loaded) is type(policy)
    inputs = model_inputs(family)
    with torch.no_grad():
        expected, found = reference(**inputs, use_cache=False), loaded(**inputs, use_cache=False)
    assert torch.equal(found.logits, expected.logits) and torch.equal(found.value, expected.value)
    assert not set(storages(loaded)) & set(storages(policy))  # the loaded copy is independent


def test_a_peft_policy_shares_its_lower_layers_and_their_adapter(tmp_path):
    from peft import LoraConfig

    policy = value_head_class("llama").from_pretrained(
        build_bare("llama", num_layers=NUM_LAYERS),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    reference = create_reference_model(policy, num_shared_layers=2)
    trunk = reference.shared_trunk
    assert trunk.layers.endswith("model.layers") and "base_model" in trunk.layers
    lora_shared = [name for name in trunk.parameters if "lora_" in name]
    assert lora_shared and not any(policy.get_parameter(name).requires_grad for name in lora_shared)
    assert any(
        parameter.requires_grad for name, parameter in policy.named_parameters() if "lora_" in name and ".3." in name
    )
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = reference(**inputs, use_cache=False).logits
    torch.testing.assert_close(
        policy.forward_with_reference(reference, **inputs).ref_logits, expected, rtol=0, atol=1e-5
    )


# TRL 1.12's own create_reference_model is the reference for which parameters get frozen.


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "bloom", "falcon"])
def test_the_policy_freezes_what_trl_freezes(family, trl_ppo):
    from trl.experimental.utils import create_reference_model as trl_create_reference_model

    ours, theirs = policy_of(family), policy_of(family)
    create_reference_model(ours, num_shared_layers=2)
    trl_create_reference_model(theirs, num_shared_layers=2)
    assert {name for name, parameter in ours.named_parameters() if not parameter.requires_grad} == {
        name for name, parameter in theirs.named_parameters() if not parameter.requires_grad
    }


def test_a_pattern_shares_by_trls_rule(trl_ppo):
    # OPT registers its final norm (run after the layers) before them: TRL's rule shares and freezes it; ours by
    # tracing does not, unless the pattern asks for TRL's rule.
    from trl.experimental.utils import create_reference_model as trl_create_reference_model

    ours, theirs, traced = policy_of("opt"), policy_of("opt"), policy_of("opt")
    create_reference_model(ours, num_shared_layers=2, pattern="model.decoder.layers.{layer}")
    trl_create_reference_model(theirs, num_shared_layers=2)
    create_reference_model(traced, num_shared_layers=2)

    def frozen(model):
        return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}

    assert frozen(ours) == frozen(theirs)
    assert "pretrained_model.model.decoder.final_layer_norm.weight" in frozen(theirs) - frozen(traced)


def test_a_pattern_that_leaves_part_of_the_trunk_unshared_says_one_pass_is_off(caplog):
    # TRL's rule on BART leaves the decoder's layernorm_embedding (registered after the layers, run before) unshared.
    policy = policy_of("bart")
    reference, messages = warnings_of(
        caplog, lambda: create_reference_model(policy, num_shared_layers=2, pattern="model.decoder.layers.{layer}")
    )
    assert any("layernorm_embedding" in message and "full forward" in message for message in messages)
    assert not hasattr(reference, "shared_trunk")
    inputs = model_inputs("bart")
    output, messages = warnings_of(caplog, lambda: policy.forward_with_reference(reference, **inputs))
    with torch.no_grad():
        torch.testing.assert_close(output.ref_logits, reference(**inputs, use_cache=False).logits, rtol=0, atol=0)
    with_pattern = create_reference_model(policy_of("llama"), num_shared_layers=2, pattern="model.layers.{layer}")
    assert with_pattern.shared_trunk.num_shared_layers == 2  # where the rules agree, one pass is on


# Bad input.


@pytest.mark.parametrize("num_shared_layers", [-1, NUM_LAYERS, NUM_LAYERS + 3, 1.5, True])
def test_num_shared_layers_out_of_range(num_shared_layers):
    policy = policy_of("llama")
    before = copy.deepcopy(policy.state_dict())
    with pytest.raises(ReferenceModelError, match="num_shared_layers") as raised:
        create_reference_model(policy, num_shared_layers=num_shared_layers)
    if num_shared_layers == NUM_LAYERS:
        assert "has 4 layers" in str(raised.value) and "share at most 3" in str(raised.value)
    assert all(parameter.requires_grad for parameter in policy.parameters())  # nothing frozen on the way
    assert all(torch.equal(before[key], value) for key, value in policy.state_dict().items())


def test_a_pattern_that_matches_nothing():
    policy = policy_of("llama")
    with pytest.raises(ReferenceModelError, match=r"pattern 'transformer\.h\.\{layer\}'.*matches no parameter"):
        create_reference_model(policy, num_shared_layers=2, pattern="transformer.h.{layer}")
    assert all(parameter.requires_grad for parameter in policy.parameters())


class NoStack(torch.nn.Module):
    """A model whose layers are plain attributes: no ModuleList to find."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.first = torch.nn.Linear(4, 4)
        self.second = torch.nn.Linear(4, 4)

    def forward(self, input_ids):
        return self.second(self.first(self.embed(input_ids)))


def test_a_model_without_a_layer_stack_gets_a_clear_error_unless_a_pattern_names_the_layers():
    with pytest.raises(LayerStackNotFoundError, match="looked for a torch.nn.ModuleList of blocks of one class"):
        create_reference_model(NoStack(), num_shared_layers=1)
    model = NoStack()
    reference = create_reference_model(model, num_shared_layers=1, pattern="second")  # TRL's rule needs no stack
    assert reference.first.weight.data_ptr() == model.first.weight.data_ptr()
    assert reference.second.weight.data_ptr() != model.second.weight.data_ptr()
    assert not model.first.weight.requires_grad and model.second.weight.requires_grad


def test_deepspeed_zero3_asks_for_from_pretrained():
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    policy = policy_of("llama")  # built before: under ZeRO-3 transformers builds models with deepspeed's zero.Init
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
    set_hf_deepspeed_config(zero3)
    try:
        with pytest.raises(ReferenceModelError, match=r"ZeRO-3.*from_pretrained"):
            create_reference_model(policy, num_shared_layers=2)
    finally:
        unset_hf_deepspeed_config()
