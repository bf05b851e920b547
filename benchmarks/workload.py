"""The benchmark's sizes: a Llama-shaped model built from a config, its inputs and how often each case is timed."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Workload:
    """Model and input sizes plus repetitions. The defaults are the workload the targets are set for."""

    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 688
    batch_size: int = 8
    seq_len: int = 256
    new_tokens: int = 32
    threads: int = 1
    warmup: int = 1
    repeats: int = 5
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One `--flag` per size (`--hidden-size 512`, ...), defaulting to this workload's value."""
        for field in fields(cls):
            parser.add_argument(
                f"--{field.name.replace('_', '-')}", type=int, default=field.default, help=f"default {field.default}"
            )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Workload:
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def describe(self) -> str:
        return (
            f"Llama-shaped model from a config: vocab {self.vocab_size}, hidden {self.hidden_size}, "
            f"{self.num_hidden_layers} layers, {self.num_attention_heads} heads, "
            f"intermediate {self.intermediate_size}; "
            f"batch {self.batch_size} x {self.seq_len} tokens, {self.new_tokens} new tokens for generate; no_grad, "
            f"{self.threads} thread(s), median of {self.repeats} after {self.warmup} warm-up"
        )
