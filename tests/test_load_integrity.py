"""Loads that look fine and are wrong (issue 15, item 6, and the config.json half of item 2).

- A `config.json` that cannot describe a model (not JSON, a field of the wrong type, no `text_config`, a `text_config`
  without `model_type`) is an `InvalidConfigError` naming the file, through our classes and the auto classes alike.
- A checkpoint of our own layout whose tensors do not fit the model its config builds (another family named in
  `text_config`, a tensor renamed by a bit flip in the header, a missing, extra or resized tensor) is a
  `CheckpointMismatchError` naming the directory and the keys; a checkpoint none of whose weights fit is one in every
  layout. Keys that are legitimately absent (tied weights, what the wrapped class ignores, a plain LM's fresh head) are
  not.
- `v_head_source.is_loaded` is true exactly when the head holds the saved tensors, in every layout we read.

Checkpoints are written by `save_pretrained` or, where a test needs tensors that do not fit, by `write_checkpoint`
below (the same files: `model.safetensors`, or shards and their index); other projects' layouts come from the builders
of test_layouts.py and test_loading.py.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from architectures import tiny_config
from conftest import build_bare, policy_lora, populate_hub_cache, value_head_class
from huggingface_hub.errors import StrictDataclassFieldValidationError
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from test_layouts import OpenRLHFRewardModel, classifier, save_trlx_layout, seeded, trlx_mlp_head
from test_loading import save_trl_layout, save_trl_pickle_layout, trl_head
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaConfig,
)

from transformers_vhead import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    CausalLMWithValueHeadConfig,
)
from transformers_vhead.errors import CheckpointMismatchError, InvalidConfigError


def saved_value_head_model(path: Path, family: str = "llama", **save_kwargs):
    """A value-head model of `family` with a seeded head (bias non-zero), saved by `save_pretrained`."""
    model = value_head_class(family)(build_bare(family)).eval()
    seeded(model.v_head)
    model.save_pretrained(path, **save_kwargs)
    return model


def write_checkpoint(path: Path, config, state_dict: dict[str, torch.Tensor], shards: int = 1) -> None:
    """The files `save_pretrained` writes for `state_dict`: `config.json` and `model.safetensors`, or `shards` shards
    with their index, each listing exactly what its shard holds."""
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    state_dict = {key: tensor.detach().clone().contiguous() for key, tensor in state_dict.items()}
    if shards == 1:
        save_file(state_dict, path / "model.safetensors", metadata={"format": "pt"})
        return
    keys, weight_map = sorted(state_dict), {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state_dict[key] for key in keys[index::shards]}
        save_file(part, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def flip_one_bit_in_header(file: Path, name: str, position: int, bit: int = 0) -> str:
    """Flips one bit of character `position` of the tensor name `name` in a safetensors header, as a storage error
    would; returns the name the tensor then has (the header stays valid JSON with the same length)."""
    data = bytearray(file.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    start = data.index(f'"{name}"'.encode(), 8, header_end) + 1 + position
    data[start] ^= 1 << bit
    file.write_bytes(bytes(data))
    return data[start - position : start - position + len(name)].decode()


def edit_config(path: Path, edit) -> Path:
    """Applies `edit` to the dict of `path/config.json` (or writes what it returns, when that is a str)."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    text = edit(config)
    config_file.write_text(text if isinstance(text, str) else json.dumps(config))
    return config_file


# ---------------------------------------------------------------------------------------------- config.json (item 2)

BAD_CONFIGS = {
    # name: (edit, what the message says, whether the auto classes can see that it is ours)
    "not JSON": (
        lambda c: '{"model_type": "transformers-vhead-causal-lm", "text_config": {',
        "is not valid JSON",
        False,
    ),
    "summary_dropout_prob a string": (lambda c: c.update(summary_dropout_prob="x"), "'summary_dropout_prob'", True),
    "upcast_logits a string": (lambda c: c.update(upcast_logits="yes"), "'upcast_logits'", True),
    "text_config a number": (lambda c: c.update(text_config=5), "`text_config` of type int", True),
    "hidden_size a string inside text_config": (
        lambda c: c["text_config"].update(hidden_size="big"),
        "'hidden_size' expected int, got str",
        True,
    ),
    "no text_config": (lambda c: c.pop("text_config") and None, "has no `text_config`", True),
    "null text_config": (lambda c: c.update(text_config=None), "has no `text_config`", True),
    "text_config without model_type": (
        lambda c: c["text_config"].pop("model_type") and None,
        "`text_config` without a `model_type`.*would silently become a gpt2",
        True,
    ),
    "no model_type at all": (lambda c: c.pop("model_type") and None, "holds no `model_type`", False),
    "a JSON list": (lambda c: "[1, 2]", "holds a JSON list", False),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_json_is_an_invalid_config_error_naming_the_file(tmp_path, case):
    edit, says, _ = BAD_CONFIGS[case]
    saved_value_head_model(tmp_path)
    config_file = edit_config(tmp_path, edit)

    for load in (AutoModelForCausalLMWithValueHead.from_pretrained, CausalLMWithValueHeadConfig.from_pretrained):
        with pytest.raises(InvalidConfigError, match=rf"^{re.escape(str(config_file))} .*{says}") as error:
            load(tmp_path)
        assert "save_pretrained" in str(error.value)  # what to do


@pytest.mark.parametrize("case", [case for case, (_, _, ours) in BAD_CONFIGS.items() if ours])
def test_the_auto_classes_raise_the_same_error(tmp_path, case):
    edit, says, _ = BAD_CONFIGS[case]
    saved_value_head_model(tmp_path)
    config_file = edit_config(tmp_path, edit)

    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(InvalidConfigError, match=rf"^{re.escape(str(config_file))} .*{says}"):
            load(tmp_path)


@pytest.mark.parametrize("case", [case for case, (_, _, ours) in BAD_CONFIGS.items() if not ours])
def test_a_config_the_auto_classes_cannot_tell_is_ours_gets_transformers_own_error(tmp_path, case):
    """Not JSON, or no `model_type`: `AutoConfig` fails before any class of ours is chosen, with its own error, which
    names the file or the directory (nothing registered is consulted before the file is parsed)."""
    edit, _, _ = BAD_CONFIGS[case]
    saved_value_head_model(tmp_path)
    edit_config(tmp_path, edit)

    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises((OSError, ValueError), match=re.escape(str(tmp_path))) as error:
            load(tmp_path)
        assert not isinstance(error.value, InvalidConfigError)


def test_a_text_config_without_model_type_no_longer_wraps_a_gpt2_in_a_seq2seq_model(tmp_path):
    saved_value_head_model(tmp_path, "t5")
    config_file = edit_config(tmp_path, lambda c: c["text_config"].pop("model_type") and None)

    for load in (AutoModelForSeq2SeqLMWithValueHead.from_pretrained, AutoModelForSeq2SeqLM.from_pretrained):
        with pytest.raises(InvalidConfigError, match=rf"{re.escape(str(config_file))} .*would silently become a t5"):
            load(tmp_path)


def test_a_bad_config_of_a_hub_id_names_the_hub_id(tmp_path):
    saved_value_head_model(tmp_path / "src")
    edit_config(tmp_path / "src", lambda c: c["text_config"].pop("model_type") and None)
    populate_hub_cache(tmp_path / "cache", "acme/broken", tmp_path / "src")

    for load in (AutoModelForCausalLMWithValueHead.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(InvalidConfigError, match="^The config.json of acme/broken has a `text_config` without"):
            load("acme/broken", cache_dir=tmp_path / "cache")


def test_a_plain_config_json_without_model_type_is_not_taken_for_a_gpt2(llama_dir):
    config_file = edit_config(llama_dir, lambda c: c.pop("model_type") and None)

    with pytest.raises(InvalidConfigError, match=rf"{re.escape(str(config_file))} holds no `model_type`"):
        AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)


def test_the_config_json_beside_a_peft_policy_is_checked_too(llama_dir, tmp_path):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())
    policy.save_pretrained(tmp_path / "policy")
    config_file = edit_config(tmp_path / "policy", lambda c: c.update(summary_dropout_prob="x"))

    with pytest.raises(InvalidConfigError, match=rf"^{re.escape(str(config_file))} .*'summary_dropout_prob'"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy")

    config_file.write_text('{"model_type": "transformers-vhead-causal-lm",')
    with pytest.raises(InvalidConfigError, match=rf"^{re.escape(str(config_file))} is not valid JSON"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy")


def test_configs_built_in_code_keep_working_as_before():
    assert CausalLMWithValueHeadConfig().text_config.model_type == "gpt2"  # TRL's default base, as before
    assert CausalLMWithValueHeadConfig(text_config={"n_embd": 48}).text_config.hidden_size == 48
    llama = CausalLMWithValueHeadConfig(text_config=LlamaConfig(hidden_size=64, num_attention_heads=4))
    assert (llama.hidden_size, llama.text_config.model_type) == (64, "llama")
    assert CausalLMWithValueHeadConfig.from_dict(llama.to_dict()).to_dict() == llama.to_dict()


def test_a_bad_keyword_is_not_blamed_on_the_file(tmp_path):
    saved_value_head_model(tmp_path)

    with pytest.raises(StrictDataclassFieldValidationError, match="summary_dropout_prob") as error:
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, summary_dropout_prob="x")
    assert not isinstance(error.value, InvalidConfigError)


# --------------------------------------------------------------------------- weights that do not fit (items 6a, 6c)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_a_text_config_naming_another_family_is_a_mismatch_not_a_random_bert(tmp_path, sharded):
    saved_value_head_model(tmp_path, max_shard_size="20KB" if sharded else "50GB")
    edit_config(tmp_path, lambda c: c["text_config"].update(model_type="bert"))
    match = (
        rf"None of the weights of the BertLMHeadModel \(model_type 'bert'\) that the config of "
        rf"{re.escape(str(tmp_path))} describes.*pretrained_model\.model\.layers\.0\..* instead.*Fix the model_type"
    )

    for load in (AutoModelForCausalLMWithValueHead.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CheckpointMismatchError, match=match):
            load(tmp_path)


@pytest.mark.parametrize(
    "write",
    [
        lambda path: build_bare("llama").save_pretrained(path),
        lambda path: save_trl_layout(path, trl_head()),
        lambda path: classifier(AutoModelForSequenceClassification, "llama", path),
    ],
    ids=["plain LM", "TRL", "HF sequence classification"],
)
def test_no_weight_that_fits_is_a_mismatch_in_every_layout(tmp_path, write):
    write(tmp_path)
    edit_config(tmp_path, lambda c: c.update(model_type="bert"))

    with pytest.raises(CheckpointMismatchError, match=rf"None of the weights .* {re.escape(str(tmp_path))} describes"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("name", "position", "lacks"),
    [
        (
            "pretrained_model.model.layers.1.mlp.up_proj.weight",
            38,
            "pretrained_model.model.layers.1.mlp.up_proj.weight",
        ),
        ("v_head.summary.weight", 20, "v_head.summary.weight"),
    ],
    ids=["a base weight", "the head's weight"],
)
def test_a_bit_flip_in_a_header_key_name_is_a_mismatch_naming_both_keys(tmp_path, name, position, lacks):
    saved_value_head_model(tmp_path)
    renamed = flip_one_bit_in_header(tmp_path / "model.safetensors", name, position)
    assert renamed != name and len(renamed) == len(name)

    with pytest.raises(CheckpointMismatchError) as error:
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)

    message = str(error.value)
    assert message.startswith(f"The checkpoint at {tmp_path} does not fit the LlamaForCausalLM")
    assert f"does not have: {renamed}" in message and lacks in message and "Restore the checkpoint" in message


def _llama_state(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLMWithValueHead(build_bare("llama", seed=seed)).eval()
    seeded(model.v_head)
    return model, dict(model.state_dict())


MISFITS = {
    "a missing tensor": (
        lambda sd: sd.pop("pretrained_model.model.norm.weight"),
        "it lacks: pretrained_model.model.norm",
    ),
    "an extra tensor": (
        lambda sd: sd.update({"pretrained_model.model.layers.2.mlp.up_proj.weight": torch.ones(64, 32)}),
        r"does not have: pretrained_model\.model\.layers\.2\.mlp\.up_proj\.weight",
    ),
    "a resized tensor": (
        lambda sd: sd.update({"pretrained_model.model.norm.weight": torch.ones(33)}),
        r"shapes that differ: pretrained_model\.model\.norm\.weight \(checkpoint \(33,\), model \(32,\)\)",
    ),
    "the head without its bias": (lambda sd: sd.pop("v_head.summary.bias"), "value head tensors it lacks: v_head"),
}


@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize("misfit", MISFITS)
def test_our_checkpoint_whose_tensors_do_not_fit_is_a_mismatch(tmp_path, misfit, shards):
    edit, says = MISFITS[misfit]
    model, state_dict = _llama_state()
    edit(state_dict)
    write_checkpoint(tmp_path, model.config, state_dict, shards=shards)

    with pytest.raises(CheckpointMismatchError, match=rf"^The checkpoint at {re.escape(str(tmp_path))} .*{says}"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_ignore_mismatched_sizes_and_output_loading_info_behave_as_in_transformers(tmp_path):
    model, state_dict = _llama_state()
    state_dict["pretrained_model.model.norm.weight"] = torch.ones(33)
    write_checkpoint(tmp_path, model.config, state_dict)

    loaded, info = AutoModelForCausalLMWithValueHead.from_pretrained(
        tmp_path, ignore_mismatched_sizes=True, output_loading_info=True
    )

    assert info["mismatched_keys"] == {("pretrained_model.model.norm.weight", (33,), (32,))}
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.pretrained_model.model.norm.weight.shape == (32,)  # re-initialised, as transformers does
    assert torch.equal(loaded.v_head.summary.weight, model.v_head.summary.weight)
    good = tmp_path / "good"
    write_checkpoint(good, model.config, _llama_state()[1])
    assert isinstance(AutoModelForCausalLMWithValueHead.from_pretrained(good), AutoModelForCausalLMWithValueHead)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda head: head.pop("v_head.summary.bias"), r"it lacks v_head\.summary\.bias"),
        (lambda head: head.update({"v_head.summary.scale": torch.ones(1)}), r"the head has no v_head\.summary\.scale"),
        (lambda head: head.update({"v_head.summary.bias": torch.ones(2)}), r"v_head\.summary\.bias \(file \(2,\), "),
    ],
    ids=["lacking its bias", "an extra tensor", "a resized bias"],
)
def test_a_head_file_that_does_not_fit_is_a_mismatch_naming_it(llama_dir, tmp_path, edit, says):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())
    policy.save_pretrained(tmp_path / "policy")
    shutil.copytree(llama_dir, tmp_path / "llama-factory")
    for directory in (tmp_path / "policy", tmp_path / "llama-factory"):  # ours beside an adapter, LLaMA-Factory's
        head = {key: value for key, value in policy.v_head.state_dict().items()}
        head = {f"v_head.{key}": value.clone() for key, value in head.items()}
        edit(head)
        save_file(head, directory / "value_head.safetensors", metadata={"format": "pt"})
        file = re.escape(str(directory / "value_head.safetensors"))

        with pytest.raises(CheckpointMismatchError, match=rf"^The value head in {file} does not fit .*{says}"):
            AutoModelForCausalLMWithValueHead.from_pretrained(directory)


def test_a_plain_lm_missing_a_tensor_keeps_transformers_behaviour(tmp_path):
    bare = build_bare("llama")
    state_dict = {key: value for key, value in bare.state_dict().items() if key != "model.norm.weight"}
    write_checkpoint(tmp_path, bare.config, state_dict)

    model, info = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, output_loading_info=True)

    assert info["missing_keys"] == {"pretrained_model.model.norm.weight"}  # reported, and freshly initialised
    assert not model.v_head_source.is_loaded
    assert torch.equal(model.pretrained_model.model.embed_tokens.weight, bare.model.embed_tokens.weight)


@pytest.mark.parametrize("family", ["gpt2", "opt", "t5", "bart"])
def test_tied_weights_are_not_missing(tmp_path, family):
    """GPT-2, OPT, T5 and BART save their tied LM head (and T5/BART their tied embeddings) once."""
    model = saved_value_head_model(tmp_path, family)

    loaded, info = value_head_class(family).from_pretrained(tmp_path, output_loading_info=True)

    assert not any(info.values()), info
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("family", "edit"),
    [
        ("bart", lambda sd: sd.pop("pretrained_model.final_logits_bias")),  # BART's `_keys_to_ignore_on_load_missing`
        ("gpt2", lambda sd: sd.update({"pretrained_model.transformer.h.0.attn.bias": torch.ones(1, 1, 64, 64)})),
        ("llama", lambda sd: sd.update({"pretrained_model.model.rotary_emb.inv_freq": torch.ones(4)})),
    ],
    ids=["a missing key the class ignores", "an old key the class ignores", "an old non-persistent buffer"],
)
def test_keys_the_wrapped_class_ignores_do_not_trip_the_check(tmp_path, family, edit):
    model = saved_value_head_model(tmp_path / "saved", family)
    state_dict = load_file(tmp_path / "saved" / "model.safetensors")
    edit(state_dict)
    write_checkpoint(tmp_path / "edited", model.config, state_dict)

    loaded = value_head_class(family).from_pretrained(tmp_path / "edited")

    assert torch.equal(loaded.v_head.summary.weight, model.v_head.summary.weight)
    assert loaded.v_head_source.is_loaded


# --------------------------------------------------------------------- v_head_source is true in every layout (6b)


def _ours(path: Path, **save_kwargs):
    model = saved_value_head_model(path, **save_kwargs)
    return model.v_head.state_dict(), None


def _ours_peft(path: Path):
    policy = AutoModelForCausalLMWithValueHead(get_peft_model(build_bare("llama"), policy_lora()))
    seeded(policy.v_head)
    policy.pretrained_model.peft_config["default"].base_model_name_or_path = str(path / "base")
    build_bare("llama").save_pretrained(path / "base")
    policy.save_pretrained(path)
    return policy.v_head.state_dict(), path / "value_head.safetensors"


def _trl(path: Path, **save_kwargs):
    head = trl_head()
    save_trl_layout(path, head, **save_kwargs)
    return {key.removeprefix("v_head."): value for key, value in head.items()}, None


def _trl_pickle(path: Path, shards: int = 1):
    head = trl_head()
    save_trl_pickle_layout(path, head, shards=shards)
    return {key.removeprefix("v_head."): value for key, value in head.items()}, None


def _trl_peft(path: Path):
    """TRL's PEFT save: peft's adapter files, and `pytorch_model.bin` holding only `v_head.*`."""
    build_bare("llama").save_pretrained(path / "base")
    peft_model = get_peft_model(build_bare("llama"), policy_lora())
    peft_model.peft_config["default"].base_model_name_or_path = str(path / "base")
    peft_model.save_pretrained(path)
    head = trl_head(seed=4)
    torch.save(head, path / "pytorch_model.bin")
    return {key.removeprefix("v_head."): value for key, value in head.items()}, path / "pytorch_model.bin"


def _trlx(path: Path):
    head = trlx_mlp_head(32)
    save_trlx_layout(path, build_bare("llama"), head)
    names = {"0.weight": "hidden_layer.weight", "0.bias": "hidden_layer.bias", "2.weight": "summary.weight"}
    return {names.get(key, "summary.bias"): value for key, value in head.state_dict().items()}, None


def _openrlhf(path: Path, prefix: str):
    source = OpenRLHFRewardModel(tiny_config("llama"), prefix).eval()
    seeded(getattr(source, prefix))
    if prefix != "value_head":
        source.config.value_head_prefix = prefix
    source.save_pretrained(path)
    return {"summary.weight": getattr(source, prefix).weight, "summary.bias": torch.zeros(1)}, None


def _classifier(path: Path, auto_class):
    source = classifier(auto_class, "llama", path)
    has_bias = source.score.bias is not None
    return {
        "summary.weight": source.score.weight,
        "summary.bias": source.score.bias if has_bias else torch.zeros(1),
    }, None


def _deepspeed_chat(path: Path):
    backbone = AutoModel.from_config(tiny_config("llama"))
    v_head = seeded(nn.Linear(32, 1, bias=False))
    backbone.config.save_pretrained(path)
    state_dict = {f"rwtransformer.{key}": value for key, value in backbone.state_dict().items()}
    torch.save({**state_dict, "v_head.weight": v_head.weight}, path / "pytorch_model.bin")
    return {"summary.weight": v_head.weight, "summary.bias": torch.zeros(1)}, None


def _llama_factory(path: Path, name: str):
    build_bare("llama").save_pretrained(path)
    head = trl_head(seed=5)
    if name.endswith(".safetensors"):
        save_file(head, path / name, metadata={"format": "pt"})
    else:
        torch.save(head, path / name)
    return {key.removeprefix("v_head."): value for key, value in head.items()}, path / name


def _index_without_the_head(path: Path):
    """A sharded checkpoint of ours whose index does not list the head's keys, while a shard holds them."""
    head, _ = _ours(path, max_shard_size="20KB")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"].pop("v_head.summary.weight")
    index["weight_map"].pop("v_head.summary.bias")
    index_file.write_text(json.dumps(index))
    return head, path / shard


def _plain(path: Path):
    build_bare("llama").save_pretrained(path)
    return None, None


LAYOUTS = {
    "ours": _ours,
    "ours, sharded": lambda path: _ours(path, max_shard_size="20KB"),
    "ours, a variant": lambda path: _ours(path, variant="v1"),
    "ours, PEFT": _ours_peft,
    "TRL, model.safetensors": _trl,
    "TRL, sharded safetensors": lambda path: _trl(path, max_shard_size="20KB"),
    "TRL, pytorch_model.bin": _trl_pickle,
    "TRL, sharded pytorch_model.bin": lambda path: _trl_pickle(path, shards=3),
    "TRL, PEFT pytorch_model.bin": _trl_peft,
    "trlx": _trlx,
    "OpenRLHF, old (value_head)": lambda path: _openrlhf(path, "value_head"),
    "OpenRLHF, new (value_head_prefix)": lambda path: _openrlhf(path, "reward_head"),
    "HF sequence classification": lambda path: _classifier(path, AutoModelForSequenceClassification),
    "verl token classification": lambda path: _classifier(path, AutoModelForTokenClassification),
    "DeepSpeed-Chat": _deepspeed_chat,
    "LLaMA-Factory value_head.safetensors": lambda path: _llama_factory(path, "value_head.safetensors"),
    "LLaMA-Factory value_head.bin": lambda path: _llama_factory(path, "value_head.bin"),
    "index not listing the head, a shard holding it": _index_without_the_head,
    "plain LM": _plain,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_v_head_source_is_loaded_exactly_when_the_head_holds_the_saved_tensors(tmp_path, layout):
    torch.manual_seed(0)
    saved, head_file = LAYOUTS[layout](tmp_path)

    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        tmp_path, **({"variant": "v1"} if "variant" in layout else {})
    )

    loaded = model.v_head.state_dict()
    if saved is None:
        assert not model.v_head_source.is_loaded
        return
    assert model.v_head_source.is_loaded, model.v_head_source
    assert set(loaded) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor.to(torch.float32)), key
    if head_file is not None:
        assert model.v_head_source.file == str(head_file)


def test_a_head_only_the_callers_key_mapping_names_is_reported_as_loaded(tmp_path):
    bare = build_bare("llama")
    head = {"critic.weight": torch.randn(1, 32), "critic.bias": torch.randn(1)}
    bare.save_pretrained(tmp_path, state_dict={**bare.state_dict(), **head})

    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, key_mapping={r"^critic\.": "v_head.summary."})

    assert model.v_head_source.is_loaded and model.v_head_source.file == str(tmp_path)
    assert torch.equal(model.v_head.summary.weight, head["critic.weight"])
    assert torch.equal(model.v_head.summary.bias, head["critic.bias"])
    assert not AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path).v_head_source.is_loaded  # no mapping
