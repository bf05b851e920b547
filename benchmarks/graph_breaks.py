"""torch.compile: graph breaks of our calls against the bare model's, and (with `--inductor`) compile time and the
largest difference from eager.

    python -m benchmarks.graph_breaks                  # dynamo only: graphs and breaks (with their reasons), seconds
    python -m benchmarks.graph_breaks --inductor       # also compiles with inductor (minutes on a CPU, cold cache)

The calls: the forward (logits + values) against the bare causal LM's forward, and the value-only calls
(`forward(return_logits=False)`, `compute_values`) against the bare backbone's forward (no LM head). A tiny Llama
built from a config, `dynamic=False`. Not a test: compiling with inductor takes too long for CI
(`tests/test_placement.py` checks there is no break with `fullgraph=True` on dynamo's eager backend).
"""

from __future__ import annotations

import argparse
import time

TINY_LLAMA = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inductor", action="store_true", help="also compile with inductor: time and max |diff|")
    args = parser.parse_args(argv)

    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers_vhead import AutoModelForCausalLMWithValueHead

    torch.manual_seed(0)
    bare = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    ours = AutoModelForCausalLMWithValueHead(bare).eval()
    input_ids = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 16))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    calls = {
        "forward": [("bare", bare, {}), ("ours", ours, {})],
        "value-only forward": [("bare backbone", bare.model, {}), ("ours", ours, {"return_logits": False})],
        "compute_values": [("bare backbone", bare.model, {}), ("ours", ours.compute_values, {})],
    }

    print(f"torch {torch.__version__}; graphs and breaks from torch._dynamo.explain (dynamic=False)")
    with torch.no_grad():
        for call, implementations in calls.items():
            for name, function, kwargs in implementations:
                torch._dynamo.reset()
                counters.clear()
                start = time.perf_counter()
                explained = torch._dynamo.explain(function)(**inputs, **kwargs)
                seconds = time.perf_counter() - start
                print(
                    f"{call:20} {name:14} graphs {explained.graph_count}  breaks {explained.graph_break_count}  "
                    f"({seconds:.1f} s)"
                )
                for reason, count in counters["graph_break"].items():
                    print(f"{'':36} {count} x {' '.join(reason.split())[:200]}")
        if args.inductor:
            inductor(ours, inputs)


def inductor(model, inputs: dict) -> None:
    import torch
    import torch._dynamo

    expected = model(**inputs)
    expected_values = model.compute_values(**inputs)
    torch._dynamo.reset()
    start = time.perf_counter()
    output = torch.compile(model, dynamic=False)(**inputs)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model.compile(dynamic=False)  # in place: compute_values' `self(...)` is the compiled forward
    values = model.compute_values(**inputs)
    values_seconds = time.perf_counter() - start
    logits_diff = (output.logits - expected.logits).abs().max().item()
    value_diff = (output.value - expected.value).abs().max().item()
    values_diff = (values - expected_values).abs().max().item()
    diffs = f"max |diff| logits {logits_diff:.1e}, value {value_diff:.1e}"
    print(f"inductor forward: first call {compile_seconds:.1f} s, {diffs}")
    print(f"inductor model.compile() + compute_values: first call {values_seconds:.1f} s, max |diff| {values_diff:.1e}")


if __name__ == "__main__":
    main()
