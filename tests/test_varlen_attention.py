"""The varlen attention (issue 16): `attn_implementation="vhead_sdpa_varlen"` runs a packed batch one sequence at a
time and equals the padded sdpa computation, is bit-identical to sdpa on every call that is not packed, falls back to
the dense path for what it does not handle, and is set like any transformers attention without being saved."""

import json
import sys

import pytest
import torch
from test_packing import (
    LENGTHS,
    SUPPORTED,
    bare_of,
    next_token_mask,
    packed_and_padded_gradients,
    padded_batch,
    positions_of,
)
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from transformers_vhead import AutoModelForCausalLMWithValueHead, pack_batch
from transformers_vhead import varlen_attention as varlen
from transformers_vhead.reference import next_token_logprobs
from transformers_vhead.varlen_attention import ATTN_IMPLEMENTATION, sdpa_varlen_attention_forward

ATOL = 1e-5
NO_SDPA = {"gemma2"}  # transformers gives it no sdpa (softcapping), so no sdpa-based implementation either
# falcon with ALiBi gets its position bias through a float mask, which the varlen path does not take: dense
DENSE_FALLBACK = {"falcon_alibi"}
FAMILIES = [family for family in SUPPORTED if family not in NO_SDPA]
VARLEN_FAMILIES = [family for family in FAMILIES if family not in DENSE_FALLBACK]


@pytest.fixture
def varlen_calls(monkeypatch) -> list:
    """A list that gets, for each attention call of the varlen implementation, whether it took the varlen path."""
    calls: list = []
    packed_call = varlen._packed_call

    def spy(*args, **kwargs):
        result = packed_call(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(varlen, "_packed_call", spy)
    return calls


def value_model_of(family: str, attn_implementation: str = "sdpa"):
    torch.manual_seed(1)
    model = AutoModelForCausalLMWithValueHead(bare_of(family)).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def dispatches_attention(model) -> bool:
    """Whether the installed release's modeling file of `model` picks its attention from `AttentionInterface`."""
    return hasattr(sys.modules[type(model).__module__], "ALL_ATTENTION_FUNCTIONS")


def num_layers(model) -> int:
    config = model.pretrained_model.config
    return next(getattr(config, name) for name in ("num_hidden_layers", "n_layer") if hasattr(config, name))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_under_varlen_equals_the_padded_sdpa_batch(family, varlen_calls):
    """Logits, values, log-probs and sequence scores; `compute_logprobs` too. Every family of the matrix passes the
    boundaries down (falcon as position ids only) and takes the varlen path in every layer; mistral's sliding window
    (4, shorter than some sequences) runs each sequence's block of the mask. (A release whose modeling file of a family
    does not dispatch through the `AttentionInterface`, as gptj's in transformers 5.23, leaves it on its own
    attention, with transformers' warning: it runs dense.)"""
    padded_model = value_model_of(family)
    model = value_model_of(family, ATTN_IMPLEMENTATION)
    dispatched = model.pretrained_model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert dispatched == dispatches_attention(model.pretrained_model)
    input_ids, attention_mask = padded_batch("mixed")
    mask, valid = attention_mask.bool(), next_token_mask(attention_mask)
    packed = pack_batch(input_ids, attention_mask)
    with torch.no_grad():
        padded = padded_model(input_ids, attention_mask=attention_mask, position_ids=positions_of(attention_mask))
        expected_scores = padded_model.compute_sequence_scores(input_ids, attention_mask)
        expected = padded_model.compute_logprobs(
            input_ids, attention_mask, position_ids=positions_of(attention_mask), return_values=True
        )
        varlen_calls.clear()
        output = model(**packed)
        took_varlen = list(varlen_calls)
        values = model.compute_values(**packed)
        scores = model.compute_sequence_scores(**packed)
        logprobs_output = model.compute_logprobs(**packed, return_values=True)

    assert took_varlen == ([family not in DENSE_FALLBACK] * num_layers(model) if dispatched else [])
    torch.testing.assert_close(packed.unpack(output.logits)[mask], padded.logits[mask], rtol=0, atol=ATOL)
    torch.testing.assert_close(packed.unpack(output.value)[mask], padded.value[mask], rtol=0, atol=ATOL)
    torch.testing.assert_close(packed.unpack(values)[mask], padded.value[mask], rtol=0, atol=ATOL)
    logprobs = packed.unpack(next_token_logprobs(output.logits, packed.input_ids), next_token=True)
    expected_logprobs = next_token_logprobs(padded.logits, input_ids)
    torch.testing.assert_close(logprobs[valid], expected_logprobs[valid], rtol=0, atol=ATOL)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=ATOL)
    chunked = packed.unpack(logprobs_output.logprobs, next_token=True)
    torch.testing.assert_close(chunked[valid], expected.logprobs[valid], rtol=0, atol=ATOL)
    torch.testing.assert_close(packed.unpack(logprobs_output.value)[mask], expected.value[mask], rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_ordinary_batches_are_bit_identical_to_sdpa(family, varlen_calls):
    """A padded batch, one unpadded sequence, and a packed batch's one sequence: the dense path, sdpa's own."""
    sdpa_model = value_model_of(family)
    model = value_model_of(family, ATTN_IMPLEMENTATION)
    input_ids, attention_mask = padded_batch("mixed")
    one = pack_batch(input_ids[:1], attention_mask[:1])
    with torch.no_grad():
        for inputs in (
            {"input_ids": input_ids, "attention_mask": attention_mask},
            {"input_ids": input_ids[:, :3]},
            dict(one),
        ):
            expected, output = sdpa_model(**inputs), model(**inputs)
            assert torch.equal(output.logits, expected.logits) and torch.equal(output.value, expected.value)
        expected = sdpa_model.compute_logprobs(input_ids, attention_mask, return_values=True)
        output = model.compute_logprobs(input_ids, attention_mask, return_values=True)
    assert torch.equal(output.logprobs, expected.logprobs) and torch.equal(output.value, expected.value)
    assert not any(varlen_calls)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_gradients_through_a_packed_batch_under_varlen_equal_the_padded_batchs(family):
    """Through GQA (both) and a sliding window (mistral)."""
    packed_gradients, padded_gradients = packed_and_padded_gradients(
        lambda packed: value_model_of(family, ATTN_IMPLEMENTATION if packed else "sdpa")
    )
    assert packed_gradients.keys() == padded_gradients.keys()
    for name, gradient in padded_gradients.items():
        torch.testing.assert_close(packed_gradients[name], gradient, rtol=0, atol=ATOL, msg=name)


def test_position_ids_alone_give_the_boundaries(varlen_calls):
    """A packed batch without the FlashAttentionKwargs (DataCollatorWithFlattening's default) takes the varlen path
    from the position ids that reach the attention."""
    model = value_model_of("llama", ATTN_IMPLEMENTATION)
    packed = pack_batch(*padded_batch("right"))
    with torch.no_grad():
        expected = model(**packed)
        varlen_calls.clear()
        output = model(input_ids=packed.input_ids, position_ids=packed.position_ids)
    assert varlen_calls == [True] * num_layers(model)
    assert torch.equal(output.logits, expected.logits) and torch.equal(output.value, expected.value)


def attention_inputs(seed: int = 0):
    """A packed row's query, key and value `(1, heads, T, 8)` (GQA: 4 query heads, 2 key/value heads), the dense
    mask transformers builds for it, and its cumulative lengths."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    total = int(lengths.sum())
    query = torch.randn(1, 4, total, 8, generator=generator)
    key, value = (torch.randn(1, 2, total, 8, generator=generator) for _ in range(2))
    sequence = torch.repeat_interleave(torch.arange(len(LENGTHS)), lengths)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = (causal & (sequence[:, None] == sequence[None, :]))[None, None]
    cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return query, key, value, mask, cu_seq_lens


class Attention(torch.nn.Module):
    num_key_value_groups = 2

    def __init__(self, is_causal: bool = True):
        super().__init__()
        self.is_causal = is_causal


@pytest.mark.parametrize(
    "case",
    [
        "no boundaries",
        "boundaries the mask disagrees with",
        "boundaries of another row",
        "other key boundaries",
        "non-causal module",
        "float mask",
        "a cache",
    ],
)
def test_calls_the_varlen_path_does_not_handle_run_sdpa_exactly(case):
    """A family whose attention gets no boundaries, boundaries that are not the mask's or not the row's, other ones
    for the keys, a bidirectional module, a float (ALiBi) mask, a cache: transformers' sdpa, bit for bit."""
    query, key, value, mask, cu_seq_lens = attention_inputs()
    module, kwargs = Attention(), {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens}
    if case == "no boundaries":
        kwargs = {}
    elif case == "boundaries the mask disagrees with":
        kwargs = {"cu_seq_lens_q": cu_seq_lens[[0, 1, 3, 4]], "cu_seq_lens_k": cu_seq_lens[[0, 1, 3, 4]]}
    elif case == "boundaries of another row":
        kwargs = {"cu_seq_lens_q": cu_seq_lens[:-1], "cu_seq_lens_k": cu_seq_lens[:-1]}
    elif case == "other key boundaries":
        kwargs["cu_seq_lens_k"] = cu_seq_lens[[0, 1, 3, 4]]
    elif case == "non-causal module":
        module = Attention(is_causal=False)
    elif case == "float mask":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    elif case == "a cache":
        kwargs["past_key_values"] = object()
    output, _ = sdpa_varlen_attention_forward(module, query, key, value, mask, scaling=0.3, **kwargs)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3, **kwargs)
    assert torch.equal(output, expected)


def test_softcapping_is_refused_as_sdpa_refuses_it():
    query, key, value, mask, cu_seq_lens = attention_inputs()
    with pytest.raises(ValueError, match="does not support `softcap`"):
        sdpa_varlen_attention_forward(
            Attention(), query, key, value, mask, softcap=5.0, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens
        )


def test_the_varlen_path_uses_the_modules_scaling_and_gqa():
    query, key, value, mask, cu_seq_lens = attention_inputs()
    output, _ = sdpa_varlen_attention_forward(
        Attention(), query, key, value, mask, scaling=0.3, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens
    )
    expected, _ = sdpa_attention_forward(Attention(), query, key, value, mask, scaling=0.3)
    assert output.shape == expected.shape == (1, sum(LENGTHS), 4, 8)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)


def test_a_family_without_sdpa_is_refused_the_implementation():
    model = AutoModelForCausalLMWithValueHead(bare_of("gemma2"))
    with pytest.raises(ValueError, match="does not support an attention implementation through"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def test_from_pretrained_and_set_attn_implementation_both_set_it(llama_dir, tmp_path):
    """On the value-head class (from a plain LM), through the auto class (from a value-head checkpoint), and switched
    after loading: down to every attention module's config, with the same values."""
    AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir).save_pretrained(tmp_path / "value-head")
    loaded = [
        AutoModelForCausalLMWithValueHead.from_pretrained(
            tmp_path / "value-head", attn_implementation=ATTN_IMPLEMENTATION
        ),
        AutoModelForCausalLM.from_pretrained(tmp_path / "value-head", attn_implementation=ATTN_IMPLEMENTATION),
    ]
    switched = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "value-head")
    assert switched.pretrained_model.config._attn_implementation == "sdpa"
    switched.set_attn_implementation(ATTN_IMPLEMENTATION)
    fresh = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, attn_implementation=ATTN_IMPLEMENTATION)
    for model in [*loaded, switched, fresh]:
        assert isinstance(model, AutoModelForCausalLMWithValueHead)
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        attention = [module for name, module in model.named_modules() if name.endswith("self_attn")]
        assert attention and all(module.config._attn_implementation == ATTN_IMPLEMENTATION for module in attention)
    packed = pack_batch(*padded_batch("left"))
    with torch.no_grad():
        values = [model.compute_values(**packed) for model in [*loaded, switched]]
    assert all(torch.equal(value, values[0]) for value in values)


def test_the_implementation_is_not_saved(llama_dir, tmp_path):
    """transformers does not write `_attn_implementation` to config.json: a reload (with or without this package)
    gets its default, sdpa."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, attn_implementation=ATTN_IMPLEMENTATION)
    model.save_pretrained(tmp_path / "value-head")
    model.pretrained_model.save_pretrained(tmp_path / "bare")
    for directory in ("value-head", "bare"):
        saved = json.loads((tmp_path / directory / "config.json").read_text())
        assert ATTN_IMPLEMENTATION not in json.dumps(saved)
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "value-head")
    bare = AutoModelForCausalLM.from_pretrained(tmp_path / "bare")
    assert reloaded.pretrained_model.config._attn_implementation == bare.config._attn_implementation == "sdpa"
    input_ids, attention_mask = padded_batch("mixed")
    with torch.no_grad():
        assert torch.equal(
            reloaded.compute_values(input_ids, attention_mask), model.compute_values(input_ids, attention_mask)
        )
