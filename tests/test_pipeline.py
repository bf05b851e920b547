"""`pipeline("text-generation")` works with a value-head model, from an instance and from a saved path."""

import pytest
from transformers import LlamaForCausalLM, pipeline
from transformers.utils import logging

from transformers_vhead import AutoModelForCausalLMWithValueHead

PROMPTS = ["the critic says this answer is", "a good policy learns"]
SETTINGS = {"max_new_tokens": 5, "do_sample": False}


@pytest.fixture
def saved(llama_dir, tmp_path, tokenizer):
    """A value-head model saved with its tokenizer, and the plain model it wraps (saved with the tokenizer too)."""
    tokenizer.save_pretrained(llama_dir)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)
    model.save_pretrained(tmp_path / "vhead")
    tokenizer.save_pretrained(tmp_path / "vhead")
    return tmp_path / "vhead", llama_dir


@pytest.fixture
def transformers_logs(caplog):
    """transformers' own log records (its root logger does not propagate outside CI)."""
    logging.enable_propagation()
    yield caplog
    logging.disable_propagation()


def generated_texts(generator) -> list[str]:
    return [result[0]["generated_text"] for result in generator(PROMPTS, **SETTINGS)]


def test_text_generation_pipeline_from_an_instance_equals_the_bare_model(saved, tokenizer, transformers_logs):
    vhead_dir, llama_dir = saved
    expected = generated_texts(pipeline("text-generation", model=LlamaForCausalLM.from_pretrained(llama_dir),
                                        tokenizer=tokenizer))  # fmt: skip
    generator = pipeline("text-generation", model=AutoModelForCausalLMWithValueHead.from_pretrained(vhead_dir),
                         tokenizer=tokenizer)  # fmt: skip

    assert generated_texts(generator) == expected
    assert all(
        text.startswith(prompt) and len(text) > len(prompt) for text, prompt in zip(expected, PROMPTS, strict=True)
    )
    assert "is not supported for text-generation" not in transformers_logs.text


def test_text_generation_pipeline_from_a_saved_path_equals_the_bare_model(saved):
    vhead_dir, llama_dir = saved
    expected = generated_texts(pipeline("text-generation", model=str(llama_dir)))
    generator = pipeline("text-generation", model=str(vhead_dir))

    assert type(generator.model) is AutoModelForCausalLMWithValueHead
    assert generated_texts(generator) == expected
