"""Start-up: seconds from a fresh interpreter to the end of a command, median over fresh processes.

    python -m benchmarks.startup               # 7 rounds
    python -m benchmarks.startup --rounds 3

`import transformers_vhead` is measured against importing what its registration needs (transformers' auto classes,
`PreTrainedModel`, the pipeline registry), the floor a registering import cannot go below; the command's `--help`
and a usage error against the targets of an answer "at once". Each round runs every case once, in a rotating order.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .run import trl_version

REGISTRATION_NEEDS = (
    "import torch; from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, "
    "GenerationMixin, PreTrainedModel; from transformers.pipelines import PIPELINE_REGISTRY"
)


@dataclass(frozen=True)
class Case:
    name: str
    command: tuple[str, ...]
    exit_code: int = 0
    compared_with: str | None = None  # another case's name: the ratio to it is shown (and checked against target)
    target: float | None = None  # the most: a ratio with `compared_with`, else seconds


def cases() -> list[Case]:
    python, script = sys.executable, str(Path(sys.executable).parent / "transformers-vhead")
    found = [
        Case("python -c pass", (python, "-c", "pass")),
        Case("import what registration needs", (python, "-c", REGISTRATION_NEEDS)),
        Case(
            "import transformers_vhead",
            (python, "-c", "import transformers_vhead"),
            compared_with="import what registration needs",
            target=1.05,
        ),
        Case("transformers-vhead --help", (script, "--help"), target=1.0),
        Case("transformers-vhead score (usage error)", (script, "score"), exit_code=2, target=1.0),
    ]
    trl = trl_version()
    if trl is not None:
        found.append(Case(f"import trl.experimental.ppo (TRL {trl})", (python, "-c", "import trl.experimental.ppo")))
    return found


def seconds_of(case: Case) -> float:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    start = time.perf_counter()
    process = subprocess.run(case.command, capture_output=True, text=True, env=environment)
    elapsed = time.perf_counter() - start
    if process.returncode != case.exit_code:
        raise RuntimeError(f"{case.name} exited {process.returncode}:\n{process.stderr[-2000:]}")
    return elapsed


def table(medians: dict[str, float], all_cases: list[Case]) -> str:
    lines = ["| case | median | ratio | target |", "|---|---|---|---|"]
    for case in all_cases:
        ratio, verdict = "", ""
        value = medians[case.name]
        if case.compared_with is not None:
            value = value / medians[case.compared_with]
            ratio = f"{value:.2f}x {case.compared_with}"
        if case.target is not None:
            unit = "x" if case.compared_with is not None else " s"
            verdict = f"{'PASS' if value <= case.target else 'MISS'} (<= {case.target:.2f}{unit})"
        lines.append(f"| {case.name} | {medians[case.name]:.2f} s | {ratio} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="fresh processes per case (default 7)")
    args = parser.parse_args(argv)
    all_cases = cases()
    seconds: dict[str, list[float]] = {case.name: [] for case in all_cases}
    for round_index in range(args.rounds):
        shift = round_index % len(all_cases)
        for case in all_cases[shift:] + all_cases[:shift]:
            seconds[case.name].append(seconds_of(case))
        print(f"[{round_index + 1}/{args.rounds}]", file=sys.stderr, flush=True)
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "transformers", "transformers-vhead"))
    print(f"start-up, {args.rounds} fresh process(es) per case; {versions}")
    print()
    print(table({name: statistics.median(values) for name, values in seconds.items()}, all_cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
