"""The `transformers-vhead` command: demo, inspect, convert, export, score, and its one-line errors."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_bare, model_inputs, policy_lora, populate_hub_cache
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import transformers_vhead
from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead_cli import EXPORT_FORMATS, main

COMMANDS = ("demo", "inspect", "convert", "export", "score")
TEXTS = ["the critic says this answer is good", "bad", "a very poor answer", "the policy learns", "great"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`main(argv)` in-process: the exit code, stdout and stderr (of this call only)."""
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse_lines(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines())


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transformers-vhead: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def native_dir(tmp_path: Path, tokenizer) -> Path:
    """A value-head Llama saved by this package with score normalisation, and its tokenizer."""
    path = tmp_path / "native"
    torch.manual_seed(0)
    AutoModelForCausalLMWithValueHead(build_bare("llama"), score_mean=0.5, score_std=2.0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def trl_dir(tmp_path: Path, tokenizer) -> Path:
    """A TRL (non-PEFT) checkpoint: the base model's keys and config plus `v_head.*` in the same file."""
    path = tmp_path / "trl"
    generator = torch.Generator().manual_seed(1)
    head = {"v_head.summary.weight": torch.randn(1, 32, generator=generator), "v_head.summary.bias": torch.ones(1)}
    bare = build_bare("llama")
    bare.save_pretrained(path, state_dict={**bare.state_dict(), **head})
    tokenizer.save_pretrained(path)
    return path


def test_demo_builds_saves_reloads_generates_and_scores(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert "AutoModelForCausalLM.from_pretrained -> AutoModelForCausalLMWithValueHead" in out
    assert "weights after reload identical: True" in out
    assert "generated (greedy): 'the critic says this answer is" in out
    assert (tmp_path / "critic" / "model.safetensors").is_file() and (tmp_path / "critic" / "README.md").is_file()


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"example:\n  transformers-vhead {command}" in out


def test_inspect_reports_head_origin_normalisation_and_sizes(native_dir, capsys):
    code, out, _ = run(capsys, "inspect", native_dir)

    assert code == 0
    report = parse_lines(out)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(native_dir)
    assert report["class"] == "AutoModelForCausalLMWithValueHead"
    assert (report["base_model_type"], report["architecture"]) == ("llama", "LlamaForCausalLM")
    assert (report["layers"], report["encoder_layers"], report["hidden_size"]) == ("2", "none", "32")
    assert report["dtype"] == "stored=float32 loaded=float32"
    assert report["head"] == "input_size=32 hidden_size=none bias=true dropout=0.1"
    assert report["head_source"] == str(model.v_head_source)
    assert report["head_source"].startswith(f"loaded from {native_dir / 'model.safetensors'}")
    total = sum(parameter.numel() for parameter in model.parameters())
    assert report["parameters"] == f"total={total} head=33"
    assert report["normalization"] == "mean=0.5 std=2.0"
    assert (report["peft_adapter"], report["reward_adapter"]) == ("none", "none")
    disk = sum(path.stat().st_size for path in native_dir.iterdir() if path.is_file())
    assert report["files"].startswith(f"bytes={disk} size=")


def test_inspect_json_of_a_plain_lm_reports_a_fresh_head(llama_dir, capsys):
    code, out, _ = run(capsys, "inspect", llama_dir, "--json")

    assert code == 0
    report = json.loads(out)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)
    assert report["head_source"].startswith("freshly initialised") and report["head_layout"] is None
    assert report["parameters"] == {
        "total": sum(parameter.numel() for parameter in model.parameters()),
        "head": sum(parameter.numel() for parameter in model.v_head.parameters()),
    }
    assert report["head"] == {"input_size": 32, "hidden_size": None, "bias": True, "dropout": 0.1}
    assert report["normalization"] is None and report["peft_adapter"] is None


def test_inspect_reports_a_hidden_layer_head(tmp_path, capsys):
    AutoModelForCausalLMWithValueHead(build_bare("llama"), v_head_hidden_size=64).save_pretrained(tmp_path / "mlp")

    code, out, _ = run(capsys, "inspect", tmp_path / "mlp", "--json")

    assert code == 0
    report = json.loads(out)
    assert report["head"] == {"input_size": 32, "hidden_size": 64, "bias": True, "dropout": 0.1}
    assert report["parameters"]["head"] == 32 * 64 + 64 + 64 + 1


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_inspect_loads_an_encoder_decoder_with_the_seq2seq_class(family, tmp_path, capsys):
    build_bare(family).save_pretrained(tmp_path / family)

    code, out, _ = run(capsys, "inspect", tmp_path / family, "--json")

    assert code == 0
    report = json.loads(out)
    assert report["class"] == "AutoModelForSeq2SeqLMWithValueHead" and report["base_model_type"] == family
    assert (report["layers"], report["encoder_layers"], report["head"]["input_size"]) == (2, 2, 32)


def test_inspect_reads_a_hub_id_from_the_offline_cache(native_dir, tmp_path, capsys):
    snapshot = populate_hub_cache(tmp_path / "hub", "org/critic", native_dir)

    code, out, _ = run(capsys, "inspect", "org/critic", "--cache-dir", tmp_path / "hub", "--json")

    assert code == 0
    report = json.loads(out)
    assert report["head_source"].startswith(f"loaded from {snapshot / 'model.safetensors'}")
    assert report["files"]["bytes"] == sum(path.stat().st_size for path in native_dir.iterdir() if path.is_file())


def test_inspect_reports_a_peft_adapter(llama_dir, tmp_path, capsys):
    adapter_dir = tmp_path / "adapter"
    AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora()).save_pretrained(adapter_dir)

    code, out, _ = run(capsys, "inspect", adapter_dir, "--json")

    assert code == 0
    report = json.loads(out)
    assert report["peft_adapter"] == {"name": "default", "type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert report["head_source"].startswith(f"loaded from {adapter_dir / 'value_head.safetensors'}")


def test_convert_writes_a_trl_checkpoint_natively_with_equal_values(trl_dir, tmp_path, capsys):
    destination = tmp_path / "converted"

    code, out, _ = run(capsys, "convert", trl_dir, destination)

    assert code == 0
    source = AutoModelForCausalLMWithValueHead.from_pretrained(trl_dir)
    assert out.strip() == (
        f"converted {trl_dir} (value head {source.v_head_source}) to {destination}; tokenizer copied"
    )
    assert json.loads((destination / "config.json").read_text())["model_type"] == "transformers-vhead-causal-lm"
    converted = AutoModelForCausalLMWithValueHead.from_pretrained(destination)
    assert converted.v_head_source.file == str(destination / "model.safetensors")
    inputs = model_inputs("llama")
    source_weights = source.state_dict()
    assert converted.state_dict().keys() == source_weights.keys()
    assert all(torch.equal(tensor, source_weights[name]) for name, tensor in converted.state_dict().items())
    assert torch.equal(converted.compute_values(**inputs), source.compute_values(**inputs))
    assert (
        AutoTokenizer.from_pretrained(destination)(TEXTS[0]).input_ids
        == AutoTokenizer.from_pretrained(trl_dir)(TEXTS[0]).input_ids
    )


def test_convert_of_an_adapter_copies_the_base_models_tokenizer(llama_dir, tmp_path, tokenizer, capsys):
    tokenizer.save_pretrained(llama_dir)
    adapter_dir = tmp_path / "adapter"
    AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora()).save_pretrained(adapter_dir)

    code, out, _ = run(capsys, "convert", adapter_dir, tmp_path / "converted")

    assert code == 0
    assert "with a PEFT adapter" in out and out.strip().endswith("tokenizer copied")
    assert (tmp_path / "converted" / "adapter_config.json").is_file()
    assert (tmp_path / "converted" / "tokenizer.json").is_file()


def test_convert_refuses_a_non_empty_destination_unless_overwrite(trl_dir, tmp_path, capsys):
    destination = tmp_path / "taken"
    destination.mkdir()
    (destination / "notes.txt").write_text("keep me")

    code, out, err = run(capsys, "convert", trl_dir, destination)
    assert code == 1 and out == ""
    assert_one_error_line(err, str(destination), "--overwrite")
    assert not (destination / "config.json").exists()

    assert run(capsys, "convert", trl_dir, destination, "--overwrite")[0] == 0
    assert (destination / "model.safetensors").is_file() and (destination / "notes.txt").read_text() == "keep me"


def test_export_causal_lm_reloads_with_equal_logits(native_dir, tmp_path, capsys):
    destination = tmp_path / "exported"

    code, out, _ = run(capsys, "export", native_dir, destination, "--to", "causal-lm")

    assert code == 0
    assert out.splitlines()[0].startswith("note: the value head was dropped")
    assert out.splitlines()[-1] == f"exported {native_dir} as causal-lm to {destination}; tokenizer copied"
    exported = AutoModelForCausalLM.from_pretrained(destination)
    assert type(exported).__name__ == "LlamaForCausalLM"
    model = AutoModelForCausalLMWithValueHead.from_pretrained(native_dir)
    inputs = model_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits.float(), model(**inputs).logits, rtol=0, atol=1e-6)
    assert (destination / "tokenizer.json").is_file()


def test_export_error_is_one_line(native_dir, tmp_path, capsys):

    code, _, err = run(capsys, "export", native_dir, tmp_path / "exported", "--to", "seq2seq-lm")

    assert code == 1
    assert_one_error_line(err, "causal-lm")


def test_export_seq_cls_names_the_flag_that_drops_a_head_bias(native_dir, tmp_path, capsys):
    code, _, err = run(capsys, "export", native_dir, tmp_path / "refused", "--to", "seq-cls")
    assert code == 1
    assert_one_error_line(err, "has bias", "--drop-bias")

    code, out, _ = run(capsys, "export", native_dir, tmp_path / "cls", "--to", "seq-cls", "--drop-bias")
    assert code == 0 and "note: the value head's bias" in out
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(native_dir)
    assert torch.equal(exported.score.weight, model.v_head.summary.weight)


def test_inspect_and_convert_name_a_peer_layout(tmp_path, capsys):
    config = build_bare("llama").config
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "reward-model")

    code, out, _ = run(capsys, "inspect", tmp_path / "reward-model")
    assert code == 0 and parse_lines(out)["head_layout"] == "HF sequence classification"
    code, out, _ = run(capsys, "convert", tmp_path / "reward-model", tmp_path / "critic")
    assert code == 0 and "(HF sequence classification layout)" in out
    code, out, _ = run(capsys, "inspect", tmp_path / "critic")
    assert parse_lines(out)["head_layout"] == "transformers-vhead"


def expected_scores(model_dir: Path, texts: list[str], normalize: bool = False) -> list[float]:
    """The scores of `model.compute_sequence_scores` for `texts` in one right-padded batch."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    encoded = AutoTokenizer.from_pretrained(model_dir, padding_side="right")(texts, padding=True, return_tensors="pt")
    return model.compute_sequence_scores(encoded.input_ids, encoded.attention_mask, normalize=normalize).tolist()


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_score_prints_one_json_line_per_text_equal_to_compute_sequence_scores(native_dir, tmp_path, capsys, normalize):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS) + "\n")

    flags = ["--normalize"] if normalize else []
    code, out, _ = run(capsys, "score", native_dir, "--input", texts_file, "--batch-size", "2", *flags)

    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(row["line"], row["text"]) for row in rows] == list(enumerate(TEXTS, start=1))
    torch.testing.assert_close(
        torch.tensor([row["score"] for row in rows]),
        torch.tensor(expected_scores(native_dir, TEXTS, normalize)),
        rtol=0,
        atol=1e-6,
    )


def test_score_reads_stdin(native_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TEXTS[:3])))

    code, out, _ = run(capsys, "score", native_dir, "--input", "-")

    assert code == 0
    scores = [json.loads(line)["score"] for line in out.splitlines()]
    torch.testing.assert_close(
        torch.tensor(scores), torch.tensor(expected_scores(native_dir, TEXTS[:3])), atol=1e-6, rtol=0
    )


def test_score_names_the_empty_line(native_dir, tmp_path, capsys):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("good answer\n\nbad answer\n")

    code, out, err = run(capsys, "score", native_dir, "--input", texts_file)

    assert code == 1 and out == ""
    assert_one_error_line(err, "line 2 of", "empty")


def test_score_of_a_seq2seq_model_says_it_needs_decoder_input(tmp_path, capsys):
    build_bare("t5").save_pretrained(tmp_path / "t5")
    (tmp_path / "texts.txt").write_text("good answer\n")

    code, _, err = run(capsys, "score", tmp_path / "t5", "--input", tmp_path / "texts.txt")

    assert code == 1
    assert_one_error_line(err, "seq2seq", "decoder")


def test_score_without_a_tokenizer_says_so(llama_dir, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("good answer\n")

    code, _, err = run(capsys, "score", llama_dir, "--input", tmp_path / "texts.txt")

    assert code == 1
    assert_one_error_line(err, "No tokenizer found")


def test_a_missing_model_is_one_error_line_and_exit_code_1(tmp_path, capsys):
    code, out, err = run(capsys, "inspect", tmp_path / "does-not-exist")

    assert code == 1 and out == ""
    assert_one_error_line(err)


def test_debug_re_raises_with_the_traceback(tmp_path):
    with pytest.raises(OSError):
        main(["--debug", "inspect", str(tmp_path / "does-not-exist")])


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "model", "--input", "texts.txt", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["score", "model"], ["inspect"], ["nonsense"]])
def test_help_and_usage_errors_import_neither_torch_nor_the_package(argv):
    """They answer at once: the command parses its arguments before anything heavy is imported."""
    script = (
        "import json, sys, transformers_vhead_cli\n"
        "try:\n"
        f"    transformers_vhead_cli.main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "heavy = [name for name in ('torch', 'transformers', 'transformers_vhead', 'peft') if name in sys.modules]\n"
        "print(json.dumps([code, heavy]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    code, heavy = json.loads(result.stdout.strip().splitlines()[-1])
    assert code == (0 if "--help" in argv else 2) and heavy == []
    assert ("usage: transformers-vhead" in result.stdout) if "--help" in argv else ("error:" in result.stderr)


def test_the_commands_export_formats_are_the_packages():
    assert EXPORT_FORMATS == transformers_vhead.EXPORT_FORMATS


@pytest.mark.parametrize(
    "command", [["transformers-vhead"], [sys.executable, "-m", "transformers_vhead"]], ids=["script", "module"]
)
def test_installed_command_runs(command):
    if command[0] == "transformers-vhead":
        script = Path(sys.executable).parent / "transformers-vhead"
        if not script.is_file():
            pytest.skip(f"the console script is not installed next to {sys.executable} (`pip install -e .` adds it)")
        command = [str(script)]

    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in COMMANDS)
