"""Runs a script of `tests/engines/` in 2 CPU processes (gloo) and returns what rank 0 wrote.

A worker script writes its results as JSON to the path in `VHEAD_RESULT` (rank 0 only); a failure shows every rank's
output. Each launch runs in the test's `tmp_path` on a free port, so launches of parallel tests never meet.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ENGINES = Path(__file__).parent / "engines"

# `accelerate launch` on CPU with N processes. Its MULTI_CPU config starts a single process unless mpirun starts the
# ranks, and `--cpu` takes the single-process launcher too; MULTI_GPU takes its torchrun launcher, and each rank
# then needs ACCELERATE_USE_CPU (what `--cpu` sets for the single-process launcher) to pick MULTI_CPU over gloo.
ACCELERATE_ON_CPU = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "MULTI_GPU",
    "use_cpu": True,
    "num_machines": 1,
    "machine_rank": 0,
    "mixed_precision": "no",
    "gpu_ids": "all",
    "main_training_function": "main",
    "debug": False,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(result: Path) -> dict[str, str]:
    """The environment of every rank: offline, one thread each (2 ranks on 2 cores), no GPU, the project importable."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        VHEAD_RESULT=str(result),
        PYTHONPATH=os.pathsep.join([str(ENGINES.parent), str(ENGINES.parent.parent), env.get("PYTHONPATH", "")]),
    )
    return env


def torchrun(script: str, *args: str, tmp_path: Path, num_processes: int = 2, timeout: float = 300) -> dict:
    """`torchrun --nproc-per-node N tests/engines/<script> args...`; returns rank 0's JSON."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={num_processes}",
        f"--master-port={free_port()}", str(ENGINES / script), *args,
    ]  # fmt: skip
    return _run(command, tmp_path, timeout)


def accelerate_launch(
    script: str, *args: str, config: dict | None = None, tmp_path: Path, num_processes: int = 2, timeout: float = 300
) -> dict:
    """`accelerate launch --config_file <tmp_path>/accelerate.yaml tests/engines/<script> args...` on CPU.

    The config file is `ACCELERATE_ON_CPU` updated with `config` (e.g. `distributed_type: FSDP` and an `fsdp_config`),
    always given, so a user's `~/.cache/huggingface/accelerate` config never matters.
    """
    settings = {**ACCELERATE_ON_CPU, **(config or {}), "num_processes": num_processes}
    config_file = tmp_path / "accelerate.yaml"
    config_file.write_text(json.dumps(settings, indent=2))  # JSON is YAML: accelerate reads it as the yaml it is named
    command = [
        sys.executable, "-m", "accelerate.commands.launch", f"--config_file={config_file}",
        f"--main_process_port={free_port()}", str(ENGINES / script), *args,
    ]  # fmt: skip
    return _run(command, tmp_path, timeout, ACCELERATE_USE_CPU="true")


def _run(command: list[str], tmp_path: Path, timeout: float, **environment: str) -> dict:
    result = tmp_path / "result.json"
    process = subprocess.run(
        command, env={**worker_env(result), **environment}, cwd=tmp_path, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if process.returncode != 0 or not result.exists():
        raise AssertionError(
            f"{' '.join(command)} exited with {process.returncode}\n--- stdout ---\n{process.stdout[-6000:]}\n"
            f"--- stderr ---\n{process.stderr[-12000:]}"
        )
    return json.loads(result.read_text())


def write_result(payload: dict) -> None:
    """For worker scripts: rank 0 writes its results for the test."""
    Path(os.environ["VHEAD_RESULT"]).write_text(json.dumps(payload))
