"""Exports: the plain LM for serving, an HF sequence classifier, and TRL's layout, each reloaded by its own loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from architectures import VOCAB_SIZE
from conftest import bare_class, build_bare, is_seq2seq, model_inputs, policy_lora, value_head_class
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead.errors import ExportError
from transformers_vhead.export import EXPORT_FORMATS, export_model

CAUSAL = ("gpt2", "llama", "opt")
HEAD_KEYS = {"v_head.summary.weight", "v_head.summary.bias"}


def value_model(family: str, bias: float = 0.0, seed: int = 0):
    """A value-head model of `family` in eval mode, its head weight random (nonzero) and its bias `bias`."""
    model = value_head_class(family)(build_bare(family, seed)).eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        model.v_head.summary.weight.normal_()
        model.v_head.summary.bias.fill_(bias)
    return model


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(path, framework="pt") as file:
            tensors.update({name: file.get_tensor(name) for name in file.keys()})
    return tensors


def right_padded(batch: int = 2, length: int = 7) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random ids with the first row right-padded by two pad tokens (id 0), and each row's last real position."""
    input_ids = torch.randint(3, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, -2:], attention_mask[0, -2:] = 0, 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}, attention_mask.sum(-1) - 1


# --- causal-lm / seq2seq-lm ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*CAUSAL, "t5"])
def test_lm_export_reloads_as_the_plain_model_with_equal_logits_and_no_head(family, tmp_path):
    model = value_model(family)
    to = "seq2seq-lm" if is_seq2seq(family) else "causal-lm"
    result = export_model(model, tmp_path / "lm", to=to)

    reloaded = bare_class(family).from_pretrained(tmp_path / "lm").eval()
    assert type(reloaded) is type(model.pretrained_model)
    inputs = model_inputs(family)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    assert not any(name.startswith("v_head") for name in saved_tensors(tmp_path / "lm"))
    assert (tmp_path / "lm" / "generation_config.json").exists()
    assert result.format == to and result.directory == tmp_path / "lm"
    assert result.notes[0].startswith("the value head was dropped")


@pytest.mark.parametrize(
    ("family", "to", "message"),
    [
        ("t5", "causal-lm", "to='seq2seq-lm'"),
        ("llama", "seq2seq-lm", "to='causal-lm'"),
        ("bart", "seq-cls", "MLP head"),
        ("t5", "seq-cls", "MLP head"),
        ("cohere", "seq-cls", "no sequence-classification class for CohereForCausalLM"),
    ],
)
def test_export_to_a_format_that_does_not_fit_raises_and_writes_nothing(family, to, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        export_model(value_model(family), tmp_path / "out", to=to)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("to", ["seq-cls", "trl"])
def test_a_head_with_a_hidden_layer_is_refused_where_one_linear_layer_must_hold_it(to, tmp_path):
    model = AutoModelForCausalLMWithValueHead(build_bare("llama"), v_head_hidden_size=64)  # trlx's MLP head

    with pytest.raises(ExportError, match="hidden layer.*v_head_hidden_size=64"):
        export_model(model, tmp_path / "out", to=to)
    assert not (tmp_path / "out").exists()
    assert export_model(model, tmp_path / "lm", to="causal-lm").format == "causal-lm"


# --- seq-cls -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", CAUSAL)
def test_seq_cls_export_scores_each_sequence_with_its_last_token_value(family, tmp_path):
    model = value_model(family)
    result = export_model(model, tmp_path / "cls", to="seq-cls")

    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    assert type(classifier).__name__ == classifier.config.architectures[0]
    assert classifier.config.num_labels == 1 and classifier.config.pad_token_id == 0
    assert torch.equal(saved_tensors(tmp_path / "cls")["score.weight"], model.v_head.summary.weight)
    inputs, last = right_padded()
    with torch.no_grad():
        values = model.compute_values(**inputs)
        scores = classifier(**inputs).logits
        hidden = classifier.base_model(**inputs).last_hidden_state
        per_token = classifier.score(hidden).squeeze(-1)
    assert scores.shape == (2, 1)
    torch.testing.assert_close(scores[:, 0], values[torch.arange(2), last], rtol=0, atol=1e-6)
    torch.testing.assert_close(per_token, values, rtol=0, atol=1e-6)
    assert result.notes == ()


def test_seq_cls_export_refuses_a_head_bias_unless_it_is_dropped(tmp_path):
    model = value_model("llama", bias=0.25)
    with pytest.raises(ExportError, match=r"bias 0\.25.*shifted by -0\.25.*drop_bias=True"):
        export_model(model, tmp_path / "refused", to="seq-cls")
    assert not (tmp_path / "refused").exists()

    result = export_model(model, tmp_path / "cls", to="seq-cls", drop_bias=True)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    inputs = model_inputs("llama")
    with torch.no_grad():
        hidden = classifier.base_model(**inputs).last_hidden_state
        expected = model.compute_values(**inputs) - 0.25
        torch.testing.assert_close(classifier.score(hidden).squeeze(-1), expected, rtol=0, atol=1e-6)
    assert result.notes == ("the value head's bias (0.25) was dropped: exported values are ours minus 0.25.",)


def test_seq_cls_export_of_a_bf16_model_without_pad_token_says_what_changed(tmp_path):
    model = value_head_class("llama")(build_bare("llama").to(torch.bfloat16)).eval()
    model.v_head.summary.bias.data.zero_()
    model.config.pad_token_id = None
    result = export_model(model, tmp_path / "cls", to="seq-cls")

    score = saved_tensors(tmp_path / "cls")["score.weight"]
    assert score.dtype == torch.bfloat16 and torch.equal(score, model.v_head.summary.weight.to(torch.bfloat16))
    assert model.v_head.summary.weight.dtype == torch.float32  # the model's own head is untouched
    assert [note.split(":")[0] for note in result.notes] == [
        "the score head runs in the model's dtype (torch.bfloat16)",
        "the config has no pad_token_id",
    ]


# --- trl -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*CAUSAL, "t5"])
def test_trl_export_keeps_the_head_beside_unprefixed_base_weights_and_reloads_exactly(family, tmp_path):
    model = value_model(family, bias=0.3)
    export_model(model, tmp_path / "trl", to="trl")

    tensors = saved_tensors(tmp_path / "trl")
    assert HEAD_KEYS <= tensors.keys() and not any(name.startswith("pretrained_model.") for name in tensors)
    reloaded = value_head_class(family).from_pretrained(tmp_path / "trl").eval()
    for name, tensor in model.v_head.summary.named_parameters():
        assert torch.equal(getattr(reloaded.v_head.summary, name), tensor)
    inputs = model_inputs(family)
    with torch.no_grad():
        assert torch.equal(reloaded.compute_values(**inputs), model.compute_values(**inputs))


@pytest.mark.parametrize("family", ["llama", "opt", "t5"])
def test_trl_export_loads_in_trl_with_the_same_values(trl_ppo, family, tmp_path):
    model = value_model(family, bias=0.3)
    export_model(model, tmp_path / "trl", to="trl")

    trl_class = trl_ppo.AutoModelForSeq2SeqLMWithValueHead if is_seq2seq(family) else None
    trl_model = (trl_class or trl_ppo.AutoModelForCausalLMWithValueHead).from_pretrained(str(tmp_path / "trl"))
    trl_model.eval()  # TRL's head dropout off
    inputs = model_inputs(family)
    with torch.no_grad():
        _, _, trl_values = trl_model(**inputs)
        torch.testing.assert_close(trl_values, model.compute_values(**inputs), rtol=0, atol=1e-6)


# --- PEFT policies -------------------------------------------------------------------------------------------------


PEFT_LOADERS = {
    "causal-lm": bare_class("llama"),
    "seq-cls": AutoModelForSequenceClassification,
    "trl": AutoModelForCausalLMWithValueHead,
}


@pytest.mark.parametrize("to", PEFT_LOADERS)
def test_peft_policy_exports_merged_without_its_reward_adapter_and_stays_unchanged(
    to, llama_dir, reward_adapter_dir, tmp_path
):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, peft_config=policy_lora(), reward_adapter=reward_adapter_dir
    ).eval()
    model.v_head.summary.bias.data.zero_()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = export_model(model, tmp_path / "out", to=to)

    reloaded = PEFT_LOADERS[to].from_pretrained(tmp_path / "out").eval()
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs)
        with model.pretrained_model.disable_adapter():
            base_logits = model(**inputs).logits
        if to == "seq-cls":
            values = reloaded.score(reloaded.base_model(**inputs).last_hidden_state).squeeze(-1)
            torch.testing.assert_close(values, expected.value, rtol=0, atol=1e-5)
        else:
            actual = reloaded(**inputs)
            torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-5)
        if to == "trl":
            torch.testing.assert_close(actual.value, expected.value, rtol=0, atol=1e-5)
    assert not torch.allclose(base_logits, expected.logits, atol=1e-3)  # the adapter matters
    assert not any("lora_" in name for name in saved_tensors(tmp_path / "out"))

    assert model.is_peft_model and set(model.pretrained_model.peft_config) == {"default", model.rm_adapter_name}
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    assert any(note.startswith("the PEFT adapter 'default' was merged") for note in result.notes)
    assert any(f"{model.rm_adapter_name!r} (the reward adapter)" in note for note in result.notes)


# --- arguments -----------------------------------------------------------------------------------------------------


def test_export_refuses_a_non_empty_directory_and_unknown_formats_but_takes_an_empty_one(tmp_path):
    model = value_model("gpt2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_model(model, tmp_path / "taken", to="causal-lm")
    assert [path.name for path in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match=", ".join(EXPORT_FORMATS)):
        export_model(model, tmp_path / "out", to="onnx")

    (tmp_path / "empty").mkdir()
    assert export_model(model, tmp_path / "empty", to="trl").directory == tmp_path / "empty"
    assert (tmp_path / "empty" / "model.safetensors").exists()
