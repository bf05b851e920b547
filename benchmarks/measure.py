"""One case in a fresh process: `python -m benchmarks.measure ROW IMPLEMENTATION ...` writes its timings and peak
memory as JSON (and what else its row reports: `cases.sizes`). A fresh process per case means no allocator state,
cache or lazy import carried over from another.

Peak memory is the high-water mark of the bytes held by tensors the call allocated (net of what it freed), counted
from the allocation events PyTorch's CPU allocator reports to the profiler. That is exact and repeatable; the process
RSS is not, because glibc keeps freed heap memory and hands it out again (on this workload RSS moved by +-10 MB from
run to run). The profiled call is an extra one, after the timed ones, so the profiler costs no time.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable


def timings(call: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds per call, after `warmup` untimed calls. Each result is dropped before the next call starts."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
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
    from .workload import Workload

    parser = argparse.ArgumentParser(prog="python -m benchmarks.measure", description=__doc__)
    parser.add_argument("row", help="a row of the table, or 'prepare' to save the checkpoints some rows read")
    parser.add_argument("implementation", nargs="?")
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

    call = cases.build(args.row, args.implementation, workload, args.checkpoints)
    with torch.no_grad():
        seconds = timings(call, workload.warmup, workload.repeats)
        peak = peak_tensor_bytes(call)
    result = {
        "row": args.row,
        "implementation": args.implementation,
        "seconds": seconds,
        "peak_bytes": peak,
        "sizes": cases.sizes(args.row, args.implementation, workload),
    }
    with open(args.output, "w") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
