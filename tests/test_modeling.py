"""Forward semantics: TRL-compatible outputs, the lean value path, generation, and the wrapper's TRL-facing surface."""

import threading

import pytest
import torch
from conftest import build_bare, model_inputs
from transformers import AutoModel, AutoModelForCausalLM

import transformers_vhead
from transformers_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead


@pytest.fixture
def model(llama_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)


class CallRecorder:
    """Counts a module's calls and keeps the keyword arguments it was called with."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append(dict(kwargs))


def test_unpacks_like_trl_with_loss_none_in_its_place(model):
    inputs = model_inputs("llama")
    with torch.no_grad():
        output = model(**inputs)
        logits, loss, value = output

    assert loss is None
    assert logits is output.logits and value is output.value
    assert output[0] is output.logits and output[1] is None and output[2] is output.value


def test_unpacks_the_loss_when_labels_are_given(model):
    inputs = model_inputs("llama")
    with torch.no_grad():
        logits, loss, value = model(**inputs, labels=inputs["input_ids"])
        bare_loss = model.pretrained_model(**inputs, labels=inputs["input_ids"]).loss

    assert loss.ndim == 0 and torch.equal(loss, bare_loss)
    assert value.shape == inputs["input_ids"].shape


def test_return_past_key_values_unpacks_the_cache_as_a_fourth_item(model):
    inputs = model_inputs("llama")
    with torch.no_grad():
        logits, loss, value, past_key_values = model(**inputs, return_past_key_values=True)
        cached_length = past_key_values.get_seq_length()
        # the cache continues decoding exactly as the bare model's own cache does
        next_token = logits[:, -1:].argmax(-1)
        attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=1)
        step = model(next_token, past_key_values=past_key_values, attention_mask=attention_mask)
        full = model(torch.cat([inputs["input_ids"], next_token], dim=1), attention_mask=attention_mask)

    assert cached_length == inputs["input_ids"].shape[1]
    torch.testing.assert_close(step.value[:, -1], full.value[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)


def test_mapping_access_still_works_like_any_model_output(model):
    with torch.no_grad():
        output = model(**model_inputs("llama"), use_cache=False)

    assert output["value"] is output.value and "logits" in output.keys()
    as_tuple = output.to_tuple()  # transformers' tuple: the fields that are set
    assert len(as_tuple) == 2 and as_tuple[0] is output.logits and as_tuple[1] is output.value


def test_return_dict_false_gives_trls_tuple(model):
    inputs = model_inputs("llama")
    with torch.no_grad():
        as_tuple = model(**inputs, return_dict=False)
        as_output = model(**inputs)

    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3 and as_tuple[1] is None
    assert torch.equal(as_tuple[0], as_output.logits) and torch.equal(as_tuple[2], as_output.value)


def test_logits_keep_the_model_dtype_when_upcast_is_off(llama_dir):
    upcast = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, dtype=torch.bfloat16)
    kept = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, dtype=torch.bfloat16, upcast_logits=False)
    inputs = model_inputs("llama")
    with torch.no_grad():
        upcast_output, kept_output = upcast(**inputs), kept(**inputs)

    assert upcast_output.logits.dtype == torch.float32 and kept_output.logits.dtype == torch.bfloat16
    assert torch.equal(upcast_output.logits, kept_output.logits.float())
    assert kept_output.value.dtype == torch.float32


def test_forward_never_asks_the_wrapped_model_for_every_hidden_state(model):
    recorder = CallRecorder(model.pretrained_model)
    with torch.no_grad():
        output = model(**model_inputs("llama"))

    assert len(recorder.calls) == 1 and not recorder.calls[0].get("output_hidden_states")
    assert output.hidden_states is None


def test_value_only_call_never_runs_the_lm_head(model):
    lm_head = CallRecorder(model.pretrained_model.lm_head)
    inputs = model_inputs("llama")
    with torch.no_grad():
        values = model.compute_values(**inputs)
        output = model(**inputs, return_logits=False)

    assert lm_head.calls == []
    assert output.logits is None and torch.equal(output.value, values)
    with torch.no_grad():
        model(**inputs)
    assert len(lm_head.calls) == 1


def test_value_only_call_on_seq2seq_skips_the_lm_head_after_the_decoder(tmp_path):
    build_bare("t5").save_pretrained(tmp_path / "t5")
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tmp_path / "t5")
    lm_head = CallRecorder(model.pretrained_model.lm_head)
    inputs = model_inputs("t5")
    with torch.no_grad():
        values = model.compute_values(**inputs)
        expected = model(**inputs).value

    assert len(lm_head.calls) == 1  # the full forward only
    assert torch.equal(values, expected) and values.shape == inputs["decoder_input_ids"].shape


def test_value_only_call_refuses_labels(model):
    inputs = model_inputs("llama")
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=inputs["input_ids"], return_logits=False)


def test_generate_never_runs_the_value_head(model):
    head_calls = CallRecorder(model.v_head)
    inputs = model_inputs("llama")
    inputs.pop("attention_mask")
    model.generate(inputs["input_ids"][1:], max_new_tokens=4, do_sample=False)

    assert head_calls.calls == []


def test_generate_uses_the_models_saved_generation_config(model):
    model.generation_config.max_new_tokens = 3
    model.generation_config.pad_token_id = 0
    generated = model.generate(model_inputs("llama")["input_ids"][1:], do_sample=False)

    assert generated.shape[1] == model_inputs("llama")["input_ids"].shape[1] + 3


def test_threads_forwarding_at_once_each_get_their_own_values(model):
    inputs = [model_inputs("llama", seed=seed) for seed in range(4)]
    with torch.no_grad():
        expected = [model(**batch).value for batch in inputs]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(len(inputs))

    def run(index: int) -> None:
        barrier.wait()
        with torch.no_grad():
            for _ in range(5):
                results[index] = model.compute_values(**inputs[index]) if index % 2 else model(**inputs[index]).value

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for index, values in enumerate(expected):
        torch.testing.assert_close(results[index], values, atol=1e-6, rtol=0)


def test_config_reads_the_wrapped_models_settings_as_trl_code_does(model):
    config = model.config

    assert config.vocab_size == model.pretrained_model.config.vocab_size == 96
    assert config.hidden_size == 32
    assert config.pad_token_id == 0 and config.eos_token_id == 2 and config.bos_token_id == 1
    assert config.is_encoder_decoder is False
    assert model.transformers_parent_class is AutoModelForCausalLM
    assert model.supported_args == ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")

    config.pad_token_id = 5  # TRL scripts set this on model.config; it must reach the wrapped model
    assert model.pretrained_model.config.pad_token_id == 5


def test_wrapping_an_instance_keeps_it_and_its_weights_untouched():
    bare = build_bare("llama")
    before = {name: tensor.clone() for name, tensor in bare.state_dict().items()}

    model = AutoModelForCausalLMWithValueHead.from_pretrained(bare, v_head_init_strategy="normal")
    trl_style = AutoModelForCausalLMWithValueHead(bare, summary_dropout_prob=0.0)

    assert model.pretrained_model is bare and trl_style.pretrained_model is bare
    assert all(torch.equal(before[name], tensor) for name, tensor in bare.state_dict().items())
    assert model.config.v_head_init_strategy == "normal" and torch.equal(model.v_head.summary.bias, torch.zeros(1))
    assert isinstance(trl_style.v_head.dropout, torch.nn.Identity)
    assert not model.v_head_source.is_loaded and "normal" in str(model.v_head_source)


def test_wrapping_an_instance_refuses_loading_keywords():
    with pytest.raises(TypeError, match="dtype"):
        AutoModelForCausalLMWithValueHead.from_pretrained(build_bare("llama"), dtype=torch.bfloat16)


def test_auto_model_returns_the_value_head_model(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")

    assert type(AutoModel.from_pretrained(tmp_path / "saved")) is AutoModelForCausalLMWithValueHead


def test_registration_is_idempotent(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    transformers_vhead.register()
    transformers_vhead.register()

    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")) is AutoModelForCausalLMWithValueHead


def test_plain_lm_keywords_reach_the_wrapped_config(llama_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, use_cache=False, attn_implementation="eager")

    assert model.pretrained_model.config.use_cache is False
    assert model.pretrained_model.config._attn_implementation == "eager"


@pytest.mark.parametrize("training", [False, True])
def test_wrapping_an_instance_puts_the_head_in_the_instances_mode(training):
    """`from_pretrained` of a path returns an eval model; wrapping an instance keeps the instance's mode, head too (the
    head's dropout would otherwise be on around an eval-mode language model)."""
    bare = build_bare("llama").train(training)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(bare)
    assert model.training is training and model.v_head.training is training and bare.training is training
