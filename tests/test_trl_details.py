"""TRL code runs unchanged to the last detail: the length of an output, an explicit `summary_dropout_prob=None`, the
errors TRL code catches, and a package that imports and works without peft (TRL's classes did)."""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import build_bare, model_inputs, policy_lora, save_reward_adapter, tiny_config, value_head_class
from transformers import AutoModelForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead, ValueHead
from transformers_vhead.errors import HiddenSizeNotFoundError, InvalidModelSourceError


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_len_of_an_output_is_the_length_of_trls_tuple(family, with_labels):
    model = value_head_class(family)(build_bare(family)).eval()
    inputs = model_inputs(family)
    if with_labels:
        inputs["labels"] = inputs.get("decoder_input_ids", inputs["input_ids"])
    with torch.no_grad():
        output = model(**inputs)  # a cache is set (use_cache defaults on), and a seq2seq encoder state
        with_cache = model(**inputs, return_past_key_values=True)
        as_tuple = model(**inputs, return_dict=False)

    assert output.past_key_values is not None and (output.loss is not None) is with_labels
    assert len(output) == 3 == len(tuple(output)) == len(as_tuple)
    assert len(with_cache) == 4 == len(tuple(with_cache))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_len_of_an_output_equals_trls(family, trl_ppo, tmp_path):
    build_bare(family).save_pretrained(tmp_path / "bare")
    trl_class = {"llama": trl_ppo.AutoModelForCausalLMWithValueHead, "t5": trl_ppo.AutoModelForSeq2SeqLMWithValueHead}
    trl_model = trl_class[family].from_pretrained(str(tmp_path / "bare")).eval()
    model = value_head_class(family).from_pretrained(tmp_path / "bare").eval()
    inputs = model_inputs(family)
    with torch.no_grad():
        for flag in (False, True):
            expected = len(trl_model(**inputs, return_past_key_values=flag))
            assert len(model(**inputs, return_past_key_values=flag)) == expected


def trls_value_head(trl_ppo) -> type:
    return sys.modules[trl_ppo.AutoModelForCausalLMWithValueHead.__module__].ValueHead


def test_explicit_summary_dropout_prob_none_means_no_dropout_as_in_trl(llama_dir, tmp_path):
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, summary_dropout_prob=None)
    wrapped = AutoModelForCausalLMWithValueHead(build_bare("llama"), summary_dropout_prob=None)
    for model in (loaded, wrapped):
        assert isinstance(model.v_head.dropout, torch.nn.Identity) and model.config.summary_dropout_prob == 0.0

    loaded.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").train()
    assert isinstance(reloaded.v_head.dropout, torch.nn.Identity)
    inputs = model_inputs("llama")
    assert torch.equal(reloaded(**inputs).value, reloaded(**inputs).value)  # train mode, yet no dropout

    default = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)  # not given: TRL's 0.1
    assert isinstance(default.v_head.dropout, torch.nn.Dropout) and default.v_head.dropout.p == 0.1


def test_value_head_dropout_follows_trls_rules():
    config = tiny_config("llama")
    assert isinstance(ValueHead(config, summary_dropout_prob=None).dropout, torch.nn.Identity)
    assert ValueHead(config).dropout.p == 0.1
    config.summary_dropout_prob = None  # set, to None, on the wrapped config: TRL's head has no dropout then
    assert isinstance(ValueHead(config).dropout, torch.nn.Identity)


def test_value_head_dropout_equals_trls(trl_ppo):
    config = tiny_config("llama")
    for kwargs in ({}, {"summary_dropout_prob": None}, {"summary_dropout_prob": 0.3}):
        ours, theirs = ValueHead(config, **kwargs).dropout, trls_value_head(trl_ppo)(config, **kwargs).dropout
        assert type(ours) is type(theirs) and getattr(ours, "p", None) == getattr(theirs, "p", None)


def test_value_head_on_a_config_like_object_without_a_hidden_size_is_a_named_value_error():
    for config in (SimpleNamespace(), SimpleNamespace(is_encoder_decoder=False)):
        with pytest.raises(HiddenSizeNotFoundError, match="SimpleNamespace.*hidden_size"):
            ValueHead(config)
    assert issubclass(HiddenSizeNotFoundError, ValueError)
    assert ValueHead(SimpleNamespace(hidden_size=8)).summary.in_features == 8  # a config-like object with one works


def test_trls_value_head_raises_a_value_error_there_too(trl_ppo):
    with pytest.raises(ValueError):
        trls_value_head(trl_ppo)(SimpleNamespace())


@pytest.mark.parametrize("source", [42, torch.nn.Linear(2, 2)])
def test_a_source_that_is_no_model_is_caught_as_value_error_as_in_trl(source, trl_ppo):
    for caught in (ValueError, TypeError, InvalidModelSourceError):
        with pytest.raises(caught):
            AutoModelForCausalLMWithValueHead.from_pretrained(source)
    with pytest.raises(ValueError):  # what TRL code catches
        trl_ppo.AutoModelForCausalLMWithValueHead.from_pretrained(source)


# Run in a fresh interpreter where peft cannot be imported: `sys.modules["peft"] = None` is how Python marks a module
# that is not there (`import peft` raises ImportError, `importlib.util.find_spec` says None, so transformers and
# accelerate see it as not installed).
WITHOUT_PEFT = textwrap.dedent(
    """
    import json, sys, tempfile
    sys.modules["peft"] = None

    import torch
    import transformers_vhead
    from transformers import AutoModelForCausalLM, pipeline
    from transformers.utils import is_peft_available
    from transformers_vhead import AutoModelForCausalLMWithValueHead, create_reference_model, export_model
    from transformers_vhead.demo import run_demo, tiny_tokenizer

    adapter_dir, reward_dir, base_dir = sys.argv[1:4]
    results = {"peft_available": is_peft_available()}
    work = tempfile.mkdtemp()
    demo = run_demo(work + "/demo")
    results["demo"] = [demo.model_class, demo.weights_identical, demo.max_value_difference, len(demo.token_values)]
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base_dir).eval()
    input_ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    with torch.no_grad():
        output = model(input_ids)
        model.save_pretrained(work + "/saved")
        reloaded = AutoModelForCausalLM.from_pretrained(work + "/saved").eval()
        results["reload_bit_exact"] = torch.equal(reloaded(input_ids).value, output.value)
        results["generated"] = list(model.generate(input_ids, max_new_tokens=2, do_sample=False).shape)
        reference = create_reference_model(model, num_shared_layers=1)
        one_pass = model.forward_with_reference(reference, input_ids)
        results["reference_equal"] = torch.allclose(one_pass.ref_logits, reference(input_ids).logits, atol=1e-5)
    scores = pipeline("value-scoring", model=model, tokenizer=tiny_tokenizer())(["the cat", "a dog"])
    results["scores"] = len(scores)
    results["export"] = export_model(model, work + "/plain", to="causal-lm").format

    def error_of(call):
        try:
            call()
        except Exception as exc:
            return [type(exc).__name__, isinstance(exc, ImportError), str(exc)]

    results["adapter"] = error_of(lambda: AutoModelForCausalLMWithValueHead.from_pretrained(adapter_dir))
    results["auto_adapter"] = error_of(lambda: AutoModelForCausalLM.from_pretrained(adapter_dir))
    results["reward_adapter"] = error_of(
        lambda: AutoModelForCausalLMWithValueHead.from_pretrained(base_dir, reward_adapter=reward_dir)
    )
    results["load_adapter"] = error_of(lambda: model.load_adapter(adapter_dir))
    results["peft_imported"] = sys.modules["peft"] is not None
    print(json.dumps(results))
    """
)


def test_everything_but_peft_features_works_without_peft(llama_dir, tmp_path):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())
    policy.save_pretrained(tmp_path / "adapter")
    reward_dir = save_reward_adapter(llama_dir, tmp_path / "reward")
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_PEFT, str(tmp_path / "adapter"), str(reward_dir), str(llama_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])

    assert results["peft_available"] is False and results["peft_imported"] is False
    assert results["demo"][:3] == ["AutoModelForCausalLMWithValueHead", True, 0.0] and results["demo"][3] > 8
    assert results["generated"] == [2, 6] and results["scores"] == 2
    assert results["reload_bit_exact"] and results["reference_equal"] and results["export"] == "causal-lm"
    # the auto class, without peft, does not look for an adapter: it reads the adapter's config.json (ours), and our
    # from_pretrained finds the adapter
    for feature in ("adapter", "auto_adapter", "reward_adapter", "load_adapter"):
        name, is_import_error, message = results[feature]
        assert (name, is_import_error) == ("PeftNotInstalledError", True), results[feature]
        assert 'pip install "transformers-vhead[peft]"' in message and "peft" in message
