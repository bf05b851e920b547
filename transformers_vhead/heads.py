"""The value head: dropout, then an fp32 `Linear(hidden_size, 1)` with bias, in TRL's layout (`v_head.summary.*`);
optionally a ReLU hidden layer before it (`v_head.hidden_layer.*`), the MLP head of trlx checkpoints."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init

from .configuration import base_summary_dropout_prob, resolve_hidden_size

NOT_GIVEN: Any = object()  # `summary_dropout_prob=None` given means no dropout, as in TRL


class ValueHead(nn.Module):
    """A scalar per token, read from the final hidden state.

    The weights are fp32 whatever the wrapped model's dtype, and the input is upcast with autocast off, so values come
    out fp32 even under `torch.autocast` or a bf16/fp16 base model.

    Args:
        config: the wrapped model's config; the input width comes from [`resolve_hidden_size`].
        summary_dropout_prob: dropout before the linear layer; 0 or `None` disables it. Not given: the config's
            `summary_dropout_prob` when it has one, else 0.1 (TRL's default).
        hidden_size: the width of a ReLU hidden layer before the output layer (trlx's heads: twice the model's
            hidden size); `None`, the default, is TRL's single linear layer.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        summary_dropout_prob: float | None = NOT_GIVEN,
        hidden_size: int | None = None,
    ):
        super().__init__()
        if summary_dropout_prob is NOT_GIVEN:
            summary_dropout_prob = base_summary_dropout_prob(config)
        self.dropout = nn.Dropout(summary_dropout_prob) if summary_dropout_prob else nn.Identity()
        width = resolve_hidden_size(config)
        if hidden_size is not None:
            self.hidden_layer = nn.Linear(width, hidden_size, dtype=torch.float32)
            width = hidden_size
        self.summary = nn.Linear(width, 1, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Returns the values, shape `hidden_states.shape[:-1] + (1,)`, fp32."""
        output = self.dropout(hidden_states)
        with torch.autocast(device_type=output.device.type, enabled=False):
            output = output.to(self.summary.weight.dtype)
            if hasattr(self, "hidden_layer"):
                output = torch.relu(self.hidden_layer(output))
            return self.summary(output)

    @property
    def linear_layers(self) -> tuple[nn.Linear, ...]:
        """The head's linear layers, input first."""
        return (self.hidden_layer, self.summary) if hasattr(self, "hidden_layer") else (self.summary,)

    @torch.no_grad()
    def reset_parameters(self, strategy: str | None = None, initializer_range: float = 0.2) -> None:
        """Initialises a fresh head; tensors already loaded from a checkpoint are left alone.

        Args:
            strategy: `None` for PyTorch's default `nn.Linear` init (TRL's default), `"normal"` for
                N(0, `initializer_range`) weights and a zero bias.
            initializer_range: standard deviation of the `"normal"` init.
        """
        for layer in self.linear_layers:
            init_linear(layer, strategy, initializer_range)


def init_linear(layer: nn.Linear, strategy: str | None, initializer_range: float) -> None:
    """Initialises one layer of the value head (see `ValueHead.reset_parameters`)."""
    weight, bias = layer.weight, layer.bias
    if strategy == "normal":
        init.normal_(weight, mean=0.0, std=initializer_range)
        init.zeros_(bias)
    else:
        init.kaiming_uniform_(weight, a=math.sqrt(5))
        # fan-in from the layer, not the tensor: under ZeRO-3 a weight already loaded is left as an empty shard
        bound = 1 / math.sqrt(layer.in_features)
        init.uniform_(bias, -bound, bound)


class ScoreHead(nn.Linear):
    """A reward adapter's `score` head (`Linear(hidden_size, num_labels)`, bias as saved), frozen and fp32.

    Its input is upcast with autocast off, so scores are fp32 whatever the model's dtype. `mean` and `std`, when the
    reward model was saved with them, normalise sequence scores (OpenRLHF's `config.mean` / `config.std`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, mean=None, std=None):
        num_labels, hidden_size = weight.shape
        super().__init__(hidden_size, num_labels, bias=bias is not None, dtype=torch.float32, device=weight.device)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.requires_grad_(False)
        self.mean, self.std = mean, std

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            return super().forward(hidden_states.to(self.weight.dtype))
