"""Value and reward heads saved by other projects load with their exact values, and say which layout they came in.

Each fixture is written by the project's own writer where it installs (transformers' `*ForSequenceClassification` and
`*ForTokenClassification` classes, which OpenRLHF and verl subclass or use as they are), and otherwise from the key
names the project documents (OpenRLHF's dynamically built reward model, LLaMA-Factory's `value_head.safetensors`, trlx's
`base_model.*` / MLP `v_head.{0,2}.*`, DeepSpeed-Chat's `rwtransformer.*` / `v_head.weight`). TRL's layouts are in
test_loading.py, and TRL 1.12's own writer in test_architectures.py.
"""

import json
import logging

import pytest
import torch
from architectures import tiny_config
from conftest import build_bare, model_inputs
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaModel,
    LlamaPreTrainedModel,
)

from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead.errors import HeadShapeMismatchError, UnrecognizedLayoutError


def seeded(module: nn.Module, seed: int = 7) -> nn.Module:
    """Gives every parameter of `module` seeded random values (fresh heads are often zero-initialised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module


def classifier(auto_class, family: str, path, seed: int = 0):
    """A `*ForSequenceClassification` / `*ForTokenClassification` model with one label, saved by transformers."""
    config = tiny_config(family)
    config.num_labels = 1
    config.pad_token_id = 0
    torch.manual_seed(seed)
    model = auto_class.from_config(config).eval()
    head = [module for name, module in model.named_children() if name != model.base_model_prefix][-1]
    seeded(head)
    model.save_pretrained(path)
    return model


def final_hidden_state(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.base_model(**inputs).last_hidden_state


def loaded_values(path, inputs, **kwargs):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path, **kwargs).eval()
    with torch.no_grad():
        return model, model.compute_values(**inputs)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "falcon"])
def test_sequence_classifier_with_one_label_warm_starts_a_critic(tmp_path, family):
    source = classifier(AutoModelForSequenceClassification, family, tmp_path)
    inputs = {**model_inputs(family), "attention_mask": None}

    model, values = loaded_values(tmp_path, inputs)

    expected = source.score(final_hidden_state(source, inputs)).squeeze(-1)
    torch.testing.assert_close(values, expected, atol=1e-6, rtol=0)
    with torch.no_grad():  # transformers' own reward: the score at the last token
        torch.testing.assert_close(values[:, -1], source(**inputs).logits.squeeze(-1), atol=1e-6, rtol=0)
    assert torch.equal(model.v_head.summary.weight, source.score.weight)
    assert torch.equal(model.v_head.summary.bias, torch.zeros(1))  # transformers' score has no bias
    assert model.v_head_source.layout == "HF sequence classification"
    assert model.v_head_source.file == str(tmp_path / "model.safetensors")


@pytest.mark.parametrize(("family", "head_name"), [("llama", "score"), ("gpt2", "classifier")])
def test_token_classifier_critic_of_verl_loads_with_its_bias(tmp_path, family, head_name):
    source = classifier(AutoModelForTokenClassification, family, tmp_path)
    inputs = model_inputs(family)

    model, values = loaded_values(tmp_path, inputs)

    with torch.no_grad():
        torch.testing.assert_close(values, source(**inputs).logits.squeeze(-1), atol=1e-6, rtol=0)
    head = getattr(source, head_name)
    assert torch.equal(model.v_head.summary.bias, head.bias) and head.bias.abs().item() > 0
    assert model.v_head_source.layout == "HF token classification (verl)"


class OpenRLHFRewardModel(LlamaPreTrainedModel):
    """OpenRLHF's `_get_reward_model(LlamaPreTrainedModel, LlamaModel, value_head_prefix)` class: the backbone under
    `base_model_prefix` and a bias-free `Linear(hidden, 1)` under the head's name; `mean` / `std` live in the config."""

    def __init__(self, config, value_head_prefix: str = "score"):
        super().__init__(config)
        setattr(self, self.base_model_prefix, LlamaModel(config))
        self.value_head_prefix = value_head_prefix
        setattr(self, value_head_prefix, nn.Linear(config.hidden_size, 1, bias=False))
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        hidden = getattr(self, self.base_model_prefix)(input_ids, attention_mask=attention_mask).last_hidden_state
        return getattr(self, self.value_head_prefix)(hidden).squeeze(-1)


@pytest.mark.parametrize("prefix", ["score", "value_head", "reward_head"])
def test_openrlhf_reward_model_loads_with_its_head_name_and_normalisation(tmp_path, prefix):
    config = tiny_config("llama")
    torch.manual_seed(0)
    source = OpenRLHFRewardModel(config, prefix).eval()
    seeded(getattr(source, prefix))
    if prefix != "value_head":  # OpenRLHF stores the name since Dec 2024; older checkpoints used `value_head` unnamed
        source.config.value_head_prefix = prefix
    source.config.normalize_reward, source.config.mean, source.config.std = True, 0.25, 2.0
    source.save_pretrained(tmp_path)
    inputs = model_inputs("llama")

    model, values = loaded_values(tmp_path, inputs)

    with torch.no_grad():
        expected = source(**inputs)
        torch.testing.assert_close(values, expected, atol=1e-6, rtol=0)
        normalized = model.compute_sequence_scores(**inputs, normalize=True)
    torch.testing.assert_close(normalized, (expected[:, -1] - 0.25) / 2.0, atol=1e-6, rtol=0)
    assert (model.config.score_mean, model.config.score_std) == (0.25, 2.0)
    assert model.v_head_source.layout == "OpenRLHF"


@pytest.mark.parametrize("file_name", ["value_head.safetensors", "value_head.bin"])
def test_llama_factory_value_head_beside_the_model(tmp_path, file_name):
    bare = build_bare("llama")
    bare.save_pretrained(tmp_path)
    head = {"v_head.summary.weight": torch.randn(1, 32), "v_head.summary.bias": torch.randn(1)}
    if file_name.endswith(".safetensors"):
        save_file(head, tmp_path / file_name, metadata={"format": "pt"})
    else:
        torch.save(head, tmp_path / file_name)
    inputs = model_inputs("llama")

    model, values = loaded_values(tmp_path, inputs)

    expected = final_hidden_state(bare, inputs) @ head["v_head.summary.weight"].T + head["v_head.summary.bias"]
    torch.testing.assert_close(values, expected.squeeze(-1), atol=1e-6, rtol=0)
    assert model.v_head_source.layout == "LLaMA-Factory"
    assert model.v_head_source.file == str(tmp_path / file_name)


def trlx_mlp_head(hidden: int) -> nn.Sequential:
    """trlx's `make_head(hidden, 1)`: Linear(hidden, 2 * hidden), ReLU, Linear(2 * hidden, 1)."""
    return seeded(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, 1)))


def save_trlx_layout(path, bare, head: nn.Module, extra: dict | None = None) -> None:
    """trlx's `save_pretrained`: `base_model.*` and `v_head.*` keys in `pytorch_model.bin`, the base config."""
    state_dict = {f"base_model.{key}": value for key, value in bare.state_dict().items()}
    state_dict.update({f"v_head.{key}": value for key, value in head.state_dict().items()})
    bare.config.save_pretrained(path)
    torch.save({**state_dict, **(extra or {})}, path / "pytorch_model.bin")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trlx_mlp_head_loads_as_a_head_with_a_hidden_layer(tmp_path, family):
    bare = build_bare(family)
    head = trlx_mlp_head(32)
    hydra = {"frozen_head.decoder_blocks.0.ln_1.weight": torch.ones(32)}  # the hydra reference branch: not ours
    save_trlx_layout(tmp_path, bare, head, hydra)
    inputs = model_inputs(family)

    model, values = loaded_values(tmp_path, inputs)

    torch.testing.assert_close(values, head(final_hidden_state(bare, inputs)).squeeze(-1), atol=1e-6, rtol=0)
    assert model.config.v_head_hidden_size == 64 and model.config.summary_dropout_prob == 0.0
    assert model.v_head_source.layout == "trlx"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, bare(**inputs).logits, atol=1e-6, rtol=0)

    model.save_pretrained(tmp_path / "native")  # saved in our own layout, and loads back through the auto class
    card = (tmp_path / "native" / "README.md").read_text()
    assert "| hidden layer (`v_head_hidden_size`) | 64, ReLU (trlx's MLP head) |" in card
    assert "(trlx layout) |" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    assert reloaded.v_head_source.layout == "transformers-vhead"
    for name, tensor in model.v_head.state_dict().items():
        assert torch.equal(reloaded.v_head.state_dict()[name], tensor), name


def test_trlx_value_branch_cannot_be_held_by_one_head_and_says_why(tmp_path):
    bare = build_bare("gpt2")
    save_trlx_layout(tmp_path, bare, trlx_mlp_head(32), {"v_head.decoder_blocks.0.ln_1.weight": torch.ones(32)})

    with pytest.raises(UnrecognizedLayoutError, match="value branch.*num_value_layers_unfrozen"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_deepspeed_chat_reward_model_loads(tmp_path, family):
    """DeepSpeed-Chat's `RewardModel`: `AutoModel` as `rwtransformer`, `v_head = Linear(hidden, 1, bias=False)`."""
    bare = build_bare(family)
    backbone = AutoModel.from_config(bare.config)
    backbone.load_state_dict(bare.base_model.state_dict())
    v_head = seeded(nn.Linear(bare.config.word_embed_proj_dim if family == "opt" else 32, 1, bias=False))
    state_dict = {f"rwtransformer.{key}": value for key, value in backbone.state_dict().items()}
    backbone.config.save_pretrained(tmp_path)
    torch.save({**state_dict, "v_head.weight": v_head.weight}, tmp_path / "pytorch_model.bin")
    inputs = model_inputs(family)

    model, values = loaded_values(tmp_path, inputs)

    torch.testing.assert_close(values, v_head(final_hidden_state(bare, inputs)).squeeze(-1), atol=1e-6, rtol=0)
    assert model.v_head_source.layout == "DeepSpeed-Chat"


def test_a_converted_checkpoint_saves_in_our_layout_not_the_one_it_came_in(tmp_path):
    source = classifier(AutoModelForSequenceClassification, "llama", tmp_path / "seq-cls")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "seq-cls")

    model.save_pretrained(tmp_path / "native")

    index = json.loads((tmp_path / "native" / "model.safetensors").read_bytes()[8:].split(b"}}")[0] + b"}}")
    assert "v_head.summary.weight" in index and "score.weight" not in index
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "native")
    assert torch.equal(reloaded.v_head.summary.weight, source.score.weight)
    assert reloaded.v_head_source.layout == "transformers-vhead"


def test_a_classifier_with_several_labels_is_not_a_value_head(tmp_path):
    config = tiny_config("llama")
    config.num_labels = 3
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)

    with pytest.raises(HeadShapeMismatchError, match=r"score.weight.*\(3, 32\).*\(1, 32\)|\(3, 32\)"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_a_peer_head_for_another_hidden_size_names_both_shapes(tmp_path):
    classifier(AutoModelForSequenceClassification, "llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 48  # the base this head would load into is wider than the head
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(HeadShapeMismatchError, match=r"HF sequence classification layout.*\(1, 32\).*\(1, 48\)"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


@pytest.mark.parametrize(("family", "warned"), [("llama", True), ("gpt2", False)])
def test_a_reward_model_without_lm_head_says_its_logits_mean_nothing(tmp_path, caplog, family, warned):
    classifier(AutoModelForSequenceClassification, family, tmp_path)  # gpt2 ties its LM head to the embeddings

    with caplog.at_level(logging.WARNING, logger="transformers_vhead"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)

    messages = [record.getMessage() for record in caplog.records if "without an LM head" in record.getMessage()]
    assert len(messages) == (1 if warned else 0)
    if warned:
        assert "HF sequence classification checkpoint" in messages[0] and "compute_values" in messages[0]
