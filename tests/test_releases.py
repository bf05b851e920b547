"""Every transformers release from our floor to the newest: 5.24 renamed the cache from `past_key_values` to `cache`.

Our outputs and forwards follow the installed release, the other name keeps working (TRL-era code passes and reads
`past_key_values`, code written for 5.24+ uses `cache`), and nothing of ours triggers transformers' deprecation
warnings (FutureWarnings raise here, and transformers' logged deprecations are collected).
"""

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from architectures import FAMILIES
from conftest import build_bare, is_seq2seq, model_inputs, policy_lora, save_reward_adapter, value_head_class
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, pipeline
from transformers.modeling_outputs import CausalLMOutputWithPast, Seq2SeqLMOutput
from transformers.utils import logging as transformers_logging

from transformers_vhead import (
    AutoModelForCausalLMWithValueHead,
    CausalLMOutputWithValue,
    Seq2SeqLMOutputWithValue,
    create_reference_model,
)
from transformers_vhead.compat import CACHE_NAME, OTHER_CACHE_NAME


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def no_deprecations() -> Iterator[None]:
    """Within the block a FutureWarning raises, and a deprecation transformers logs (as it does for the cache's old
    name, once per process: the once-cache is cleared first) fails the test on exit."""
    logging.Logger.warning_once.cache_clear()
    collect = _Collect()
    transformers_logging.get_logger().addHandler(collect)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            # peft 0.21's PeftModel.__init__ reads `is_gradient_checkpointing`, deprecated in transformers 5.24
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            yield
    finally:
        transformers_logging.get_logger().removeHandler(collect)
    assert not [message for message in collect.messages if "deprecated" in message], collect.messages


def next_step(family: str, inputs: dict, logits: torch.Tensor) -> dict:
    """The inputs of one decoding step after `inputs` (the greedy next token), for use with the prefix's cache."""
    next_token = logits[:, -1:].argmax(-1)
    if is_seq2seq(family):
        return {**inputs, "decoder_input_ids": next_token}
    return {
        "input_ids": next_token,
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=1),
    }


def test_outputs_are_transformers_own_with_the_cache_under_its_installed_name():
    for ours, theirs in (
        (CausalLMOutputWithValue, CausalLMOutputWithPast),
        (Seq2SeqLMOutputWithValue, Seq2SeqLMOutput),
    ):
        assert issubclass(ours, theirs)
        assert CACHE_NAME in theirs.__dataclass_fields__ and OTHER_CACHE_NAME not in theirs.__dataclass_fields__
        assert list(ours.__dataclass_fields__) == [*theirs.__dataclass_fields__, "value"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cache_reads_and_decodes_under_either_name_as_the_bare_model(family):
    model = value_head_class(family)(build_bare(family)).eval()
    bare = model.pretrained_model
    inputs = model_inputs(family)

    def prefix_cache():
        return getattr(bare(**inputs, use_cache=True), CACHE_NAME)

    with torch.no_grad(), no_deprecations():
        output = model(**inputs, use_cache=True)
        cache = getattr(output, CACHE_NAME)
        step = next_step(family, inputs, output.logits)
        by_old_name = model(**step, past_key_values=prefix_cache())
        by_new_name = model(**step, cache=prefix_cache())
        expected = bare(**step, **{CACHE_NAME: prefix_cache()})

    assert cache is not None
    assert output.past_key_values is cache and output.cache is cache
    assert output["past_key_values"] is cache and output["cache"] is cache
    assert "past_key_values" in output and "cache" in output and output.get(OTHER_CACHE_NAME) is cache
    assert torch.equal(by_old_name.logits, expected.logits.float())
    assert torch.equal(by_new_name.logits, expected.logits.float())
    assert torch.equal(by_old_name.value, by_new_name.value)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_return_past_key_values_gives_trls_four_tuple_with_the_cache(family):
    model = value_head_class(family)(build_bare(family)).eval()
    with torch.no_grad(), no_deprecations():
        output = model(**model_inputs(family), return_past_key_values=True)
        logits, loss, value, cache = output

    assert len(output) == 4 and cache is getattr(output, CACHE_NAME) and cache.get_seq_length() > 0
    assert logits is output.logits and loss is None and value is output.value


def test_the_cache_given_under_both_names_is_refused():
    model = AutoModelForCausalLMWithValueHead(build_bare("llama")).eval()
    inputs = model_inputs("llama")
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
        with pytest.raises(ValueError, match="once"):
            model(**inputs, past_key_values=cache, cache=cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_our_call_paths_trigger_no_transformers_deprecation(family, tmp_path):
    bare = build_bare(family)
    bare.save_pretrained(tmp_path / "bare")
    inputs = model_inputs(family)
    generate_inputs = {key: value for key, value in inputs.items() if key != "decoder_input_ids"}
    auto_class = AutoModelForSeq2SeqLM if is_seq2seq(family) else AutoModelForCausalLM
    with torch.no_grad(), no_deprecations():
        model = value_head_class(family).from_pretrained(tmp_path / "bare").eval()
        output = model(**inputs, return_past_key_values=True)
        model(**next_step(family, inputs, output.logits), past_key_values=output.past_key_values)  # TRL's way
        model.compute_values(**inputs)
        model.generate(**generate_inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        model.save_pretrained(tmp_path / "saved")
        reloaded = auto_class.from_pretrained(tmp_path / "saved").eval()
        reference = create_reference_model(reloaded, num_shared_layers=1)
        reloaded.forward_with_reference(reference, **inputs)


def test_peft_reward_and_pipeline_paths_trigger_no_transformers_deprecation(llama_dir, tmp_path, tokenizer):
    reward_dir = save_reward_adapter(llama_dir, tmp_path / "reward")
    inputs = model_inputs("llama")
    with torch.no_grad(), no_deprecations():
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            llama_dir, peft_config=policy_lora(), reward_adapter=reward_dir
        ).eval()
        model(**inputs)
        model.compute_sequence_scores(**inputs)
        model.compute_reference_logprobs(**inputs)
        model.save_pretrained(tmp_path / "policy")
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy")(**inputs)
        scorer = pipeline("value-scoring", model=model, tokenizer=tokenizer)
        scorer(["hello world", "a longer text to score"], batch_size=2)
