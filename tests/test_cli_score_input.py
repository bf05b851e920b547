"""`transformers-vhead score` on malformed input (issue 15, item 5): one error line naming the line (and the byte),
exit code 1, nothing on stdout; and `--output FILE`, written atomically: a failure leaves no partial file and an
existing FILE as it was."""

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from architectures import tiny_config
from conftest import build_bare
from transformers import AutoModelForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead_cli import main

TEXTS = ["the critic says this answer is good", "bad", "a very poor answer"]
MAX_POSITIONS = 32


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transformers-vhead: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A value-head Llama that takes at most MAX_POSITIONS tokens, with its tokenizer."""
    from transformers_vhead.demo import tiny_tokenizer

    path = tmp_path_factory.mktemp("score-input") / "critic"
    config = tiny_config("llama")
    config.max_position_embeddings = MAX_POSITIONS
    torch.manual_seed(0)
    AutoModelForCausalLMWithValueHead(AutoModelForCausalLM.from_config(config)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def score_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "texts.txt"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"texts.txt holds no text to score \(it is empty\): write one text per line"),
        (b"\n  \n\t\n", r"texts.txt holds no text to score \(its 3 line\(s\) are blank\)"),
        (b"good answer\r\n\r\nbad answer\r\n", r"line 2 of .*texts.txt is empty"),
        (
            b"good answer\nbad \xff answer\n",
            r"line 2 of .*texts.txt is not UTF-8: the byte 0xff at byte offset 16 of the file \(byte 4 of the line\)",
        ),
        (b"\xff\xfeg\x00o\x00o\x00d\x00", r"texts.txt is UTF-16 text .* save it as UTF-8"),
        (b"good\nba\x00d\n", r"line 2 of .*texts.txt holds a NUL byte \(at byte offset 7 of the file\)"),
        (
            b"good\n" + b"answer " * (MAX_POSITIONS + 1) + b"\n",
            rf"line 2 of .*texts.txt has {MAX_POSITIONS + 1} tokens, more than the model takes \({MAX_POSITIONS}, "
            rf"max_position_embeddings of its config\): pass --max-length {MAX_POSITIONS} \(or less\)",
        ),
    ],
    ids=["empty file", "only blank lines", "blank line among texts", "not UTF-8", "UTF-16", "NUL byte", "huge line"],
)
def test_malformed_input_is_one_error_line_and_nothing_on_stdout(model_dir, tmp_path, capsys, content, message):
    texts = score_file(tmp_path, content)
    output = tmp_path / "scores.jsonl"

    code, out, err = run(capsys, "score", model_dir, "--input", texts, "--batch-size", "1")
    code_with_output, out_with_output, err_with_output = run(
        capsys, "score", model_dir, "--input", texts, "--output", output
    )

    assert (code, out, code_with_output, out_with_output) == (1, "", 1, "")
    assert re.search(message, error_line(err)), err
    assert error_line(err_with_output) == error_line(err)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["texts.txt"]  # no output file, no temporary file


def expected_scores(model_dir: Path, texts: list[str], max_length: int | None = None) -> list[float]:
    from transformers import AutoTokenizer

    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scores = []
    for text in texts:
        encoded = tokenizer(text, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
        scores.append(model.compute_sequence_scores(**encoded).item())
    return scores


def rows_of(text: str) -> list[dict]:
    """The JSON lines of `text`, split at "\n" only, as JSON Lines are (a text's U+2028 is written as it is)."""
    return [json.loads(line) for line in text.split("\n") if line]


def test_a_huge_line_with_max_length_is_truncated_and_scored(model_dir, tmp_path, capsys):
    long_text = " ".join(["answer"] * (MAX_POSITIONS + 5))
    texts = score_file(tmp_path, f"{TEXTS[0]}\n{long_text}\n".encode())

    code, out, _ = run(capsys, "score", model_dir, "--input", texts, "--max-length", "8")

    assert code == 0
    rows = rows_of(out)
    assert [row["line"] for row in rows] == [1, 2] and rows[1]["text"] == long_text
    expected = expected_scores(model_dir, [TEXTS[0], long_text], max_length=8)
    torch.testing.assert_close(torch.tensor([row["score"] for row in rows]), torch.tensor(expected), atol=1e-6, rtol=0)


def test_a_tokenizer_limit_below_the_models_is_the_one_named(tmp_path, capsys):
    from transformers_vhead.demo import tiny_tokenizer

    path = tmp_path / "critic"
    AutoModelForCausalLMWithValueHead(build_bare("llama")).save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 4
    tokenizer.save_pretrained(path)
    texts = score_file(tmp_path, b"good\nthe answer is very good\n")

    code, out, err = run(capsys, "score", path, "--input", texts)

    assert (code, out) == (1, "")
    assert "line 2 of" in error_line(err)
    assert "has 5 tokens, more than the model takes (4, the tokenizer's model_max_length)" in error_line(err)


def test_lines_are_the_files_lines_crlf_bom_and_unicode_separators_included(model_dir, tmp_path, capsys):
    """Lines end at "\\n" only (str.splitlines would also split at a form feed or U+2028, and the line numbers would
    no longer be the file's); "\\r\\n" endings and a UTF-8 BOM do not reach the texts."""
    lines = ["\ufeffgood answer", "bad\x0canswer", "very\u2028poor", "the answer"]
    texts = score_file(tmp_path, "\r\n".join(lines).encode("utf-8"))

    code, out, _ = run(capsys, "score", model_dir, "--input", texts)

    assert code == 0
    rows = rows_of(out)
    assert [(row["line"], row["text"]) for row in rows] == list(enumerate(["good answer", *lines[1:]], start=1))


def test_output_writes_the_json_lines_to_the_file_and_nothing_to_stdout(model_dir, tmp_path, capsys):
    texts = score_file(tmp_path, ("\n".join(TEXTS) + "\n").encode())
    output = tmp_path / "scores.jsonl"

    code, stdout_rows, _ = run(capsys, "score", model_dir, "--input", texts, "--batch-size", "2")
    code_with_output, out, _ = run(
        capsys, "score", model_dir, "--input", texts, "--batch-size", "2", "--output", output
    )

    assert (code, code_with_output, out) == (0, 0, "")
    assert output.read_text(encoding="utf-8") == stdout_rows
    assert [row["line"] for row in rows_of(stdout_rows)] == [1, 2, 3]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask  # as a plain open() would make it, not 0600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scores.jsonl", "texts.txt"]


def test_output_replaces_an_existing_file_keeping_its_permissions(model_dir, tmp_path, capsys):
    texts = score_file(tmp_path, ("\n".join(TEXTS) + "\n").encode())
    output = tmp_path / "scores.jsonl"
    output.write_text("old scores\n")
    output.chmod(0o640)

    code, _, _ = run(capsys, "score", model_dir, "--input", texts, "--output", output)

    assert code == 0 and [row["text"] for row in rows_of(output.read_text())] == TEXTS
    assert stat.S_IMODE(output.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    ("failure", "exit_code"), [(OSError(28, "No space left on device"), 1), (KeyboardInterrupt(), 130)]
)
def test_a_failure_while_scoring_leaves_an_existing_output_file_as_it_was(
    model_dir, tmp_path, capsys, monkeypatch, failure, exit_code
):
    """A failure injected at the second batch, after the first batch's lines were written to the temporary file."""
    texts = score_file(tmp_path, ("\n".join(TEXTS) + "\n").encode())
    output = tmp_path / "scores.jsonl"
    output.write_text("old scores\n")
    real, calls = AutoModelForCausalLMWithValueHead.compute_sequence_scores, []

    def failing_at_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise failure
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLMWithValueHead, "compute_sequence_scores", failing_at_the_second_batch)

    code, out, err = run(capsys, "score", model_dir, "--input", texts, "--batch-size", "2", "--output", output)

    assert (code, out, len(calls)) == (exit_code, "", 2)
    assert output.read_text() == "old scores\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scores.jsonl", "texts.txt"]
    if exit_code == 1:
        assert "No space left on device" in error_line(err)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("missing/scores.jsonl", r"the directory of --output .*missing/scores.jsonl does not exist"),
        (".", r"--output .* is a directory: name the file"),
    ],
    ids=["no such directory", "a directory"],
)
def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, where, message):
    texts = score_file(tmp_path, b"good answer\n")

    code, out, err = run(capsys, "score", tmp_path / "no-model-here", "--input", texts, "--output", tmp_path / where)

    assert (code, out) == (1, "")
    assert re.search(message, error_line(err)), err
