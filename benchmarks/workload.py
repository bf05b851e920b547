"""The benchmark's sizes: a Llama-shaped model built from a config, its inputs and how often each case is timed."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Workload:
    """Model and input sizes plus repetitions. The defaults are the workload the targets are set for (a row may set
    sizes of its own: `Row.workload`)."""

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
        """One `--flag` per size (`--hidden-size 512`, ...). A flag given sets that size for every row; one left out
        is the row's own size, else this workload's default (so tiny flags shrink every row)."""
        for field in fields(cls):
            parser.add_argument(
                f"--{field.name.replace('_', '-')}", type=int, help=f"default {field.default} (or the row's own)"
            )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, sizes: dict[str, int] | None = None) -> Workload:
        """The defaults, overridden by a row's own `sizes`, overridden by the flags given."""
        given = {
            field.name: getattr(args, field.name) for field in fields(cls) if getattr(args, field.name) is not None
        }
        return cls(**{**(sizes or {}), **given})

    @property
    def shared_layers(self) -> int:
        """`k` of the reference rows: the reference shares the lower half of the layers with the policy."""
        return self.num_hidden_layers // 2

    def one_pass_ideal(self) -> float:
        """What policy + reference with the shared layers run once costs over two full forwards, by layer count.

        Forward FLOPs per token (a multiply-add counts 2): a layer 2·(h·(h + 2·kv) + h·h) for the attention
        projections (kv = key-value heads × head dim, which is h here: Llama's config has as many key-value heads as
        heads) + 2·3·h·intermediate for the SwiGLU MLP + 2·2·seq·h for the attention scores and weighted sum; the LM
        head 2·h·vocab. Norms, rotary embeddings and the value head are left out. The ideal is
        (L layers + head + (L - k) layers + head) / (2 × (L layers + head)).
        """
        h, heads = self.hidden_size, self.num_attention_heads
        kv = heads * (h // heads)
        layer = 2 * (h * (h + 2 * kv) + h * h) + 2 * 3 * h * self.intermediate_size + 2 * 2 * self.seq_len * h
        head = 2 * h * self.vocab_size
        full = self.num_hidden_layers * layer + head
        upper = (self.num_hidden_layers - self.shared_layers) * layer + head
        return (full + upper) / (2 * full)

    def describe(self) -> str:
        return (
            f"Llama-shaped model from a config: vocab {self.vocab_size}, hidden {self.hidden_size}, "
            f"{self.num_hidden_layers} layers, {self.num_attention_heads} heads, "
            f"intermediate {self.intermediate_size}; "
            f"batch {self.batch_size} x {self.seq_len} tokens, {self.new_tokens} new tokens for generate; no_grad, "
            f"{self.threads} thread(s), median of {self.repeats} after {self.warmup} warm-up"
        )
