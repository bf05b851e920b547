"""The architecture matrix: every family behaves the same through the value-head classes.

For each family: output shapes and dtypes, a save -> auto-class reload that is bit-exact, greedy generation equal to the
bare model's, the value-only call equal to the forward's values, and values equal to TRL 1.12's on the same weights.
"""

import pytest
import torch
from architectures import FAMILIES, VOCAB_SIZE
from conftest import bare_class, build_bare, is_seq2seq, model_inputs, value_head_class


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def bare_dir(family, tmp_path):
    """The family's plain tiny model, saved."""
    path = tmp_path / "bare"
    build_bare(family).save_pretrained(path)
    return path


def test_forward_returns_fp32_logits_and_values_of_the_right_shapes(family, bare_dir):
    model = value_head_class(family).from_pretrained(bare_dir)
    inputs = model_inputs(family)
    batch, length = (inputs.get("decoder_input_ids", inputs["input_ids"])).shape

    with torch.no_grad():
        output = model(**inputs)

    assert output.logits.shape == (batch, length, VOCAB_SIZE) and output.logits.dtype == torch.float32
    assert output.value.shape == (batch, length) and output.value.dtype == torch.float32
    assert output.loss is None
    assert torch.isfinite(output.value).all()


def test_logits_equal_the_bare_model_and_values_only_call_equals_forward(family, bare_dir):
    bare = bare_class(family).from_pretrained(bare_dir)
    model = value_head_class(family).from_pretrained(bare_dir)
    inputs = model_inputs(family)

    with torch.no_grad():
        output = model(**inputs)
        values_only = model.compute_values(**inputs)
        bare_logits = bare(**inputs).logits

    assert torch.equal(output.logits, bare_logits)
    assert torch.equal(values_only, output.value)


def test_save_and_auto_class_reload_is_bit_exact(family, bare_dir, tmp_path):
    model = value_head_class(family).from_pretrained(bare_dir, v_head_init_strategy="normal")
    model.save_pretrained(tmp_path / "saved")

    reloaded = bare_class(family).from_pretrained(tmp_path / "saved")
    direct = value_head_class(family).from_pretrained(tmp_path / "saved")

    assert type(reloaded) is value_head_class(family)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    assert reloaded.v_head_source.is_loaded
    inputs = model_inputs(family)
    with torch.no_grad():
        from_auto, from_class = reloaded(**inputs), direct(**inputs)
    # both memory-map the same file, so they compute bit-identically
    assert torch.equal(from_auto.value, from_class.value) and torch.equal(from_auto.logits, from_class.logits)


def test_greedy_generation_equals_the_bare_model(family, bare_dir, tmp_path):
    bare = bare_class(family).from_pretrained(bare_dir)
    value_head_class(family).from_pretrained(bare_dir).save_pretrained(tmp_path / "saved")
    model = bare_class(family).from_pretrained(tmp_path / "saved")
    inputs = model_inputs(family)
    inputs.pop("decoder_input_ids", None)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}

    expected = bare.generate(**inputs, **settings)
    generated = model.generate(**inputs, **settings)

    assert torch.equal(generated, expected)


def test_values_equal_trl_on_the_same_weights(family, bare_dir, tmp_path, trl_ppo):
    trl_class = (
        trl_ppo.AutoModelForSeq2SeqLMWithValueHead if is_seq2seq(family) else trl_ppo.AutoModelForCausalLMWithValueHead
    )
    trl_model = trl_class.from_pretrained(str(bare_dir), v_head_init_strategy="normal").eval()
    trl_model.save_pretrained(str(tmp_path / "trl"))  # TRL's own layout: v_head.* merged into the base checkpoint

    model = value_head_class(family).from_pretrained(tmp_path / "trl")
    inputs = model_inputs(family)
    with torch.no_grad():
        trl_logits, trl_loss, trl_value = trl_model(**inputs)
        logits, loss, value = model(**inputs)

    assert model.v_head_source.is_loaded
    assert torch.equal(model.v_head.summary.weight, trl_model.v_head.summary.weight)
    assert torch.equal(model.v_head.summary.bias, trl_model.v_head.summary.bias)
    torch.testing.assert_close(value, trl_value, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, trl_logits, atol=1e-6, rtol=0)
    assert loss is None and trl_loss is None
