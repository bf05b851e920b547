"""Bad input gets a clear error: the right exception class, and a message that says what was wrong and what to do."""

import json

import huggingface_hub
import pytest
import torch
from conftest import build_bare
from transformers import AutoModelForCausalLM, BartModel, GPT2Config, LlamaConfig, OPTConfig, PreTrainedConfig, T5Model

from transformers_vhead import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    CausalLMWithValueHeadConfig,
)
from transformers_vhead.configuration import resolve_hidden_size
from transformers_vhead.errors import (
    CorruptCheckpointError,
    HeadShapeMismatchError,
    HiddenSizeNotFoundError,
    InvalidModelSourceError,
    MissingLMHeadError,
    NoModelFoundError,
    NotInOfflineCacheError,
    TransformersVheadError,
    UnknownBaseModelTypeError,
    UnknownInitStrategyError,
    UnrecognizedLayoutError,
    WrongModelKindError,
)


@pytest.mark.parametrize("source", [42, {"model": "gpt2"}, None, torch.nn.Linear(2, 2)])
def test_source_that_is_neither_path_hub_id_nor_model_is_a_type_error(source):
    with pytest.raises(InvalidModelSourceError, match="a local directory, a hub id or a transformers PreTrainedModel"):
        AutoModelForCausalLMWithValueHead.from_pretrained(source)
    assert issubclass(InvalidModelSourceError, TypeError)


def test_path_that_does_not_exist_and_is_no_hub_id_is_an_os_error(tmp_path):
    with pytest.raises(NoModelFoundError, match=r"not-there does not exist, and it is not a hub id"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "not-there"))
    assert issubclass(NoModelFoundError, OSError)


def test_directory_that_holds_no_model_says_so(tmp_path):
    (tmp_path / "README.md").write_text("# notes")

    with pytest.raises(NoModelFoundError, match=r"holds no model \(only README.md\)"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    with pytest.raises(NoModelFoundError, match="is a file, not a model directory"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "README.md")


@pytest.mark.parametrize(
    ("files", "missing"),
    [
        (["weights.pt", "notes.txt"], "no config.json"),  # a raw torch.save, no config
        (["config.json", "model.pt"], "no weights"),  # a config, but weights under a name nobody reads
        (["adapter_model.safetensors"], "no config.json"),  # an adapter without its adapter_config.json
    ],
)
def test_unrecognised_layout_lists_the_files_it_found(tmp_path, files, missing):
    for name in files:
        (tmp_path / name).write_text("{}")

    with pytest.raises(UnrecognizedLayoutError, match=missing) as error:
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert f"Found: {', '.join(sorted(files))}." in str(error.value)


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "local_files_only"])
def test_hub_id_missing_from_the_offline_cache_is_named_with_the_cache(tmp_path, monkeypatch, offline):
    kwargs = {"cache_dir": tmp_path}
    if offline == "local_files_only":  # online as far as huggingface_hub knows: local_files_only alone stops it
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        kwargs["local_files_only"] = True

    with pytest.raises(NotInOfflineCacheError) as error:
        AutoModelForCausalLMWithValueHead.from_pretrained("acme/absent", **kwargs)
    message = str(error.value)
    assert f"acme/absent is not a local directory, and the hub cache at {tmp_path} has no copy of it" in message
    assert ("HF_HUB_OFFLINE=1 is set" if offline == "HF_HUB_OFFLINE" else "local_files_only=True") in message
    assert "hf download acme/absent" in message


def test_unknown_init_strategy_lists_the_valid_ones(llama_dir):
    with pytest.raises(UnknownInitStrategyError, match=r"'xavier'.*None, 'normal'"):
        AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, v_head_init_strategy="xavier")
    with pytest.raises(UnknownInitStrategyError):
        AutoModelForCausalLMWithValueHead(build_bare("llama"), v_head_init_strategy="orthogonal")
    assert issubclass(UnknownInitStrategyError, ValueError)


def test_hidden_size_resolution_follows_trls_order():
    opt = OPTConfig(hidden_size=32, word_embed_proj_dim=16)
    assert resolve_hidden_size(opt) == 16  # the projected output, not the internal width
    assert resolve_hidden_size(LlamaConfig(hidden_size=24, num_attention_heads=4)) == 24
    assert resolve_hidden_size(GPT2Config(n_embd=40)) == 40  # through the attribute map

    multimodal = PreTrainedConfig()
    multimodal.text_config = LlamaConfig(hidden_size=48, num_attention_heads=4)
    assert resolve_hidden_size(multimodal) == 48

    encoder_decoder = PreTrainedConfig(is_encoder_decoder=True)
    encoder_decoder.decoder = LlamaConfig(hidden_size=56, num_attention_heads=4)
    assert resolve_hidden_size(encoder_decoder) == 56


def test_config_with_no_resolvable_hidden_size_names_what_was_looked_for():
    with pytest.raises(HiddenSizeNotFoundError, match="word_embed_proj_dim.*hidden_size.*text_config.hidden_size"):
        resolve_hidden_size(PreTrainedConfig())


def test_seq2seq_base_without_lm_head_is_refused():
    torch.manual_seed(0)
    for headless in (T5Model(build_bare("t5").config), BartModel(build_bare("bart").config)):
        with pytest.raises(MissingLMHeadError, match="no language-model head"):
            AutoModelForSeq2SeqLMWithValueHead.from_pretrained(headless)


def test_causal_base_without_lm_head_is_refused():
    with pytest.raises(MissingLMHeadError, match="LlamaModel has no language-model head"):
        AutoModelForCausalLMWithValueHead(build_bare("llama").model)


def test_head_of_the_wrong_shape_names_the_file_and_both_shapes(tmp_path):
    bare = build_bare("llama")
    head = {"v_head.summary.weight": torch.zeros(1, 16), "v_head.summary.bias": torch.zeros(1)}
    bare.save_pretrained(tmp_path, state_dict={**bare.state_dict(), **head})

    with pytest.raises(HeadShapeMismatchError) as error:
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)

    message = str(error.value)
    assert str(tmp_path / "model.safetensors") in message and "(1, 16)" in message and "(1, 32)" in message


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_safetensors_file_is_named(tmp_path, sharded):
    model = AutoModelForCausalLMWithValueHead(build_bare("llama"))
    model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    victim = sorted(tmp_path.glob("model*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])

    with pytest.raises(CorruptCheckpointError, match=str(victim)):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert issubclass(CorruptCheckpointError, OSError)


def test_safetensors_file_with_garbage_header_is_named(tmp_path):
    AutoModelForCausalLMWithValueHead(build_bare("llama")).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")

    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def _garbage_pickle(path):
    path.write_bytes(b"\x80\x04not really a pickle")


def _pickle_with_code(path):
    torch.save({"v_head.summary.weight": torch.zeros(1, 32), "payload": print}, path)


@pytest.mark.parametrize("write", [_garbage_pickle, _pickle_with_code], ids=["garbage", "code-in-it"])
def test_unreadable_pickle_is_named_and_never_unpickled(tmp_path, write):
    build_bare("llama").config.save_pretrained(tmp_path)
    write(tmp_path / "pytorch_model.bin")

    with pytest.raises(CorruptCheckpointError, match=r"pytorch_model\.bin as a weights-only"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_text_config_of_unknown_model_type_is_explained(tmp_path):
    AutoModelForCausalLMWithValueHead(build_bare("llama")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["model_type"] = "llama-from-the-future"
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(UnknownBaseModelTypeError, match="'llama-from-the-future'.*Upgrade transformers"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(UnknownBaseModelTypeError):
        CausalLMWithValueHeadConfig(text_config={"model_type": "llama-from-the-future"})


def test_seq2seq_model_in_the_causal_class_is_the_wrong_kind(tmp_path):
    build_bare("t5").save_pretrained(tmp_path / "t5")
    AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tmp_path / "t5").save_pretrained(tmp_path / "t5-vhead")

    with pytest.raises(WrongModelKindError, match="T5Config.*not a causal LM.*AutoModelForSeq2SeqLMWithValueHead"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "t5")
    with pytest.raises(WrongModelKindError, match="seq2seq-lm.*value-head model"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "t5-vhead")
    with pytest.raises(WrongModelKindError, match="not a seq2seq LM"):
        AutoModelForSeq2SeqLMWithValueHead.from_pretrained(build_bare("llama"))


def test_value_head_model_cannot_wrap_another():
    model = AutoModelForCausalLMWithValueHead(build_bare("llama"))
    with pytest.raises(WrongModelKindError, match="already a value-head"):
        AutoModelForCausalLMWithValueHead.from_pretrained(model)


def test_unknown_constructor_keyword_is_refused():
    config = CausalLMWithValueHeadConfig(text_config=build_bare("llama").config)
    with pytest.raises(TypeError, match="summary_dropout"):
        AutoModelForCausalLMWithValueHead(config, summary_dropout=0.1)


def test_every_error_is_a_transformers_vhead_error():
    errors = (
        InvalidModelSourceError,
        UnknownInitStrategyError,
        UnrecognizedLayoutError,
        HiddenSizeNotFoundError,
        MissingLMHeadError,
        NoModelFoundError,
        NotInOfflineCacheError,
        HeadShapeMismatchError,
        CorruptCheckpointError,
        UnknownBaseModelTypeError,
        WrongModelKindError,
    )
    assert all(issubclass(error, TransformersVheadError) for error in errors)
