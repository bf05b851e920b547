"""The `transformers-vhead` command."""

from __future__ import annotations

import argparse
import sys
import tempfile


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="transformers-vhead-demo-")
    result = run_demo(output_dir)
    print(f"saved a value-head model to {result.model_dir}")
    print(f"AutoModelForCausalLM.from_pretrained -> {result.model_class}")
    print(f"generated (greedy): {result.generated_text!r}")
    print("token        value")
    for token, value in result.token_values:
        print(f"{token:<12} {value:+.4f}")
    # Reloaded tensors are memory-mapped, so a kernel may sum in another order: equal weights, values within 1 ulp.
    print(f"weights after reload identical: {result.weights_identical}")
    print(f"largest value difference after reload: {result.max_value_difference:.1e}")
    return 0 if result.weights_identical and result.max_value_difference < 1e-5 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="transformers-vhead", description="Value-head language models for Hugging Face transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="build a tiny model, save it, reload it through AutoModelForCausalLM, generate, compute values"
    )
    demo.add_argument("--output-dir", help="where to save the demo models (default: a new temporary directory)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
