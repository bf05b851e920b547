"""Per-token log-probabilities (and entropy) of the given tokens from the final hidden state, through the LM head in
chunks of positions, so that the full `(batch, seq, vocab)` fp32 logits never exist.

A PPO step needs log p(token) of the sampled tokens, their entropy and the values, not the logits: at 8 x 512 positions
and a vocabulary of 32000 the fp32 logits alone are 500 MiB, and `log_softmax` makes another copy. Here the wrapped
model runs once and stops after its decoder (`capture.final_hidden_state`); then, chunk by chunk of positions and
block by block of the vocabulary, the logits are computed as the model computes them (`lm_head` in the model's dtype,
then the family's transform of [`LOGIT_TRANSFORMS`], in fp32), reduced to the log-probability of the target and the
entropy (an online logsumexp over the blocks), and dropped. The backward recomputes each block's logits instead of
keeping them, and accumulates the LM head's gradient in fp32. Peak memory is a few fp32 copies of one block's logits
(about `CHUNK_BYTES`).

An LM head that is not a plain `nn.Linear` with an ordinary weight (a PEFT adapter on it, accelerate's offload hooks, a
sharded `DTensor`, a meta weight, forward hooks) or a model type whose transform is not in the table takes the model's
own forward and `log_softmax` instead: the same numbers, without the saving, and a warning says why (once per model and
reason).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers.utils import ModelOutput, logging

from .capture import final_hidden_state
from .errors import InvalidLogProbsSettingError
from .inputs import check_model_inputs, inputs_checked
from .peft_support import without_peft

logger = logging.get_logger(__name__)

# One block of fp32 logits takes about this much memory (the forward and backward hold a few such copies at once)...
CHUNK_BYTES = 16 * 2**20
# ... a block being a chunk of positions by at most this many tokens of the vocabulary. The logits of a large
# vocabulary are reduced block by block (an online logsumexp), so that a chunk still has hundreds of positions (the
# LM head's product runs at full speed) and each block is still in the cache when it is reduced: at a vocabulary of
# 151936 that is 1.9x faster than a chunk of 27 positions by the whole vocabulary.
VOCAB_BLOCK = 8192


@dataclass(frozen=True)
class LogitTransform:
    """What a family's LM forward does around `lm_head(hidden)`, read from its config (see [`LOGIT_TRANSFORMS`]).

    Applied in this order; a field left `None` does nothing.

    Args:
        hidden_scale: the hidden state is multiplied by it before the LM head (T5 with tied embeddings:
            `d_model ** -0.5`).
        logit_bias: the name of a buffer of the LM model added to the logits (BART's `final_logits_bias`).
        multiply: the logits are multiplied by it (Cohere's `logit_scale`).
        divide: the logits are divided by it (Granite's `logits_scaling`).
        softcap: the logits become `softcap * tanh(logits / softcap)` (Gemma 2's `final_logit_softcapping`).
    """

    hidden_scale: float | None = None
    logit_bias: str | None = None
    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None


_PLAIN = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt", "gpt_neox", "bloom", "falcon", "gptj")
_PLAIN += ("olmo2",)

# model_type -> its transform, read from the config. Each entry was read off the installed transformers' modeling file
# (`...ForCausalLM.forward` / `...ForConditionalGeneration.forward`); a model type not listed takes the full path.
LOGIT_TRANSFORMS: dict[str, Callable[[Any], LogitTransform]] = {
    **dict.fromkeys(_PLAIN, lambda config: LogitTransform()),
    "gemma2": lambda config: LogitTransform(softcap=config.final_logit_softcapping),
    "cohere": lambda config: LogitTransform(multiply=config.logit_scale),
    "granite": lambda config: LogitTransform(divide=config.logits_scaling),
    "t5": lambda config: LogitTransform(hidden_scale=config.d_model**-0.5 if config.scale_decoder_outputs else None),
    "bart": lambda config: LogitTransform(logit_bias="final_logits_bias"),
    "pegasus": lambda config: LogitTransform(logit_bias="final_logits_bias"),
}


@dataclass
class LogProbsOutput(ModelOutput):
    """Output of [`compute_logprobs`].

    Args:
        logprobs: fp32 `(batch, seq - 1)`: entry `t` is log p(token `t + 1` | tokens up to `t`), at the temperature.
        entropy: with `return_entropy=True`, fp32 `(batch, seq - 1)`: the entropy of the distribution entry `t` is
            drawn from.
        value: with `return_values=True`, the fp32 values `(batch, seq)`, as `compute_values` gives them.
    """

    logprobs: torch.FloatTensor | None = None
    entropy: torch.FloatTensor | None = None
    value: torch.FloatTensor | None = None


class TokenLogProbs(NamedTuple):
    """What [`token_logprobs`] computes: fp32 `(batch, seq - 1)` log-probs and entropy (or None), and the decoder's
    final hidden state `(batch, seq, hidden)` it read them from."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    hidden_state: torch.Tensor


def check_logprobs_settings(temperature: float, chunk_size: int | None) -> None:
    """Raises `InvalidLogProbsSettingError` for a temperature that is not a finite number above 0, or a chunk size
    that is not a whole number of at least 1 (None chooses one)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise InvalidLogProbsSettingError(
            f"temperature must be a finite number above 0 (the logits are divided by it), got {temperature!r}. Pass "
            "the temperature the tokens were sampled with (1.0 if none)."
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InvalidLogProbsSettingError(
            f"chunk_size must be a whole number of positions, at least 1, got {chunk_size!r}. Leave it out (None) to "
            f"have it chosen so that one block of fp32 logits takes about {CHUNK_BYTES // 2**20} MiB."
        )


def scored_tokens(config, input_ids: torch.LongTensor | None, kwargs: dict) -> torch.LongTensor:
    """The tokens whose log-probabilities are asked for: `input_ids`, or the `decoder_input_ids` of a seq2seq model."""
    if not config.is_encoder_decoder:
        if input_ids is None:
            raise ValueError("Log-probabilities need `input_ids`: the tokens to score (not only `inputs_embeds`).")
        return input_ids
    if kwargs.get("decoder_input_ids") is None:
        raise ValueError("Log-probabilities of a seq2seq model need `decoder_input_ids`: the tokens to score.")
    return kwargs["decoder_input_ids"]


def next_token_logprobs(logits: torch.Tensor, tokens: torch.LongTensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 `(batch, seq - 1)`: entry `t` is log p(`tokens[:, t + 1]` | `logits[:, t] / temperature`)."""
    return logprobs_from_logits(logits, tokens, temperature, return_entropy=False)[0]


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.LongTensor, temperature: float, return_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full path: [`next_token_logprobs`], and with `return_entropy` the fp32 entropy `(batch, seq - 1)` (else
    None)."""
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = tokens[:, 1:].unsqueeze(-1).to(logits.device, torch.long)
    logsumexp = logits.logsumexp(-1)
    logprobs = logits.gather(-1, targets).squeeze(-1) - logsumexp
    entropy = logsumexp - (logits.softmax(-1) * logits).sum(-1) if return_entropy else None
    return logprobs, entropy


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one block of a chunk's fp32 logits (a chunk's positions by at most `VOCAB_BLOCK`
    tokens of the vocabulary) takes about `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (4 * min(vocab_size, VOCAB_BLOCK)))


def chunked_path_problem(lm: nn.Module) -> str | None:
    """Why the log-probs of `lm` (a transformers LM, or a PEFT model of one) cannot be computed in chunks from its
    hidden state (None if they can)."""
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in LOGIT_TRANSFORMS:
        return f"what model type {model_type!r} does to its logits after the LM head is not known to transformers-vhead"
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its output embedding is a {type(head).__name__}, not a torch.nn.Linear (e.g. a PEFT adapter on it)"
    if getattr(head, "_hf_hook", None) is not None:
        return "its LM head has accelerate hooks (offloading or device placement)"
    if head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head):
        return "its LM head has forward hooks or a forward of its own, which only its own call runs"
    for name, tensor in (("weight", head.weight), ("bias", head.bias)):
        if tensor is not None and (type(tensor) not in (nn.Parameter, torch.Tensor) or tensor.is_meta):
            kind = "on the meta device" if tensor.is_meta else f"a {type(tensor).__name__} (sharded or quantized)"
            return f"its LM head's {name} is {kind}, not an ordinary tensor"
    logit_bias = LOGIT_TRANSFORMS[model_type](lm.config).logit_bias
    if logit_bias is not None and getattr(without_peft(lm), logit_bias).is_meta:
        return f"its {logit_bias} is on the meta device (offloaded)"
    return None


def token_logprobs(
    lm: nn.Module,
    inputs: dict[str, Any],
    tokens: torch.LongTensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> TokenLogProbs:
    """Runs `lm` (a transformers LM, or a PEFT model of one) once on `inputs` and returns the log-probs of `tokens`
    (and their entropy), with the final hidden state of its decoder.

    The chunked path when [`chunked_path_problem`] finds none: the forward stops after the decoder. Otherwise the
    model's own forward and `log_softmax` of its logits, with a warning (once per model and reason). The caller checks
    the inputs and the settings.
    """
    decoder = lm.get_decoder()
    problem = chunked_path_problem(lm)
    if problem is not None:
        warned = lm.__dict__.setdefault("_logprobs_fallback_warnings", set())
        if problem not in warned:
            warned.add(problem)
            logger.warning(
                f"Log-probabilities of {type(lm).__name__} are computed from its full logits: {problem}. The result "
                "is the same, but the memory saving of the chunked path (no (batch, seq, vocab) logits) is lost."
            )
        with final_hidden_state(decoder, stop=False) as captured:
            logits = lm(**inputs).logits
        return TokenLogProbs(*logprobs_from_logits(logits, tokens, temperature, return_entropy), captured[-1])

    with final_hidden_state(decoder, stop=True) as captured:
        lm(**inputs)
    hidden_state = captured[-1]
    head = lm.get_output_embeddings()
    transform = LOGIT_TRANSFORMS[lm.config.model_type](lm.config)
    hidden = hidden_state[:, :-1].to(head.weight.device)
    if transform.hidden_scale is not None:
        hidden = hidden * transform.hidden_scale
    batch, positions = hidden.shape[:2]
    logit_bias = None
    if transform.logit_bias is not None:
        logit_bias = getattr(without_peft(lm), transform.logit_bias).reshape(-1).to(head.weight.device)
    logprobs, entropy = _ChunkedTokenLogProbs.apply(
        hidden.reshape(batch * positions, -1),
        head.weight,
        head.bias,
        logit_bias,
        tokens[:, 1:].reshape(-1).to(head.weight.device, torch.long),
        transform,
        float(temperature),
        chunk_size or default_chunk_size(head.weight.shape[0]),
        return_entropy,
    )
    entropy = entropy.view(batch, positions) if return_entropy else None
    return TokenLogProbs(logprobs.view(batch, positions), entropy, hidden_state)


def _block_logits(hidden, weight, bias, logit_bias, block: slice, transform: LogitTransform, temperature: float):
    """One block of a chunk's logits (the vocabulary's `block`) as the model computes them, in fp32 and divided by
    the temperature, and the `tanh` of a soft cap (what its derivative needs; None without one)."""
    block_bias = None if bias is None else bias[block]
    # in the model's dtype, as its LM head, then upcast
    logits = nn.functional.linear(hidden, weight[block], block_bias).float()
    if logit_bias is not None:
        logits.add_(logit_bias[block])
    if transform.multiply is not None:
        logits.mul_(transform.multiply)
    if transform.divide is not None:
        logits.div_(transform.divide)
    tanh = None
    if transform.softcap is not None:
        tanh = logits.div_(transform.softcap).tanh_()
        logits = tanh * transform.softcap
    if temperature != 1.0:
        logits.div_(temperature)
    return logits, tanh


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """fp32 log p(target) and entropy at each of N positions from their hidden states `(N, H)` and the LM head
    `(V, H)`, one chunk of positions by one block of the vocabulary at a time (`VOCAB_BLOCK`); the backward
    recomputes each block's logits (none are saved).

    With z the final fp32 logits of a position, p = softmax(z), t its target and E_p[z] = sum_j p_j z_j:
    d log p_t / dz = onehot(t) - p, and for the entropy H = logsumexp(z) - E_p[z], dH/dz_j = -p_j (z_j - E_p[z]).
    The forward gets logsumexp(z) and E_p[z] over the blocks by an online logsumexp (a running maximum, and the sums
    of exp(z - max) and of z exp(z - max) rescaled when it grows). The gradient goes back through the temperature and
    the transform to the raw logits, then to the hidden state (`g @ W`, in the model's dtype, as the LM head's own
    backward, summed over the blocks in fp32) and to `W` and the bias (fp32, cast to the parameters' dtype at the end).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, logit_bias, targets, transform, temperature, chunk_size, with_entropy):
        count, vocab = hidden.shape[0], weight.shape[0]
        logprobs = hidden.new_empty(count, dtype=torch.float32)
        logsumexp = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)
        for start in range(0, count, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk, chunk_targets = hidden[rows], targets[rows]
            size = chunk.shape[0]
            running_max = chunk.new_full((size,), -math.inf, dtype=torch.float32)
            exp_sum = chunk.new_zeros(size, dtype=torch.float32)
            weighted_sum = chunk.new_zeros(size, dtype=torch.float32) if with_entropy else None
            target_logit = chunk.new_zeros(size, dtype=torch.float32)
            for block in _vocab_blocks(vocab):
                logits, _ = _block_logits(chunk, weight, bias, logit_bias, block, transform, temperature)
                new_max = torch.maximum(running_max, logits.amax(-1))
                rescale = (running_max - new_max).exp_()
                exps = (logits - new_max[:, None]).exp_()
                exp_sum.mul_(rescale).add_(exps.sum(-1))
                if with_entropy:
                    weighted_sum.mul_(rescale).add_((exps * logits).sum(-1))
                running_max = new_max
                inside = (chunk_targets >= block.start) & (chunk_targets < block.stop)
                local = (chunk_targets - block.start).clamp_(0, logits.shape[1] - 1)
                target_logit += torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), 0.0)
            logsumexp[rows] = running_max + exp_sum.log()
            logprobs[rows] = target_logit - logsumexp[rows]
            if with_entropy:
                entropy[rows] = logsumexp[rows] - weighted_sum / exp_sum
        ctx.save_for_backward(hidden, weight, bias, logit_bias, targets, logsumexp, entropy)
        ctx.settings = (transform, temperature, chunk_size, with_entropy)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, logit_bias, targets, logsumexp, entropy = ctx.saved_tensors
        transform, temperature, chunk_size, with_entropy = ctx.settings
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_entropy is not None and not with_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 9
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk, chunk_targets = hidden[rows], targets[rows]
            chunk_grad_hidden = torch.zeros(chunk.shape, dtype=torch.float32, device=chunk.device)
            for block in _vocab_blocks(weight.shape[0]):
                logits, tanh = _block_logits(chunk, weight, bias, logit_bias, block, transform, temperature)
                probs = (logits - logsumexp[rows, None]).exp_()
                if grad_entropy is not None:
                    mean = (logsumexp[rows] - entropy[rows])[:, None]  # E_p[z] = logsumexp - H
                    # in place: the block's logits are not needed again
                    weights = logits.sub_(mean).mul_(grad_entropy[rows, None])
                    if grad_logprobs is not None:
                        weights.add_(grad_logprobs[rows, None])
                    grad = probs.mul_(weights).neg_()
                else:
                    grad = probs.mul_(-grad_logprobs[rows, None])
                if grad_logprobs is not None:
                    inside = (chunk_targets >= block.start) & (chunk_targets < block.stop)
                    local = (chunk_targets - block.start).clamp_(0, grad.shape[1] - 1)
                    grad.scatter_add_(1, local[:, None], torch.where(inside, grad_logprobs[rows], 0.0)[:, None])
                # back through the temperature and the transform, to the LM head's output
                if temperature != 1.0:
                    grad.div_(temperature)
                if tanh is not None:
                    grad.mul_(1 - tanh * tanh)
                if transform.divide is not None:
                    grad.div_(transform.divide)
                if transform.multiply is not None:
                    grad.mul_(transform.multiply)
                if needs_hidden:
                    chunk_grad_hidden += grad.to(weight.dtype) @ weight[block]
                if needs_weight:
                    grad_weight[block].addmm_(grad.T, chunk.float())
                if needs_bias:
                    grad_bias[block].add_(grad.sum(0))
            if needs_hidden:
                grad_hidden[rows] = chunk_grad_hidden
        if needs_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if needs_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _vocab_blocks(vocab: int) -> list[slice]:
    return [slice(start, min(start + VOCAB_BLOCK, vocab)) for start in range(0, vocab, VOCAB_BLOCK)]


class LogProbsMethods:
    """`compute_logprobs`, mixed into `PreTrainedModelWrapper`."""

    def compute_logprobs(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_values: bool = False,
        chunk_size: int | None = None,
        **kwargs,
    ) -> LogProbsOutput:
        """The log-probabilities of the given tokens (and their entropy and the values) without the full logits: the
        wrapped model runs once and stops after its decoder, and the LM head runs on chunks of positions (see the
        module's docstring). Gradients flow to every parameter, as through the model's own forward.

        Args:
            input_ids, attention_mask, kwargs: the inputs of the wrapped model (e.g. `position_ids`; for a seq2seq
                model the `decoder_input_ids` are the tokens scored). No cache, no `labels`.
            temperature: the logits are divided by it (the temperature the tokens were sampled at).
            return_entropy: also return the entropy at each position.
            return_values: also return the values, from the same hidden state (equal to `compute_values`).
            chunk_size: positions per chunk; by default as many as make a block of fp32 logits (those positions by
                up to `VOCAB_BLOCK` tokens) about 16 MiB: 512 positions for a vocabulary of 8192 or more.

        Returns:
            [`LogProbsOutput`]: `logprobs` fp32 `(batch, seq - 1)` (entry `t` is log p(token `t + 1` | tokens up to
            `t`)), `entropy` `(batch, seq - 1)` or None, `value` `(batch, seq)` or None.

        Raises:
            InvalidLogProbsSettingError: a temperature that is not above 0, or a chunk size below 1.
            InvalidInputError: inputs the model cannot run (see [`check_model_inputs`]), before any work.

        Example:

        ```python
        output = model.compute_logprobs(input_ids, attention_mask=attention_mask, return_entropy=True,
                                        return_values=True)
        ratio = (output.logprobs - old_logprobs).exp()
        ```
        """
        check_logprobs_settings(temperature, chunk_size)
        if any(kwargs.get(key) is not None for key in ("past_key_values", "cache", "labels")):
            raise ValueError("compute_logprobs scores whole sequences: it takes no cache and no `labels`.")
        kwargs.pop("return_dict", None)
        tokens = scored_tokens(self.config, input_ids, kwargs)
        inputs = {"use_cache": False, **kwargs, "input_ids": input_ids, "attention_mask": attention_mask}
        check_model_inputs(self, inputs)
        with self._adapter_lock.shared(), inputs_checked():
            result = token_logprobs(
                self.pretrained_model,
                inputs,
                tokens,
                temperature=temperature,
                return_entropy=return_entropy,
                chunk_size=chunk_size,
            )
            value = self._value_of(result.hidden_state) if return_values else None
        return LogProbsOutput(logprobs=result.logprobs, entropy=result.entropy, value=value)
