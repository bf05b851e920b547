"""Training behaviour of the value-head models: the wrapper must train like the bare model it wraps.

Activation (gradient) checkpointing, input-embedding gradients for PEFT, token-embedding resizing, weight tying,
half-precision loading, the value head's dropout and initialisation, and the HF `Trainer` / `accelerate` loops.

Models are loaded with `from_pretrained(saved plain model)` so their weights equal `build_bare(family, seed)` exactly;
wrapping a model instance is tested on its own (see `test_wrapping_an_instance_keeps_its_attention_implementation`).
"""

from __future__ import annotations

import math

import accelerate
import pytest
import torch
from architectures import VOCAB_SIZE, tiny_config
from conftest import build_bare, is_seq2seq, model_inputs, value_head_class
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer

from transformers_vhead import AutoModelForCausalLMWithValueHead

CHECKPOINTING_FAMILIES = ["llama", "gpt2", "t5"]

# (enable, disable, status property) of each API generation; transformers 5 keeps the `gradient_*` names as
# deprecated aliases of the `activation_*` ones.
CHECKPOINTING_APIS = {
    "activation": (
        "activation_checkpointing_enable",
        "activation_checkpointing_disable",
        "is_activation_checkpointing",
    ),
    "gradient": ("gradient_checkpointing_enable", "gradient_checkpointing_disable", "is_gradient_checkpointing"),
}


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def load_wrapped(family: str, tmp_path, seed: int = 0, **kwargs):
    """The value-head model of `family` loaded from a saved `build_bare(family, seed)`: the same LM weights."""
    path = tmp_path / f"{family}-{seed}"
    if not path.exists():
        build_bare(family, seed).save_pretrained(path)
    return value_head_class(family).from_pretrained(path, **kwargs)


def lm_labels(family: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """LM labels for `inputs`: the decoder inputs of a seq2seq model, else the input ids with padding ignored."""
    if is_seq2seq(family):
        return inputs["decoder_input_ids"].clone()
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


def checkpointing_api(model, api: str) -> tuple:
    """Callables enabling and disabling checkpointing through `api`'s method names (the deprecated ones must warn),
    and a reader of its status property; skips when the installed transformers lacks that generation of names."""
    enable_name, disable_name, status_name = CHECKPOINTING_APIS[api]
    if not all(hasattr(type(model), name) for name in (enable_name, disable_name, status_name)):
        pytest.skip(f"this transformers has no {enable_name} / {disable_name} / {status_name}")
    deprecated = api == "gradient"

    def call(name: str):
        def run(*args, **kwargs):
            if deprecated:
                with pytest.warns(FutureWarning, match="deprecated"):
                    return getattr(model, name)(*args, **kwargs)
            return getattr(model, name)(*args, **kwargs)

        return run

    def status(target) -> bool:
        if deprecated:
            with pytest.warns(FutureWarning, match="deprecated"):
                return getattr(target, status_name)
        return getattr(target, status_name)

    return call(enable_name), call(disable_name), status


def count_layer_linear_calls(model: nn.Module) -> list[int]:
    """Counts (in the returned one-element list) the calls of every linear layer inside the checkpointable decoder
    blocks. Module hooks on the blocks themselves run outside the checkpoint, but their sub-modules run again when a
    checkpointed block is recomputed in the backward pass."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    blocks = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    assert blocks, f"{type(model).__name__} has no checkpointable blocks"
    for block in blocks:
        for module in block.modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's linear layers
                module.register_forward_hook(hook)
    return calls


def loss_value_and_grads(model, family: str, inputs: dict[str, torch.Tensor]):
    """Loss, values and every parameter's gradient of `loss + value.sum()`."""
    model.zero_grad(set_to_none=True)
    output = model(**inputs, labels=lm_labels(family, inputs))
    (output.loss + output.value.sum()).backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return output.loss.detach(), output.value.detach(), grads


def assert_same_grads(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def head_value(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the value head should return: its fp32 Linear on the wrapped causal LM's final hidden state (eval mode),
    read from the wrapped model's own base model (`.model` of Llama, `.transformer` of GPT-2)."""
    hidden = model.pretrained_model.base_model(**inputs).last_hidden_state
    with torch.autocast("cpu", enabled=False):
        return model.v_head.summary(hidden.float()).squeeze(-1)


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr()


def tiny_dataset(rows: int = 6, length: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(rows):
        input_ids = torch.randint(3, VOCAB_SIZE, (length,), generator=generator)
        data.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()})
    return data


# ---------------------------------------------------------------------------------------------------------------------
# 1. activation (gradient) checkpointing


def test_wrapper_supports_gradient_checkpointing():
    assert AutoModelForCausalLMWithValueHead.supports_gradient_checkpointing
    assert value_head_class("t5").supports_gradient_checkpointing


@pytest.mark.parametrize("api", sorted(CHECKPOINTING_APIS))
@pytest.mark.parametrize("family", CHECKPOINTING_FAMILIES)
def test_checkpointing_toggles_and_leaves_loss_value_and_grads_unchanged(family, api, tmp_path):
    model = load_wrapped(family, tmp_path, summary_dropout_prob=0.0).train()
    enable, disable, is_checkpointing = checkpointing_api(model, api)
    inputs = model_inputs(family)
    linear_calls = count_layer_linear_calls(model.pretrained_model)

    assert not is_checkpointing(model)
    loss, value, grads = loss_value_and_grads(model, family, inputs)
    forward_calls = linear_calls[0]
    assert forward_calls > 0

    enable()
    assert is_checkpointing(model)
    assert is_checkpointing(model.pretrained_model)
    blocks = [module for module in model.pretrained_model.modules() if isinstance(module, GradientCheckpointingLayer)]
    assert all(block.gradient_checkpointing for block in blocks)
    linear_calls[0] = 0
    loss_ckpt, value_ckpt, grads_ckpt = loss_value_and_grads(model, family, inputs)
    assert linear_calls[0] > forward_calls, "the backward pass recomputed no checkpointed block"

    disable()
    assert not is_checkpointing(model)
    assert not is_checkpointing(model.pretrained_model)
    assert not any(block.gradient_checkpointing for block in blocks)
    linear_calls[0] = 0
    loss_off, value_off, grads_off = loss_value_and_grads(model, family, inputs)
    assert linear_calls[0] == forward_calls, "a block was recomputed after checkpointing was disabled"

    assert len(grads) == len(list(model.parameters()))  # every parameter, the value head included, gets a gradient
    for other_loss, other_value, other_grads in ((loss_ckpt, value_ckpt, grads_ckpt), (loss_off, value_off, grads_off)):
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(other_value, value, atol=1e-6, rtol=1e-6)
        assert_same_grads(other_grads, grads)


@pytest.mark.parametrize("family", CHECKPOINTING_FAMILIES)
def test_checkpointed_values_only_call_gives_the_same_grads(family, tmp_path):
    """`compute_values` stops the forward after the decoder; the checkpointed blocks are still recomputed later."""
    model = load_wrapped(family, tmp_path, summary_dropout_prob=0.0).train()
    inputs = model_inputs(family)

    def value_grads():
        model.zero_grad(set_to_none=True)
        values = model.compute_values(**inputs)
        values.sum().backward()
        return values.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    values, grads = value_grads()
    model.activation_checkpointing_enable()
    values_ckpt, grads_ckpt = value_grads()

    torch.testing.assert_close(values_ckpt, values, atol=1e-6, rtol=1e-6)
    assert_same_grads(grads_ckpt, grads)
    assert "v_head.summary.weight" in grads


@pytest.mark.parametrize("family", CHECKPOINTING_FAMILIES)
def test_checkpointed_wrapper_lm_matches_checkpointed_bare_model(family, tmp_path):
    model = load_wrapped(family, tmp_path).train()
    bare = build_bare(family).train()
    model.activation_checkpointing_enable()
    bare.activation_checkpointing_enable()
    inputs = model_inputs(family)
    labels = lm_labels(family, inputs)

    output = model(**inputs, labels=labels)
    bare_output = bare(**inputs, labels=labels)
    output.loss.backward()
    bare_output.loss.backward()

    assert torch.equal(output.logits, bare_output.logits)
    assert torch.equal(output.loss, bare_output.loss)
    bare_grads = dict(bare.named_parameters())
    wrapped = list(model.pretrained_model.named_parameters())
    assert len(wrapped) == len(bare_grads)
    for name, param in wrapped:
        torch.testing.assert_close(param.grad, bare_grads[name].grad, atol=1e-6, rtol=1e-6)
    assert model.v_head.summary.weight.grad is None  # the loss alone does not reach the head


# ---------------------------------------------------------------------------------------------------------------------
# 2. input-embedding gradients (PEFT + checkpointing)


def test_enable_input_require_grads_makes_embedding_output_require_grad(tmp_path):
    model = load_wrapped("llama", tmp_path).train()
    model.requires_grad_(False)
    inputs = model_inputs("llama")
    embedded = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: embedded.append(output))

    model(**inputs)
    assert not embedded[-1].requires_grad  # frozen model: nothing asks for a gradient

    model.enable_input_require_grads()
    model(**inputs)
    assert embedded[-1].requires_grad

    model.disable_input_require_grads()
    model(**inputs)
    assert not embedded[-1].requires_grad


def test_frozen_checkpointed_model_backpropagates_to_trainable_head_and_adapter_weights(tmp_path):
    """The PEFT case: base weights frozen, a few weights (an "adapter" inside a block, the head) trainable, reentrant
    checkpointing, which only backpropagates through a block when its input requires grad."""
    model = load_wrapped("llama", tmp_path, summary_dropout_prob=0.0).train()
    inputs = model_inputs("llama")
    adapter = model.pretrained_model.model.layers[0].self_attn.q_proj.weight

    def trainable_grads():
        model.zero_grad(set_to_none=True)
        model(**inputs).value.sum().backward()
        return adapter.grad, model.v_head.summary.weight.grad

    reference_adapter_grad, reference_head_grad = trainable_grads()  # nothing frozen, no checkpointing

    model.requires_grad_(False)
    model.v_head.requires_grad_(True)
    adapter.requires_grad_(True)
    model.enable_input_require_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    adapter_grad, head_grad = trainable_grads()

    assert head_grad is not None and adapter_grad is not None
    torch.testing.assert_close(head_grad, reference_head_grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(adapter_grad, reference_adapter_grad, atol=1e-6, rtol=1e-6)
    assert all(
        p.grad is None
        for n, p in model.named_parameters()
        if n not in ("v_head.summary.weight", "v_head.summary.bias") and p is not adapter
    )


def test_reentrant_checkpointing_of_a_frozen_model_needs_the_input_hook(tmp_path):
    """The control for the test above: checkpointing alone installs the input hook (the wrapper's main input is
    `input_ids`); without it, reentrant checkpointing cuts the graph before the adapter, as PEFT users hit."""
    model = load_wrapped("llama", tmp_path, summary_dropout_prob=0.0).train()
    adapter = model.pretrained_model.model.layers[0].self_attn.q_proj.weight
    model.requires_grad_(False)
    model.v_head.requires_grad_(True)
    adapter.requires_grad_(True)
    embedded = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: embedded.append(output))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    inputs = model_inputs("llama")

    model(**inputs)
    assert embedded[-1].requires_grad

    model.disable_input_require_grads()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        model(**inputs).value.sum().backward()
    assert adapter.grad is None
    assert model.v_head.summary.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------------------
# 3. resizing the token embeddings


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resize_token_embeddings_matches_the_bare_model(family, tmp_path):
    new_size = VOCAB_SIZE + 32
    model = load_wrapped(family, tmp_path, summary_dropout_prob=0.0).eval()
    bare = build_bare(family)
    inputs = model_inputs(family)
    values_before = model(**inputs).value
    tied = family == "gpt2"

    torch.manual_seed(1)  # the new rows are drawn from the old embeddings' distribution
    embedding = model.resize_token_embeddings(new_size)
    torch.manual_seed(1)
    bare.resize_token_embeddings(new_size)

    assert embedding is model.get_input_embeddings() is model.pretrained_model.get_input_embeddings()
    assert model.get_input_embeddings().weight.shape == bare.get_input_embeddings().weight.shape == (new_size, 32)
    assert model.get_output_embeddings().weight.shape == bare.get_output_embeddings().weight.shape == (new_size, 32)
    assert torch.equal(model.get_input_embeddings().weight, bare.get_input_embeddings().weight)
    assert torch.equal(model.get_output_embeddings().weight, bare.get_output_embeddings().weight)
    assert same_storage(model.get_input_embeddings().weight, model.get_output_embeddings().weight) is tied
    assert model.config.vocab_size == model.config.text_config.vocab_size == new_size
    assert model.pretrained_model.config.vocab_size == new_size

    output = model(**inputs)
    assert output.logits.shape[-1] == new_size
    assert torch.equal(output.logits, bare(**inputs).logits)
    assert torch.equal(output.value, values_before)  # old tokens: same hidden states, same values

    new_tokens = torch.tensor([[5, VOCAB_SIZE, new_size - 1]])
    new_output = model(input_ids=new_tokens)
    assert new_output.value.shape == (1, 3) and new_output.value.dtype == torch.float32
    assert torch.isfinite(new_output.value).all()
    torch.testing.assert_close(new_output.value, head_value(model, {"input_ids": new_tokens}), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 4. input / output embeddings and tying


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_embedding_accessors_delegate_to_the_wrapped_model(family, tmp_path):
    model = load_wrapped(family, tmp_path)
    assert model.get_input_embeddings() is model.pretrained_model.get_input_embeddings()
    assert model.get_output_embeddings() is model.pretrained_model.get_output_embeddings()


def test_gpt2_lm_head_is_tied_to_input_embeddings_after_construction_and_reload(tmp_path):
    wrapped_instance = AutoModelForCausalLMWithValueHead(build_bare("gpt2"))
    assert same_storage(wrapped_instance.get_output_embeddings().weight, wrapped_instance.get_input_embeddings().weight)
    model = load_wrapped("gpt2", tmp_path)
    assert same_storage(model.get_output_embeddings().weight, model.get_input_embeddings().weight)

    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded, AutoModelForCausalLMWithValueHead)
    assert same_storage(reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight)
    assert torch.equal(reloaded.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert torch.equal(reloaded.v_head.summary.weight, model.v_head.summary.weight)

    with torch.no_grad():  # one tensor: a change through the embedding is seen by the LM head
        reloaded.get_input_embeddings().weight[7].add_(1.0)
    assert torch.equal(reloaded.get_output_embeddings().weight[7], reloaded.get_input_embeddings().weight[7])


def test_llama_lm_head_stays_untied_after_construction_and_reload(tmp_path):
    model = load_wrapped("llama", tmp_path)
    assert model.config.text_config.tie_word_embeddings is False
    assert not same_storage(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)

    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert "pretrained_model.lm_head.weight" in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not same_storage(reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight)
    assert torch.equal(reloaded.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert torch.equal(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_set_input_and_output_embeddings_replace_the_wrapped_models(tmp_path):
    model = load_wrapped("llama", tmp_path).eval()
    bare = build_bare("llama")
    torch.manual_seed(3)
    new_embedding = nn.Embedding(VOCAB_SIZE, 32)
    new_head = nn.Linear(32, VOCAB_SIZE, bias=False)

    model.set_input_embeddings(new_embedding)
    model.set_output_embeddings(new_head)
    bare.set_input_embeddings(new_embedding)
    bare.set_output_embeddings(new_head)

    assert model.pretrained_model.get_input_embeddings() is new_embedding
    assert model.get_input_embeddings() is new_embedding
    assert model.pretrained_model.get_output_embeddings() is new_head
    assert model.get_output_embeddings() is new_head
    inputs = model_inputs("llama")
    output = model(**inputs)
    assert torch.equal(output.logits, bare(**inputs).logits)  # the forward really uses the new modules
    assert torch.equal(output.value, head_value(model, inputs))


# ---------------------------------------------------------------------------------------------------------------------
# 5. half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_keeps_the_head_and_values_fp32(dtype, llama_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, dtype=dtype).eval()
    inputs = model_inputs("llama")

    assert model.pretrained_model.dtype == dtype
    assert all(p.dtype == dtype for p in model.pretrained_model.parameters())
    assert model.v_head.summary.weight.dtype == model.v_head.summary.bias.dtype == torch.float32
    assert model.config.upcast_logits is True

    output = model(**inputs)
    raw_logits = model.pretrained_model(**inputs).logits
    assert raw_logits.dtype == dtype
    assert output.logits.dtype == torch.float32
    assert torch.equal(output.logits, raw_logits.float())
    assert output.value.dtype == torch.float32
    assert torch.equal(output.value, head_value(model, inputs))
    assert torch.equal(model.compute_values(**inputs), output.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_logits_false_keeps_half_precision_logits(dtype, llama_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, dtype=dtype, upcast_logits=False).eval()
    inputs = model_inputs("llama")

    assert model.config.upcast_logits is False
    output = model(**inputs)
    assert output.logits.dtype == dtype
    assert torch.equal(output.logits, model.pretrained_model(**inputs).logits)
    assert output.value.dtype == torch.float32


def test_values_stay_fp32_under_bf16_autocast(llama_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir).eval()
    inputs = model_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**inputs)
        hidden = model.pretrained_model.model(**inputs).last_hidden_state
    assert model.v_head.summary.weight.dtype == torch.float32
    assert output.value.dtype == torch.float32
    with torch.autocast("cpu", enabled=False):
        expected = model.v_head.summary(hidden.float()).squeeze(-1)
    assert torch.equal(output.value, expected)


# ---------------------------------------------------------------------------------------------------------------------
# 6. value-head dropout


def test_zero_summary_dropout_prob_gives_identity_dropout(llama_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, summary_dropout_prob=0.0).train()
    assert isinstance(model.v_head.dropout, nn.Identity)
    inputs = model_inputs("llama")
    assert torch.equal(model(**inputs).value, model(**inputs).value)


def test_default_dropout_varies_values_in_train_mode_only(llama_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)
    assert isinstance(model.v_head.dropout, nn.Dropout) and model.v_head.dropout.p == 0.1
    assert model.config.summary_dropout_prob == 0.1
    inputs = model_inputs("llama")

    model.train()
    first, second = model(**inputs), model(**inputs)
    assert torch.equal(first.logits, second.logits)  # the tiny LM has no dropout: only the head is stochastic
    assert not torch.equal(first.value, second.value)

    model.eval()
    assert torch.equal(model(**inputs).value, model(**inputs).value)


def test_gpt2_default_dropout_is_trls_0_1(tmp_path):
    # GPT2Config has `summary_first_dropout`, not `summary_dropout_prob`: the 0.1 is the fallback
    model = load_wrapped("gpt2", tmp_path)
    assert isinstance(model.v_head.dropout, nn.Dropout) and model.v_head.dropout.p == 0.1
    assert model.config.summary_dropout_prob == 0.1


def gpt2_with_summary_dropout(tmp_path, summary_dropout_prob: float):
    config = tiny_config("gpt2")
    config.summary_dropout_prob = summary_dropout_prob
    torch.manual_seed(0)
    bare = AutoModelForCausalLM.from_config(config)
    bare.save_pretrained(tmp_path / "gpt2-summary")
    return bare, tmp_path / "gpt2-summary"


def test_base_config_summary_dropout_prob_is_the_default(tmp_path):
    bare, path = gpt2_with_summary_dropout(tmp_path, 0.25)
    for model in (AutoModelForCausalLMWithValueHead.from_pretrained(path), AutoModelForCausalLMWithValueHead(bare)):
        assert model.v_head.dropout.p == 0.25
        assert model.config.summary_dropout_prob == 0.25


def test_explicit_summary_dropout_prob_wins_over_the_base_config(tmp_path):
    """TRL's ValueHead let the base config's `summary_dropout_prob` win over the keyword; here the keyword wins."""
    bare, path = gpt2_with_summary_dropout(tmp_path, 0.25)
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(path, summary_dropout_prob=0.3)
    wrapped = AutoModelForCausalLMWithValueHead(bare, summary_dropout_prob=0.3)
    for model in (loaded, wrapped):
        assert model.v_head.dropout.p == 0.3
        assert model.config.summary_dropout_prob == 0.3

    loaded.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.v_head.dropout.p == 0.3


def test_base_config_summary_dropout_prob_zero_disables_dropout(tmp_path):
    bare, path = gpt2_with_summary_dropout(tmp_path, 0.0)
    for model in (AutoModelForCausalLMWithValueHead.from_pretrained(path), AutoModelForCausalLMWithValueHead(bare)):
        assert model.config.summary_dropout_prob == 0.0
        assert isinstance(model.v_head.dropout, nn.Identity)


# ---------------------------------------------------------------------------------------------------------------------
# 7. value-head initialisation


@pytest.fixture
def wide_llama(tmp_path):
    """A one-layer Llama with hidden size 1024, so the head has 1024 weights to measure; saved to disk."""
    config = tiny_config("llama")
    config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.intermediate_size = 1024, 1, 1, 8
    torch.manual_seed(0)
    bare = AutoModelForCausalLM.from_config(config)
    bare.save_pretrained(tmp_path / "wide-llama")
    return bare, tmp_path / "wide-llama"


@pytest.mark.parametrize("source", ["from_pretrained", "instance"])
def test_normal_init_strategy_draws_weights_with_the_given_std_and_zero_bias(source, wide_llama):
    bare, path = wide_llama
    settings = {"v_head_init_strategy": "normal", "v_head_initializer_range": 0.05}
    if source == "from_pretrained":
        model = AutoModelForCausalLMWithValueHead.from_pretrained(path, **settings)
    else:
        model = AutoModelForCausalLMWithValueHead(bare, **settings)
    weight, bias = model.v_head.summary.weight, model.v_head.summary.bias

    assert weight.shape == (1, 1024)
    assert torch.equal(bias, torch.zeros(1))
    assert weight.std().item() == pytest.approx(0.05, rel=0.15)  # the sample std of 1024 draws is within ~2.2%
    assert abs(weight.mean().item()) < 4 * 0.05 / math.sqrt(1024)
    assert model.v_head_source.init == "normal(std=0.05)"


def test_default_init_strategy_is_pytorch_linear_init(wide_llama):
    _, path = wide_llama
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    weight, bias = model.v_head.summary.weight, model.v_head.summary.bias
    bound = 1 / math.sqrt(1024)

    assert model.config.v_head_init_strategy is None
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.9 * bound  # uniform over the whole range, not a narrow normal
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    assert bias.item() != 0.0 and abs(bias.item()) <= bound


@pytest.mark.parametrize("strategy", [None, "normal"])
def test_loaded_head_is_never_reinitialised(strategy, tmp_path):
    model = load_wrapped("llama", tmp_path, v_head_init_strategy="normal", v_head_initializer_range=0.05)
    with torch.no_grad():
        model.v_head.summary.bias.fill_(0.375)  # a value no init would give
    model.save_pretrained(tmp_path / "saved")

    reloads = [
        AutoModelForCausalLM.from_pretrained(tmp_path / "saved"),
        AutoModelForCausalLMWithValueHead.from_pretrained(
            tmp_path / "saved", v_head_init_strategy=strategy, v_head_initializer_range=1.0
        ),
    ]
    for reloaded in reloads:
        assert reloaded.v_head_source.is_loaded
        assert torch.equal(reloaded.v_head.summary.weight, model.v_head.summary.weight)
        assert torch.equal(reloaded.v_head.summary.bias, torch.tensor([0.375]))


# ---------------------------------------------------------------------------------------------------------------------
# 8. HF Trainer and accelerate


def training_arguments(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
        logging_steps=1,
        disable_tqdm=True,
        **overrides,
    )


def run_trainer_and_check(model, args: TrainingArguments, tmp_path) -> None:
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset())
    result = trainer.train()

    assert result.global_step == 3
    assert math.isfinite(result.training_loss)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert {name for name in before if name.startswith("pretrained_model.")} <= changed
    assert not any(name.startswith("v_head.") for name in changed)  # Trainer optimises `output.loss`, the LM loss

    trainer.save_model(str(tmp_path / "trained"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert isinstance(reloaded, AutoModelForCausalLMWithValueHead)
    assert reloaded.v_head_source.is_loaded
    trained = model.state_dict()
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(reloaded_state[name], tensor), name


def test_trainer_trains_and_saves_with_default_arguments(tmp_path):
    model = load_wrapped("llama", tmp_path)
    run_trainer_and_check(model, training_arguments(tmp_path), tmp_path)


def test_accelerator_prepare_and_step_updates_the_value_head(tmp_path):
    model = load_wrapped("llama", tmp_path).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = accelerate.Accelerator(cpu=True)
    prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    inputs = model_inputs("llama")
    head_before = model.v_head.summary.weight.detach().clone()
    lm_before = model.pretrained_model.lm_head.weight.detach().clone()

    output = prepared_model(**inputs, labels=lm_labels("llama", inputs))
    accelerator.backward(output.loss + output.value.pow(2).mean())
    assert model.v_head.summary.weight.grad is not None
    prepared_optimizer.step()
    prepared_optimizer.zero_grad()

    assert accelerator.unwrap_model(prepared_model) is model
    assert not torch.equal(model.v_head.summary.weight, head_before)
    assert not torch.equal(model.pretrained_model.lm_head.weight, lm_before)
    assert math.isfinite(output.loss.item())


# ---------------------------------------------------------------------------------------------------------------------
# wrapping an instance


@pytest.mark.parametrize("construct", ["init", "from_pretrained"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_wrapping_an_instance_keeps_its_attention_implementation(family, construct):
    bare = build_bare(family)
    inputs = model_inputs(family)
    expected = bare(**inputs).logits
    implementation = bare.config._attn_implementation
    if construct == "init":
        model = AutoModelForCausalLMWithValueHead(bare)
    else:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(bare)
    model.eval()

    assert model.pretrained_model is bare
    assert bare.config._attn_implementation == implementation
    assert torch.equal(model(**inputs).logits, expected)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    changed_last_token = torch.tensor([[5, 6, 7, 8, 50]])
    assert torch.equal(model(input_ids=prompt).logits[:, 0], model(input_ids=changed_last_token).logits[:, 0])
