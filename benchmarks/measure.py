"""One case in a fresh process: `python -m benchmarks.measure ROW IMPLEMENTATION ...` writes its timings and peak
memory as JSON (and what else its row reports: `cases.sizes`). A fresh process per case means no allocator state,
cache or lazy import carried over from another.

A row of several processes (`Row.processes`) is measured with all its implementations at once
(`python -m benchmarks.measure ROW IMPLEMENTATION...`): after the imports this process forks its ranks
(`torch.multiprocessing`, so a rank that fails stops the others), they join a gloo group, the implementations take
turns call by call, and rank 0 writes the result. Forking after the imports spares each rank importing torch and
transformers again, what costs most in a row's run on a tiny workload.

Peak memory is the high-water mark of the bytes held by tensors the call allocated (net of what it freed), counted
from the allocation events PyTorch's CPU allocator reports to the profiler. That is exact and repeatable; the process
RSS is not, because glibc keeps freed heap memory and hands it out again (on this workload RSS moved by +-10 MB from
run to run). The profiled call is an extra one, after the timed ones, so the profiler costs no time.
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .workload import Workload


def timings(
    calls: dict[str, Callable[[], object]], warmup: int, repeats: int, synchronize: Callable[[], object] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each implementation, after `warmup` untimed calls of each. Several take turns call by call,
    the first of a turn rotating, so that the machine's drift falls on all alike. Each result is dropped before the
    next call starts; `synchronize` (a barrier of the row's processes) lines the processes up before each timed call."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            if synchronize is not None:
                synchronize()
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def peak_tensor_bytes(call: Callable[[], object]) -> int:
    """The most bytes that tensors allocated during one call held at the same time."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        call()
    # Allocations are "[memory]" events with positive byte counts, frees negative ones (of tensors allocated inside).
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def main(argv: list[str] | None = None) -> int:
    from .rows import ROWS_BY_NAME
    from .workload import Workload

    parser = argparse.ArgumentParser(prog="python -m benchmarks.measure", description=__doc__)
    parser.add_argument("row", help="a row of the table, or 'prepare' to save the checkpoints some rows read")
    parser.add_argument("implementations", nargs="*", help="one, or all of a row of several processes")
    parser.add_argument("--workload", required=True, help="the Workload as JSON")
    parser.add_argument("--checkpoints", required=True, help="the directory of the saved checkpoints")
    parser.add_argument("--output", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    workload = Workload.from_json(args.workload)

    import torch
    from transformers.utils import logging

    from . import cases

    torch.set_num_threads(workload.threads)
    logging.disable_progress_bar()
    logging.set_verbosity_error()  # a fresh head's warning is expected here; the table is the output
    if args.row == "prepare":
        cases.save_checkpoints(workload, args.checkpoints)
        return 0

    processes = ROWS_BY_NAME[args.row].processes
    if processes == 1:
        measure(args, workload)
        return 0
    with socket.socket() as sock:  # a free port for the ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.start_processes(
        measure_rank, args=(processes, port, args, workload), nprocs=processes, start_method="fork"
    )
    return 0


def measure(
    args: argparse.Namespace, workload: Workload, synchronize: Callable[[], object] | None = None, writes: bool = True
) -> None:
    """Times the row's implementations given and writes their cells (`writes`: this process reports)."""
    import torch

    from . import cases

    calls = {name: cases.build(args.row, name, workload, args.checkpoints) for name in args.implementations}
    with torch.no_grad():
        seconds = timings(calls, workload.warmup, workload.repeats, synchronize)
        peaks = {name: peak_tensor_bytes(call) for name, call in calls.items()}
    cells = {
        name: {"seconds": seconds[name], "peak_bytes": peaks[name], "sizes": cases.sizes(args.row, name, workload)}
        for name in calls
    }
    if writes:
        with open(args.output, "w") as out:
            json.dump({"row": args.row, "cells": cells}, out)


def measure_rank(rank: int, world_size: int, port: int, args: argparse.Namespace, workload: Workload) -> None:
    """One rank of a row of several processes: joins the gloo group, lines up with the others before each timed call;
    rank 0 reports."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        measure(args, workload, synchronize=dist.barrier, writes=rank == 0)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
