"""Log-probs and entropy without the full logits: `compute_logprobs`, and `forward_with_reference(return_logits=False)`,
against the full path (the model's own logits, `log_softmax`) in every family of the architecture matrix."""

from __future__ import annotations

import pytest
import torch
from architectures import FAMILIES, VOCAB_SIZE
from conftest import build_bare, is_seq2seq, model_inputs, policy_lora, value_head_class
from torch import nn
from transformers.utils import logging

from transformers_vhead import AutoModelForCausalLMWithValueHead, LogProbsOutput, create_reference_model
from transformers_vhead import logprobs as logprobs_module
from transformers_vhead.capture import final_hidden_state
from transformers_vhead.errors import InvalidLogProbsSettingError, TokenIdOutOfRangeError
from transformers_vhead.logprobs import LOGIT_TRANSFORMS, default_chunk_size

TEMPERATURE = 0.7


def policy_of(family: str, dtype: torch.dtype = torch.float32, num_layers: int = 2, **config):
    """A value-head model of `family` in eval mode, with every bias of its LM head random (GPT-J's `lm_head.bias`,
    BART's and Pegasus' `final_logits_bias` start at zero, where a mistake in adding them would not show)."""
    bare = build_bare(family, num_layers=num_layers)
    for name, value in config.items():
        setattr(bare.config, name, value)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in [*bare.named_parameters(), *bare.named_buffers()]:
            if name.endswith(("lm_head.bias", "final_logits_bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return value_head_class(family)(bare.to(dtype)).eval()


def tokens_of(family: str, inputs: dict) -> torch.Tensor:
    return inputs["decoder_input_ids"] if is_seq2seq(family) else inputs["input_ids"]


def full_path(model, inputs: dict, tokens: torch.Tensor, temperature: float = TEMPERATURE):
    """The reference computation: the model's own fp32 logits, divided by the temperature, `log_softmax`."""
    output = model(**inputs)
    logits = output.logits[:, :-1].float() / temperature
    logprobs = logits.log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1), entropy, output.value


def ppo_like_loss(logprobs, entropy, value):
    """What a PPO step backpropagates: log-probs times advantages, an entropy bonus, a value loss."""
    generator = torch.Generator().manual_seed(2)
    advantages = torch.randn(logprobs.shape, generator=generator)
    returns = torch.randn(value.shape, generator=generator)
    return -(logprobs * advantages).mean() - 0.01 * entropy.mean() + 0.5 * ((value - returns) ** 2).mean()


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("chunk_size", "vocab_block"), [(None, None), (5, None), (1, None), (5, 40)])
def test_logprobs_entropy_and_values_equal_the_full_logits_path_in_every_family(
    family, chunk_size, vocab_block, monkeypatch
):
    """`vocab_block=40`: the vocabulary (96) in three blocks, the last a short one, reduced by the online logsumexp."""
    if vocab_block is not None:
        monkeypatch.setattr(logprobs_module, "VOCAB_BLOCK", vocab_block)
    model = policy_of(family)
    inputs = model_inputs(family)
    tokens = tokens_of(family, inputs)
    assert tokens[:, 1:].numel() % 5  # 5 does not divide the positions: the last chunk is a short one
    with torch.no_grad():
        expected_logprobs, expected_entropy, _ = full_path(model, inputs, tokens)
        output = model.compute_logprobs(
            **inputs, temperature=TEMPERATURE, return_entropy=True, return_values=True, chunk_size=chunk_size
        )
        values = model.compute_values(**inputs)

    assert isinstance(output, LogProbsOutput)
    assert output.logprobs.dtype == output.entropy.dtype == torch.float32
    assert output.logprobs.shape == output.entropy.shape == (tokens.shape[0], tokens.shape[1] - 1)
    torch.testing.assert_close(output.logprobs, expected_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.entropy, expected_entropy, rtol=0, atol=1e-5)
    assert torch.equal(output.value, values)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("vocab_block", [None, 40])
def test_the_chunked_path_computes_one_chunk_of_logits_at_a_time(family, vocab_block, monkeypatch, caplog):
    if vocab_block is not None:
        monkeypatch.setattr(logprobs_module, "VOCAB_BLOCK", vocab_block)
    model = policy_of(family)
    inputs = model_inputs(family)
    positions = tokens_of(family, inputs)[:, 1:].numel()
    head, linear, shapes = model.get_output_embeddings(), nn.functional.linear, []

    def recording_linear(input, weight, bias=None):
        output = linear(input, weight, bias)
        if weight is head.weight or weight._base is head.weight:  # the head, or a block of its rows
            shapes.append(tuple(output.shape))
        return output

    monkeypatch.setattr(nn.functional, "linear", recording_linear)
    with caplog.at_level(logging.WARNING):
        output = model.compute_logprobs(**inputs, return_entropy=True, return_values=True, chunk_size=4)
        forward = list(shapes)
        ppo_like_loss(output.logprobs, output.entropy, output.value).backward()
    # the LM head runs on 4 positions (by a block of the vocabulary) at a time in the forward, and again in the
    # backward; never on all of them
    block = vocab_block or VOCAB_SIZE
    widths = [min(block, VOCAB_SIZE - start) for start in range(0, VOCAB_SIZE, block)]
    chunks = [(min(4, positions - start), width) for start in range(0, positions, 4) for width in widths]
    assert forward == chunks and shapes == chunks * 2
    assert "full logits" not in caplog.text


def test_every_family_of_the_matrix_has_its_logit_transform_known():
    for family in FAMILIES:
        assert policy_of(family).config.text_config.model_type in LOGIT_TRANSFORMS


@pytest.mark.parametrize(
    ("family", "config"),
    [
        *((family, {}) for family in FAMILIES),
        ("llama", {"tie_word_embeddings": True}),  # a tied LM head (llama's is untied by default)
    ],
)
@pytest.mark.parametrize("vocab_block", [None, 40])
def test_gradients_of_a_ppo_loss_equal_the_full_paths(family, config, vocab_block, monkeypatch):
    if vocab_block is not None:
        monkeypatch.setattr(logprobs_module, "VOCAB_BLOCK", vocab_block)
    model = policy_of(family)
    if config:
        bare = model.pretrained_model
        bare.config.tie_word_embeddings = True
        bare.tie_weights()
        assert bare.get_output_embeddings().weight is bare.get_input_embeddings().weight
    inputs = model_inputs(family)
    tokens = tokens_of(family, inputs)
    expected = gradients(model, ppo_like_loss(*full_path(model, inputs, tokens)))
    output = model.compute_logprobs(
        **inputs, temperature=TEMPERATURE, return_entropy=True, return_values=True, chunk_size=5
    )
    found = gradients(model, ppo_like_loss(output.logprobs, output.entropy, output.value))

    assert found.keys() == expected.keys()
    head = model.get_output_embeddings()
    assert any(grad is not None for grad in (head.weight.grad,))  # the LM head is trained through the chunks
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=0, atol=1e-5, msg=name)


def test_gradients_of_the_logprobs_alone_and_of_the_entropy_alone_are_right():
    model = policy_of("gemma2")  # a soft cap: the transform's derivative is not a constant
    inputs = model_inputs("gemma2")
    tokens = inputs["input_ids"]
    for pick in (0, 1):
        expected = gradients(model, full_path(model, inputs, tokens)[pick].sum())
        output = model.compute_logprobs(**inputs, temperature=TEMPERATURE, return_entropy=True, chunk_size=3)
        found = gradients(model, (output.logprobs, output.entropy)[pick].sum())
        for name in expected:
            torch.testing.assert_close(found[name], expected[name], rtol=0, atol=1e-5, msg=name)


def test_a_bf16_model_gives_the_full_paths_logprobs_and_fp32_accumulated_head_gradients():
    model = policy_of("llama", torch.bfloat16)  # an untied LM head: its gradient comes from the log-probs alone
    exact = policy_of("llama")
    exact.load_state_dict({key: value.float() for key, value in model.state_dict().items()})  # the same numbers
    inputs = model_inputs("llama", length=24)
    tokens = inputs["input_ids"]
    head = model.get_output_embeddings().weight

    full_logprobs, full_entropy, full_value = full_path(model, inputs, tokens)
    full = gradients(model, ppo_like_loss(full_logprobs, full_entropy, full_value))["pretrained_model.lm_head.weight"]
    output = model.compute_logprobs(**inputs, temperature=TEMPERATURE, return_entropy=True, return_values=True)
    chunked = gradients(model, ppo_like_loss(output.logprobs, output.entropy, output.value))
    with torch.no_grad():
        fp32_logprobs = full_path(exact, inputs, tokens)[0]

    # Both paths round the same logits to bf16 (the LM head in the model's dtype) and reduce them in fp32, in another
    # order: equal to fp32 rounding (measured 1e-6). Against the fp32 model, the bf16 forward's own error (1e-3).
    assert output.logprobs.dtype == output.entropy.dtype == torch.float32
    torch.testing.assert_close(output.logprobs, full_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.entropy, full_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.logprobs, fp32_logprobs, rtol=0, atol=2e-2)
    assert torch.equal(output.value, full_value)

    # The exact gradient of the head (fp64) for the same bf16 hidden state and bf16-rounded logits (the rounding's
    # derivative taken as 1, as autograd does): summed over the chunks in fp32 and rounded to bf16 once, ours is that
    # gradient correctly rounded (within 1% of one bf16 rounding of it); the bf16 full path, whose gradient of the
    # logits is rounded to bf16 before its matmul, is further off.
    with torch.no_grad(), final_hidden_state(model.pretrained_model.get_decoder(), stop=True) as captured:
        model.pretrained_model(**inputs)  # the hidden state both paths computed (the forward is deterministic)
    hidden = captured[-1][:, :-1].double()
    weight = head.detach().double().requires_grad_()
    logits = hidden @ weight.T
    rounded = nn.functional.linear(captured[-1][:, :-1], head.detach()).double()
    logits = (logits + (rounded - logits).detach()) / TEMPERATURE
    logprobs = logits.log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    loss = ppo_like_loss(logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1), entropy, output.value.detach())
    (exact_grad,) = torch.autograd.grad(loss, weight)
    ours = chunked["pretrained_model.lm_head.weight"]
    assert ours.dtype == torch.bfloat16
    one_rounding = (exact_grad.bfloat16().double() - exact_grad).norm()
    assert (ours.double() - exact_grad).norm() <= 1.01 * one_rounding
    assert (ours.double() - exact_grad).norm() < (full.double() - exact_grad).norm()


def test_a_lora_on_the_lm_head_falls_back_to_the_full_logits_warning_once(llama_dir, caplog):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(target_modules=["q_proj", "v_proj", "lm_head"])
    ).eval()
    inputs = model_inputs("llama")
    tokens = inputs["input_ids"]
    with torch.no_grad():
        expected_logprobs, expected_entropy, expected_value = full_path(model, inputs, tokens)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            output = model.compute_logprobs(**inputs, temperature=TEMPERATURE, return_entropy=True, return_values=True)
    assert caplog.text.count("computed from its full logits") == 1
    assert "not a torch.nn.Linear (e.g. a PEFT adapter on it)" in caplog.text
    assert "memory saving of the chunked path" in caplog.text
    torch.testing.assert_close(output.logprobs, expected_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.entropy, expected_entropy, rtol=0, atol=1e-5)
    assert torch.equal(output.value, expected_value)

    # gradients reach the LoRA on the LM head through the model's own forward
    ppo_like_loss(output.logprobs, output.entropy, output.value).backward()
    assert any(
        "lm_head.lora_B" in name and parameter.grad is not None and parameter.grad.abs().sum() > 0
        for name, parameter in model.named_parameters()
    )


def test_a_hook_on_the_lm_head_is_honoured_by_falling_back(caplog):
    model = policy_of("llama")
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: output * 3)
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected, _, _ = full_path(model, inputs, inputs["input_ids"])
        with caplog.at_level(logging.WARNING):
            output = model.compute_logprobs(**inputs, temperature=TEMPERATURE)
    assert "its LM head has forward hooks" in caplog.text
    torch.testing.assert_close(output.logprobs, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_with_reference_without_logits_equals_the_full_logits_call(family):
    policy = policy_of(family, num_layers=4)
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs(family)
    ran = []  # the reference's shared layers replay the policy's output: their submodules do not run
    for name, module in reference.get_submodule(reference.shared_trunk.layers)[0].named_modules():
        if name:
            module.register_forward_pre_hook(lambda module, args: ran.append(module))
    settings = {"return_logprobs": True, "temperature": TEMPERATURE, "return_entropy": True}
    with torch.no_grad():
        expected = policy.forward_with_reference(reference, **inputs, **settings)
        output = policy.forward_with_reference(reference, **inputs, **settings, return_logits=False)

    assert output.logits is None and output.ref_logits is None
    assert expected.logits is not None and not ran
    for name in ("logprobs", "ref_logprobs", "entropy"):
        torch.testing.assert_close(getattr(output, name), getattr(expected, name), rtol=0, atol=1e-5, msg=name)
    assert torch.equal(output.value, expected.value)
    _, expected_entropy, _ = full_path(policy, inputs, tokens_of(family, inputs))
    torch.testing.assert_close(output.entropy, expected_entropy, rtol=0, atol=1e-5)


def test_forward_with_reference_without_logits_backpropagates_like_compute_logprobs():
    policy = policy_of("llama", num_layers=4)
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs("llama")
    output = policy.forward_with_reference(reference, **inputs, return_logprobs=True, return_logits=False)
    expected = policy.compute_logprobs(**inputs, return_values=True)
    assert output.entropy is None and not output.ref_logprobs.requires_grad
    found = gradients(policy, (output.logprobs - output.ref_logprobs).sum() + output.value.sum())
    wanted = gradients(policy, (expected.logprobs - output.ref_logprobs).sum() + expected.value.sum())
    assert found.keys() == wanted.keys() and found
    for name in wanted:
        torch.testing.assert_close(found[name], wanted[name], rtol=0, atol=1e-6, msg=name)


def test_forward_with_reference_without_logits_needs_logprobs_and_no_labels():
    policy = policy_of("llama", num_layers=4)
    reference = create_reference_model(policy, num_shared_layers=2)
    inputs = model_inputs("llama")
    with pytest.raises(ValueError, match="pass return_logprobs=True"):
        policy.forward_with_reference(reference, **inputs, return_logits=False)
    with pytest.raises(ValueError, match="no `labels`"):
        policy.forward_with_reference(
            reference, **inputs, labels=inputs["input_ids"], return_logprobs=True, return_logits=False
        )
    with pytest.raises(InvalidLogProbsSettingError, match="temperature must be a finite number above 0"):
        policy.forward_with_reference(reference, **inputs, return_logprobs=True, temperature=0)


def test_reference_logprobs_of_a_peft_policy_are_unchanged(llama_dir):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora()).eval()
    inputs = model_inputs("llama")
    with torch.no_grad(), policy.as_reference():
        logits = policy(**inputs).logits
    expected = logits[:, :-1].log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    found = policy.compute_reference_logprobs(**inputs)
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(policy.compute_logprobs(**inputs).logprobs, found)  # the adapter is on again


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), "1.0", True, None])
def test_a_temperature_that_is_not_above_zero_is_refused(temperature):
    model = policy_of("llama")
    with pytest.raises(InvalidLogProbsSettingError, match="temperature must be a finite number above 0") as raised:
        model.compute_logprobs(**model_inputs("llama"), temperature=temperature)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("chunk_size", [0, -3, 1.5, True, "8"])
def test_a_chunk_size_that_is_not_a_whole_number_of_positions_is_refused(chunk_size):
    model = policy_of("llama")
    with pytest.raises(InvalidLogProbsSettingError, match="chunk_size must be a whole number of positions"):
        model.compute_logprobs(**model_inputs("llama"), chunk_size=chunk_size)


def test_inputs_are_checked_before_the_model_runs():
    model = policy_of("llama")
    ran = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: ran.append(module))
    inputs = model_inputs("llama")
    inputs["input_ids"][1, 3] = VOCAB_SIZE
    with pytest.raises(TokenIdOutOfRangeError, match="input_ids"):
        model.compute_logprobs(**inputs)
    assert not ran
    with pytest.raises(ValueError, match="no cache and no `labels`"):
        model.compute_logprobs(**model_inputs("llama"), labels=inputs["input_ids"])
    with pytest.raises(ValueError, match="need `decoder_input_ids`"):
        policy_of("bart").compute_logprobs(**{**model_inputs("bart"), "decoder_input_ids": None})


def test_position_ids_reach_the_wrapped_model():
    model = policy_of("llama")
    input_ids = model_inputs("llama")["input_ids"][1:]
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])  # two sequences packed in one row, as a packed batch gives
    with torch.no_grad():
        expected, _, value = full_path(model, {"input_ids": input_ids, "position_ids": position_ids}, input_ids, 1.0)
        output = model.compute_logprobs(input_ids, position_ids=position_ids, return_values=True)
        unpacked = model.compute_logprobs(input_ids)
    torch.testing.assert_close(output.logprobs, expected, rtol=0, atol=1e-5)
    assert torch.equal(output.value, value)
    assert not torch.allclose(output.logprobs, unpacked.logprobs)


def test_the_default_chunk_is_about_sixteen_mib_of_fp32_logits():
    assert default_chunk_size(4096) == 1024  # a vocabulary of one block: 4096 x 1024 x 4 bytes
    assert default_chunk_size(32000) == default_chunk_size(256_000) == 512  # blocks of 8192: 8192 x 512 x 4 bytes
