"""Runs every case in a fresh process and prints one table against bare transformers (and TRL 1.12 if installed).

    python -m benchmarks.run                    # the default workload, the one the targets are set for
    python -m benchmarks.run --hidden-size 512 --rounds 3 --json results.json

Each round runs every (row, implementation) once, rows one after another and the implementations of a row back to back
in a rotating order. Times are medians over all rounds; a time ratio is the median over rounds of that round's ratio
(see `Cell.time_ratio`). This process never imports torch: it only starts the cases and reports.

A row may have sizes of its own (`Row.workload`: the reference rows' model, whose layers outweigh its LM head); a size
flag given applies to every row, so `--hidden-size 16 ...` shrinks those rows too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from .report import Cell, Results, checks, reference_notes, spread, summary, table
from .rows import ROWS, ROWS_BY_NAME, TRL
from .workload import Workload

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def trl_version() -> str | None:
    """The installed TRL if it still has value heads (they were deleted in 1.13), else None."""
    try:
        version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        return None
    major, minor = (int(part) for part in version.split(".")[:2])
    return version if (major, minor) < (1, 13) else None


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    packages = ("torch", "transformers", "transformers-vhead", "trl")
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "packages": ", ".join(f"{name} {version}" for name, version in versions.items()),
    }


def run_case(arguments: list[str], workload: Workload, checkpoints: str) -> dict | None:
    """Runs `python -m benchmarks.measure ARGUMENTS` in a fresh process; returns what it wrote."""
    environment = dict(
        os.environ,
        OMP_NUM_THREADS=str(workload.threads),
        MKL_NUM_THREADS=str(workload.threads),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRL_EXPERIMENTAL_SILENCE="1",
    )
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        command = [sys.executable, "-m", "benchmarks.measure", *arguments]
        command += ["--workload", workload.to_json(), "--checkpoints", checkpoints, "--output", output.name]
        process = subprocess.run(command, cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True)
        if process.returncode != 0:
            raise RuntimeError(f"benchmark case {arguments} failed:\n{process.stderr[-3000:]}")
        text = Path(output.name).read_text()
    return json.loads(text) if text else None


def measure_all(workloads: dict[str, Workload], rounds: int, with_trl: bool, checkpoints: str) -> Results:
    """Every row of `workloads` (row name -> its workload), each implementation of it, `rounds` times."""
    rows = list(workloads)
    cases = [
        (row, implementation)
        for row in rows
        for implementation in ROWS_BY_NAME[row].implementations
        if with_trl or implementation != TRL
    ]
    seconds: dict[tuple[str, str], list[list[float]]] = {case: [] for case in cases}
    peaks: dict[tuple[str, str], int] = {}
    sizes: dict[tuple[str, str], dict[str, int]] = {}  # what a row reports besides time and peak (cases.sizes)
    total, done = rounds * len(cases), 0
    for round_index in range(rounds):
        for row in rows:
            implementations = [case[1] for case in cases if case[0] == row]
            shift = round_index % len(implementations)
            implementations = implementations[shift:] + implementations[:shift]
            # a row of several processes: all its implementations in one case, taking turns call by call
            launches = [implementations] if ROWS_BY_NAME[row].processes > 1 else [[name] for name in implementations]
            for launched in launches:
                result = run_case([row, *launched], workloads[row], checkpoints)
                for implementation, cell in result["cells"].items():
                    seconds[row, implementation].append(cell["seconds"])
                    peaks[row, implementation] = max(peaks.get((row, implementation), 0), cell["peak_bytes"])
                    sizes[row, implementation] = cell["sizes"]
                    done += 1
                    print(f"[{done}/{total}] {row} / {implementation}", file=sys.stderr, flush=True)
    results: Results = {}
    for row, implementation in cases:
        cell = Cell(seconds[row, implementation], peaks[row, implementation], **sizes[row, implementation])
        results.setdefault(row, {})[implementation] = cell
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    Workload.add_arguments(parser)
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh processes per case, run round by round (default 3)"
    )
    parser.add_argument("--rows", help=f"comma-separated subset of: {', '.join(row.name for row in ROWS)}")
    parser.add_argument("--without-trl", action="store_true", help="leave out the TRL column even if TRL is installed")
    parser.add_argument("--json", help="also write the results, workload and machine to this JSON file")
    args = parser.parse_args(argv)

    workload = Workload.from_arguments(args)
    rows = [row.name for row in ROWS] if not args.rows else [name.strip() for name in args.rows.split(",")]
    unknown = [name for name in rows if name not in ROWS_BY_NAME]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; the rows are: {', '.join(ROWS_BY_NAME)}")
    workloads = {name: Workload.from_arguments(args, ROWS_BY_NAME[name].workload) for name in rows}
    trl = None if args.without_trl else trl_version()

    with tempfile.TemporaryDirectory(prefix="transformers-vhead-bench-") as checkpoints:
        if any(ROWS_BY_NAME[name].checkpoints for name in rows):
            run_case(["prepare"], workload, checkpoints)
        results = measure_all(workloads, args.rounds, trl is not None, checkpoints)

    facts = machine()
    print(f"transformers-vhead benchmarks, {facts['date']}")
    print(f"machine: {facts['cpu']}; Python {facts['python']}; {facts['packages']}")
    rows_of: dict[Workload, list[str]] = {}
    for name, row_workload in workloads.items():
        rows_of.setdefault(row_workload, []).append(name)
    for row_workload, names in rows_of.items():
        scope = "" if row_workload == workload else f" of {', '.join(names)}"  # rows with sizes of their own
        print(f"workload{scope}: {row_workload.describe()}; {args.rounds} round(s) of fresh processes")
    print()
    trl_label = f"TRL {trl}" if trl else None
    print(table(results, trl_label))
    print()
    notes = reference_notes(results, workloads, trl_label)
    if notes:
        print(notes)
        print()
    for row in ROWS:
        if row.name in results:
            print(f"- {row.name}: {row.what}")
    if args.rounds > 1:
        print()
        print(f"time ratio to bare in single rounds (min-max over {args.rounds} rounds):")
        print(spread(results, trl_label))
    print()
    print(summary(results))
    if args.json:
        document = {
            "machine": facts,
            "workload": json.loads(workload.to_json()),
            "row_workloads": {name: json.loads(own.to_json()) for name, own in workloads.items() if own != workload},
            "rounds": args.rounds,
            "trl": trl,
            "results": {
                row: {
                    name: {
                        "seconds": cell.rounds,
                        "median": cell.median,
                        "peak_bytes": cell.peak_bytes,
                        "kept_bytes": cell.kept_bytes,
                        "unshared_bytes": cell.unshared_bytes,
                    }
                    for name, cell in cells.items()
                }
                for row, cells in results.items()
            },  # fmt: skip
            "checks": [dict(zip(("row", "kind", "ratio", "target"), check, strict=True)) for check in checks(results)],
        }
        Path(args.json).write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
