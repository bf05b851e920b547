"""The `transformers-vhead` command: the demo of README's first command."""

import pytest

from transformers_vhead.cli import main


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
    assert "demo" in capsys.readouterr().out
