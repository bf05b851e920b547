"""The benchmark runner end to end on a tiny size (every row, every implementation, a number in every cell), and the
target verdicts it prints. No timing assertions: speed is measured in `benchmarks/`, never in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import cases
from benchmarks.report import Cell, checks, spread, summary, table
from benchmarks.rows import BARE, OURS, ROWS, TRL
from benchmarks.run import main, trl_version
from benchmarks.workload import Workload

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "vocab-size": 64,
    "hidden-size": 16,
    "num-hidden-layers": 2,
    "num-attention-heads": 2,
    "intermediate-size": 32,
    "batch-size": 2,
    "seq-len": 8,
    "new-tokens": 2,
    "warmup": 0,
    "repeats": 2,
    "rounds": 1,
}


def test_runner_measures_every_row_in_fresh_processes(tmp_path):
    results_file = tmp_path / "results.json"
    flags = [part for name, value in TINY.items() for part in (f"--{name}", str(value))]
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *flags, "--json", str(results_file)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert process.returncode == 0, process.stderr

    document = json.loads(results_file.read_text())
    assert document["trl"] == trl_version()  # the TRL column is there exactly when TRL 1.12 is installed
    assert document["workload"]["hidden_size"] == 16
    for row in ROWS:
        expected = {name for name in row.implementations if name != TRL or document["trl"]}
        cells = document["results"][row.name]
        assert set(cells) == expected, row.name
        for name, cell in cells.items():
            [seconds] = cell["seconds"]  # one round
            assert len(seconds) == TINY["repeats"] and min(seconds) > 0, (row.name, name)
            assert cell["peak_bytes"] > 0, (row.name, name)
        assert f"| {row.name} |" in process.stdout
    checked = {(check["row"], check["kind"]) for check in document["checks"]}
    targets = {(row.name, kind) for row in ROWS for kind in ("time", "memory") if getattr(row.target, kind)}
    assert checked == targets
    assert "targets: " in process.stdout


@torch.no_grad()
def test_reward_score_cases_compute_the_same_scores(tmp_path):
    # What the reward row times is the same work for every column: the reward adapter's last-token score (bare: the
    # backbone's hidden state with the reward adapter active, scored here by the adapter's `score` weight).
    workload = Workload(**{name.replace("-", "_"): value for name, value in TINY.items() if name != "rounds"})
    cases.save_checkpoints(workload, str(tmp_path))
    ours = cases.build("reward score", OURS, workload, str(tmp_path))()
    assert ours.shape == (workload.batch_size,) and ours.dtype == torch.float32

    adapter = load_file(tmp_path / cases.REWARD_ADAPTER / "adapter_model.safetensors")
    [score] = [tensor for name, tensor in adapter.items() if name.endswith("score.weight")]
    hidden = cases.build("reward score", BARE, workload, str(tmp_path))().last_hidden_state
    torch.testing.assert_close(ours, (hidden[:, -1] @ score.T).squeeze(-1), rtol=0, atol=1e-4)
    plain = cases.bare_model(workload).model(**cases.inputs(workload), use_cache=False).last_hidden_state
    assert not torch.allclose(hidden, plain, atol=1e-4)  # the reward adapter is active and not a no-op

    if trl_version():
        theirs = cases.build("reward score", TRL, workload, str(tmp_path))()
        torch.testing.assert_close(ours, theirs.squeeze(-1), rtol=0, atol=1e-4)


def test_unknown_row_is_refused(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--rows", "forward,backward"])
    assert raised.value.code == 2
    assert "unknown row(s) ['backward']" in capsys.readouterr().err


def _results(forward_seconds: float, forward_bytes: int) -> dict:
    return {
        "forward": {
            BARE: Cell(rounds=[[1.0, 1.0, 1.0]], peak_bytes=1000),
            OURS: Cell(rounds=[[forward_seconds, 0.5, forward_seconds]], peak_bytes=forward_bytes),
        }
    }


def test_verdicts_compare_our_median_and_peak_with_bare():
    within = _results(forward_seconds=1.03, forward_bytes=1020)
    assert checks(within) == [("forward", "time", 1.03, 1.03), ("forward", "memory", 1.02, 1.02)]
    assert summary(within) == "targets: 2 PASS, 0 MISS"
    assert "1.03x PASS (<= 1.03x)" in table(within, None)

    over = _results(forward_seconds=1.04, forward_bytes=1030)
    assert summary(over) == "targets: 0 PASS, 2 MISS (forward time 1.04x > 1.03x; forward memory 1.03x > 1.02x)"
    assert "1.04x MISS (<= 1.03x)" in table(over, None)


def test_time_ratios_pair_the_processes_of_each_round():
    # The machine slowed down 2x from our process of round 2 on. The per-round ratios are 1.02, 2.0 and 1.02; the
    # overall medians (2.0 / 1.0) would blame the drift on the implementation.
    bare = Cell(rounds=[[1.0], [1.0], [2.0]], peak_bytes=1)
    ours = Cell(rounds=[[1.02], [2.0], [2.04]], peak_bytes=1)
    assert ours.time_ratio(bare) == pytest.approx(1.02)
    assert (ours.median, bare.median) == (2.0, 1.0)
    assert spread({"forward": {BARE: bare, OURS: ours}}, None) == "- forward: transformers-vhead 1.02-2.00x"
