"""Padding-free (packed) batches (issue 16, item 2): `pack_batch` and `PackedBatch.unpack`, the calls on a packed batch
equal to the padded computation, the architectures that cannot run one refused by name (and checked to really differ),
malformed packed batches refused before any work."""

import re
from pathlib import Path

import pytest
import torch
import transformers
from architectures import CAUSAL_FAMILIES, SEQ2SEQ_FAMILIES, VOCAB_SIZE, tiny_config
from conftest import build_bare, policy_lora
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

from transformers_vhead import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PackedBatch,
    create_reference_model,
    pack_batch,
)
from transformers_vhead.errors import (
    EmptySequenceError,
    InvalidInputError,
    InvalidPackedBatchError,
    PackedBatchNotSupportedError,
)
from transformers_vhead.packing import unsupported_reason
from transformers_vhead.reference import next_token_logprobs

FLASH_ATTN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
LENGTHS = (5, 2, 7, 1)  # a sequence of one token has no next token
SEQ = 7
ATOL = 1e-5

# Families outside the matrix whose entry in the table (or absence from it) is checked here too.
EXTRA_FAMILIES = {
    "mpt": transformers.MptConfig(vocab_size=VOCAB_SIZE, d_model=32, n_layers=2, n_heads=4),
    "falcon_alibi": transformers.FalconConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True
    ),
}


def refused(family: str) -> bool:
    """Whether packing refuses `family` on the installed release (the table, or a mask built without position ids)."""
    config = EXTRA_FAMILIES[family] if family in EXTRA_FAMILIES else tiny_config(family)
    return unsupported_reason(config) is not None


SUPPORTED = [family for family in [*CAUSAL_FAMILIES, "falcon_alibi"] if not refused(family)]
UNSUPPORTED_CAUSAL = [family for family in [*CAUSAL_FAMILIES, *EXTRA_FAMILIES] if refused(family)]


def padded_batch(padding: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `LENGTHS` tokens padded to `SEQ` with pad id 0: on the left, on the right, or a mix of both."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        left = padding == "left" or (padding == "mixed" and row % 2 == 0)
        span = slice(SEQ - length, SEQ) if left else slice(0, length)
        input_ids[row, span] = torch.randint(3, VOCAB_SIZE, (length,), generator=generator)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids of a padded batch, from its mask: each sequence numbered from 0, as when packed."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(batch, seq - 1)`: where entry `t` (token `t + 1` given those up to `t`) is within one sequence."""
    mask = attention_mask.bool()
    return mask[:, 1:] & mask[:, :-1]


def bare_of(family: str, seed: int = 0):
    if family in EXTRA_FAMILIES:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(EXTRA_FAMILIES[family]).eval()
    return build_bare(family, seed)


def value_model_of(family: str):
    torch.manual_seed(1)
    return AutoModelForCausalLMWithValueHead(bare_of(family)).eval()


def entry_points(model) -> list:
    """The calls that take a packed batch: forward, values, scores (and the log-probs, once they are in)."""
    calls = [model, model.compute_values, model.compute_sequence_scores]
    return calls + ([model.compute_logprobs] if hasattr(model, "compute_logprobs") else [])


def count_forwards(model) -> list:
    """A list that gets an entry each time the wrapped model's embedding runs."""
    calls: list = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("padding", ["left", "right", "mixed"])
def test_pack_and_unpack_round_trip_bit_exact(padding):
    input_ids, attention_mask = padded_batch(padding)
    packed = pack_batch(input_ids, attention_mask)
    rows = [input_ids[row][attention_mask[row].bool()] for row in range(len(LENGTHS))]

    assert isinstance(packed, PackedBatch) and set(packed) == {"input_ids", "position_ids", *FLASH_ATTN_KWARGS}
    assert torch.equal(packed.input_ids, torch.cat(rows)[None])
    assert torch.equal(packed.position_ids, torch.cat([torch.arange(length) for length in LENGTHS])[None])
    assert packed.lengths.tolist() == list(LENGTHS) and packed.num_sequences == len(LENGTHS)
    assert torch.equal(packed.to("cpu").unpack(packed.input_ids), packed.unpack(packed.input_ids))
    assert torch.equal(packed.unpack(packed.input_ids, fill=-1), input_ids.masked_fill(~attention_mask.bool(), -1))
    assert all(torch.equal(part, row) for part, row in zip(packed.split(packed.input_ids), rows, strict=True))
    # the FlashAttentionKwargs, as transformers' collator makes them
    flattened = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": row.tolist()} for row in rows])
    for name in FLASH_ATTN_KWARGS:
        assert torch.equal(torch.as_tensor(packed[name]), torch.as_tensor(flattened[name])), name
    assert packed["cu_seq_lens_q"].dtype == flattened["cu_seq_lens_q"].dtype == torch.int32
    # a trailing dimension (logits), and a next-token result: entry t codes the pair (token t, token t + 1)
    features = torch.stack([packed.input_ids, -packed.input_ids], dim=-1)
    assert torch.equal(packed.unpack(features)[..., 1], -packed.unpack(packed.input_ids))
    pairs = packed.input_ids[:, :-1] * 1000 + packed.input_ids[:, 1:]
    expected = (input_ids[:, :-1] * 1000 + input_ids[:, 1:]).masked_fill(~next_token_mask(attention_mask), -1)
    assert torch.equal(packed.unpack(pairs, fill=-1, next_token=True), expected)


def test_unpack_says_which_kind_of_result_it_expects():
    packed = pack_batch(*padded_batch("mixed"))
    total = sum(LENGTHS)
    with pytest.raises(InvalidInputError, match=r"pass next_token=True"):
        packed.unpack(torch.zeros(1, total - 1))
    with pytest.raises(InvalidInputError, match=r"leave next_token off"):
        packed.unpack(torch.zeros(1, total), next_token=True)


def test_pack_batch_refuses_empty_rows_and_masks_with_holes():
    input_ids, attention_mask = padded_batch("right")
    empty = attention_mask.clone()
    empty[1] = 0
    with pytest.raises(EmptySequenceError, match=r"Row\(s\) \[1\]"):
        pack_batch(input_ids, empty)
    holes = attention_mask.clone()
    holes[2, 3] = 0
    with pytest.raises(InvalidInputError, match=r"Row\(s\) \[2\] of the attention mask have holes"):
        pack_batch(input_ids, holes)


@pytest.mark.parametrize("family", SUPPORTED)
def test_packed_batch_equals_the_padded_computation(family):
    """Logits, values, log-probs and sequence scores of the packed batch equal the padded batch's (with position ids
    from its mask) within 1e-5, under the model's default attention (sdpa; eager for gemma2, which has no sdpa)."""
    model = value_model_of(family)
    input_ids, attention_mask = padded_batch("mixed")
    mask = attention_mask.bool()
    packed = pack_batch(input_ids, attention_mask)
    with torch.no_grad():
        padded = model(input_ids, attention_mask=attention_mask, position_ids=positions_of(attention_mask))
        output = model(**packed)
        values = model.compute_values(**packed)
        scores = model.compute_sequence_scores(**packed)
        expected_scores = model.compute_sequence_scores(input_ids, attention_mask)

    assert output.value.shape == (1, sum(LENGTHS)) and scores.shape == (len(LENGTHS),)
    torch.testing.assert_close(packed.unpack(output.logits)[mask], padded.logits[mask], rtol=0, atol=ATOL)
    torch.testing.assert_close(packed.unpack(output.value)[mask], padded.value[mask], rtol=0, atol=ATOL)
    torch.testing.assert_close(values, output.value, rtol=0, atol=ATOL)
    logprobs = packed.unpack(next_token_logprobs(output.logits, packed.input_ids), next_token=True)
    expected_logprobs = next_token_logprobs(padded.logits, input_ids)
    valid = next_token_mask(attention_mask)
    torch.testing.assert_close(logprobs[valid], expected_logprobs[valid], rtol=0, atol=ATOL)
    assert (logprobs[~valid] == 0).all()
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", UNSUPPORTED_CAUSAL)
def test_unsupported_families_really_differ_packed_and_are_refused_by_name(family):
    """What the table says: the bare model run packed gives other logits than each sequence alone, so the value-head
    model refuses a packed batch of several sequences (one unpadded sequence with position ids still runs)."""
    bare = bare_of(family)
    input_ids, attention_mask = padded_batch("right")
    packed = pack_batch(input_ids, attention_mask)
    with torch.no_grad():
        packed_logits = bare(**packed, use_cache=False).logits
        alone = [bare(input_ids=row[None]).logits[0] for row in packed.split(packed.input_ids)]
    assert (packed_logits[0] - torch.cat(alone)).abs().max() > 1e-3

    model = AutoModelForCausalLMWithValueHead(bare).eval()
    calls = count_forwards(model)
    for call in entry_points(model):
        with pytest.raises(PackedBatchNotSupportedError, match=f"{bare.config.model_type} cannot run"):
            call(**packed)
    assert calls == []
    one = pack_batch(input_ids[:1], attention_mask[:1])
    torch.testing.assert_close(model.compute_values(**one), model.compute_values(one.input_ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_encoder_decoder_models_are_refused_a_packed_batch(family):
    """Their encoder attends in both directions over the whole row: packed sequences see each other."""
    bare = build_bare(family)
    input_ids, attention_mask = padded_batch("right")
    packed = pack_batch(input_ids, attention_mask)
    with torch.no_grad():
        together = bare.get_encoder()(input_ids=packed.input_ids).last_hidden_state[0]
        alone = [bare.get_encoder()(input_ids=row[None]).last_hidden_state[0] for row in packed.split(packed.input_ids)]
    assert (together - torch.cat(alone)).abs().max() > 1e-3

    model = AutoModelForSeq2SeqLMWithValueHead(bare).eval()
    decoder_input_ids = torch.randint(3, VOCAB_SIZE, (1, 4))
    with pytest.raises(PackedBatchNotSupportedError, match="encoder-decoder"):
        model(**packed, decoder_input_ids=decoder_input_ids)


def test_a_batch_from_transformers_data_collator_with_flattening_runs_the_same():
    model = value_model_of("llama")
    input_ids, attention_mask = padded_batch("left")
    packed = pack_batch(input_ids, attention_mask)
    features = [{"input_ids": part.tolist()} for part in packed.split(packed.input_ids)]
    batch = DataCollatorWithFlattening()(features)
    assert torch.equal(batch["input_ids"], packed.input_ids) and torch.equal(batch["position_ids"], packed.position_ids)
    with torch.no_grad():
        output = model(**batch)  # with the collator's labels: the LM loss, each sequence's first token left out
        expected = model(**packed)
        scores = model.compute_sequence_scores(batch["input_ids"], position_ids=batch["position_ids"])
    assert torch.equal(output.value, expected.value) and torch.equal(output.logits, expected.logits)
    assert output.loss is not None and torch.isfinite(output.loss)
    assert torch.equal(scores, model.compute_sequence_scores(**packed))


def test_reward_adapter_scores_packed_equal_padded(llama_dir, reward_adapter_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(), reward_adapter=reward_adapter_dir
    ).eval()
    input_ids, attention_mask = padded_batch("mixed")
    mask = attention_mask.bool()
    packed = pack_batch(input_ids, attention_mask)

    scores, token_scores = model.compute_sequence_scores(**packed, return_token_scores=True)
    expected, expected_tokens = model.compute_sequence_scores(input_ids, attention_mask, return_token_scores=True)
    assert scores.shape == (len(LENGTHS),) and model.active_adapters() == ["default"]
    torch.testing.assert_close(scores, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(packed.unpack(token_scores)[mask], expected_tokens[mask], rtol=0, atol=ATOL)
    per_token = model.compute_reward_score(**packed)
    padded = model.compute_reward_score(input_ids, attention_mask, position_ids=positions_of(attention_mask))
    torch.testing.assert_close(packed.unpack(per_token)[mask], padded[mask], rtol=0, atol=ATOL)
    # the reference (adapter off) through the same packed batch
    reference = packed.unpack(model.compute_reference_logprobs(**packed), next_token=True)
    expected_reference = model.compute_reference_logprobs(
        input_ids, attention_mask=attention_mask, position_ids=positions_of(attention_mask)
    )
    valid = next_token_mask(attention_mask)
    torch.testing.assert_close(reference[valid], expected_reference[valid], rtol=0, atol=ATOL)


def test_forward_with_reference_on_a_packed_batch_equals_padded():
    model = value_model_of("llama")
    reference = create_reference_model(model, num_shared_layers=1)
    input_ids, attention_mask = padded_batch("mixed")
    packed = pack_batch(input_ids, attention_mask)
    with torch.no_grad():
        output = model.forward_with_reference(reference, **packed, return_logprobs=True)
        expected = model.forward_with_reference(
            reference,
            input_ids,
            attention_mask=attention_mask,
            position_ids=positions_of(attention_mask),
            return_logprobs=True,
        )
    valid, mask = next_token_mask(attention_mask), attention_mask.bool()
    for name in ("logprobs", "ref_logprobs"):
        unpacked = packed.unpack(output[name], next_token=True)
        torch.testing.assert_close(unpacked[valid], expected[name][valid], rtol=0, atol=ATOL, msg=name)
    torch.testing.assert_close(packed.unpack(output.value)[mask], expected.value[mask], rtol=0, atol=ATOL)


def test_compute_logprobs_on_a_packed_batch_equals_padded():
    if not hasattr(AutoModelForCausalLMWithValueHead, "compute_logprobs"):
        pytest.skip("compute_logprobs (issue 16, chunked log-probs) is not in this checkout yet")
    model = value_model_of("llama")
    input_ids, attention_mask = padded_batch("mixed")
    packed = pack_batch(input_ids, attention_mask)
    with torch.no_grad():
        output = model.compute_logprobs(**packed, return_entropy=True, return_values=True)
        expected = model.compute_logprobs(
            input_ids,
            attention_mask,
            position_ids=positions_of(attention_mask),
            return_entropy=True,
            return_values=True,
        )
    valid, mask = next_token_mask(attention_mask), attention_mask.bool()
    logprobs = packed.unpack(output.logprobs, next_token=True)
    torch.testing.assert_close(logprobs[valid], expected.logprobs[valid], rtol=0, atol=ATOL)
    entropy_is_next_token = output.entropy.shape[1] == packed.input_ids.shape[1] - 1
    entropy = packed.unpack(output.entropy, next_token=entropy_is_next_token)
    where = valid if entropy_is_next_token else mask
    torch.testing.assert_close(entropy[where], expected.entropy[where], rtol=0, atol=ATOL)
    torch.testing.assert_close(packed.unpack(output.value)[mask], expected.value[mask], rtol=0, atol=ATOL)


def packed_and_padded_gradients(model_of) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The gradients of one loss on the values and log-probs of the mixed-padding batch, packed and padded (position
    ids from its mask), each on a fresh model `model_of(packed)`."""
    input_ids, attention_mask = padded_batch("mixed")
    mask, valid = attention_mask.bool(), next_token_mask(attention_mask)
    packed = pack_batch(input_ids, attention_mask)

    def gradients(packed_call: bool) -> dict[str, torch.Tensor]:
        model = model_of(packed_call)
        if packed_call:
            output = model(**packed)
            values = packed.unpack(output.value)
            logprobs = packed.unpack(next_token_logprobs(output.logits, packed.input_ids), next_token=True)
        else:
            output = model(input_ids, attention_mask=attention_mask, position_ids=positions_of(attention_mask))
            values, logprobs = output.value, next_token_logprobs(output.logits, input_ids)
        loss = (values**2)[mask].sum() - logprobs[valid].sum()
        loss.backward()
        return {name: parameter.grad for name, parameter in model.named_parameters() if parameter.requires_grad}

    return gradients(True), gradients(False)


def test_gradients_through_a_packed_batch_equal_the_padded_batchs():
    packed_gradients, padded_gradients = packed_and_padded_gradients(lambda packed: value_model_of("llama"))
    assert packed_gradients.keys() == padded_gradients.keys()
    assert any(name.startswith("v_head") for name in padded_gradients)
    for name, gradient in padded_gradients.items():
        torch.testing.assert_close(packed_gradients[name], gradient, rtol=0, atol=ATOL, msg=name)


def malformed(case: str) -> dict:
    packed = dict(pack_batch(*padded_batch("right")))
    positions = packed["position_ids"]
    if case == "shorter":
        packed["position_ids"] = positions[:, :-1]
    elif case == "one-dimensional":
        packed["position_ids"] = positions[0]
    elif case == "float":
        packed["position_ids"] = positions.float()
    elif case == "not starting at 0":
        packed["position_ids"] = positions + 1
    elif case == "negative":
        packed["position_ids"] = positions - 1
    elif case == "restarting at 3":
        packed["position_ids"] = torch.cat([positions[:, :5], positions[:, 5:] + 3], dim=1)
    elif case == "with a cache":
        packed["use_cache"] = True
    return packed


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("shorter", r"position_ids has shape \(1, 14\), but it must be \(batch, seq\) like the ids, \(1, 15\)"),
        ("one-dimensional", r"position_ids has shape \(15,\)"),
        ("float", r"position_ids holds torch.float32 values"),
        ("not starting at 0", r"Row 0 of position_ids starts at 1"),
        ("negative", r"negative position -1"),
        ("restarting at 3", r"Row 0 of position_ids restarts at column 5 at 3"),
        ("with a cache", r"a packed batch cannot build a cache"),
    ],
)
def test_malformed_packed_batches_are_refused_before_any_work(case, message):
    model = value_model_of("llama")
    calls = count_forwards(model)
    for call in entry_points(model):
        with pytest.raises(InvalidPackedBatchError, match=message):
            call(**malformed(case))
    assert calls == []
    assert issubclass(InvalidPackedBatchError, ValueError) and issubclass(PackedBatchNotSupportedError, ValueError)


def test_return_past_key_values_with_a_packed_batch_is_refused():
    model = value_model_of("llama")
    with pytest.raises(InvalidPackedBatchError, match="cannot build a cache"):
        model(**pack_batch(*padded_batch("left")), return_past_key_values=True)


def test_readme_packing_example_runs(llama_dir):
    readme = Path(__file__).parent.parent / "README.md"
    section = readme.read_text().split("### Padding-free batches", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code.replace("path/or/hub-id", str(llama_dir)), "README.md", "exec"), namespace)
    assert namespace["values"].shape == (2, 5) and namespace["scores"].shape == (2,)
    assert namespace["logprobs"].shape == (2, 4)
    torch.testing.assert_close(namespace["values"], namespace["padded_values"], rtol=0, atol=ATOL)
