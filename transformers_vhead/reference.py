"""The PPO reference model: a frozen copy of the policy that shares the policy's lower layers, and one forward that
gives the policy's logits and values and the reference's logits while running the shared layers once.

`create_reference_model(model, num_shared_layers=k)` copies the model except what it runs before its layer `k`: the
embeddings, a seq2seq model's encoder, layers `0..k-1`. Those stay the policy's own tensors (frozen in both models),
so the copy costs only the unshared part. `forward_with_reference` then computes them once: what leaves the policy's
layer `k-1` is what the reference's layer `k` gets, and the model's own code builds the masks and position embeddings
of the layers above.

What runs before layer `k` is found by tracing one token through the model, not read from the order parameters were
registered in or from a list of name patterns: BART registers its `layernorm_embedding` after its layers but runs it
before them, and OPT registers its final norm before its layers but runs it after them.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput, logging

from .errors import LayerStackNotFoundError, ReferenceModelError
from .inputs import check_model_inputs, inputs_checked
from .logprobs import (
    check_logprobs_settings,
    logprobs_from_logits,
    next_token_logprobs,  # noqa: F401  (imported from here by callers)
    scored_tokens,
    token_logprobs,
)
from .peft_support import without_peft

logger = logging.get_logger(__name__)

# reference -> the lock that keeps its one-pass forwards (whose replay patches its layers) one at a time; weak, so that
# nothing is kept on the model (a thread lock can be neither deep-copied nor pickled) nor kept alive
_ONE_PASS_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_LOOKED_FOR = "a torch.nn.ModuleList of blocks of one class (the decoder layers) in the decoder (`model.get_decoder()`)"


@dataclass(frozen=True)
class SharedTrunk:
    """What a reference made by [`create_reference_model`] shares with its model; kept as `reference.shared_trunk`.

    Args:
        layers: the module name of the layer stack, e.g. `"pretrained_model.model.layers"`.
        num_shared_layers: how many of its layers are shared (`k`).
        modules: the modules that run before layer `k`, in the order they run.
        parameters: their parameters, which are the model's own tensors in the reference.
    """

    layers: str
    num_shared_layers: int
    modules: tuple[str, ...]
    parameters: tuple[str, ...]


@dataclass
class PolicyAndReferenceOutput(ModelOutput):
    """Output of [`forward_with_reference`].

    Args:
        loss: the policy's LM loss, when `labels` were given.
        logits: the policy's logits, as its forward returns them (None with `return_logits=False`).
        value: the policy's fp32 values `(batch, seq)`.
        ref_logits: the reference's logits (None with `return_logits=False`).
        logprobs, ref_logprobs: with `return_logprobs=True`, fp32 `(batch, seq - 1)`: entry `t` is log p(token `t + 1`
            | tokens up to `t`) under the policy and under the reference, at the temperature.
        entropy: with `return_entropy=True`, the policy's fp32 entropy `(batch, seq - 1)` at each position.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    value: torch.FloatTensor | None = None
    ref_logits: torch.FloatTensor | None = None
    logprobs: torch.FloatTensor | None = None
    ref_logprobs: torch.FloatTensor | None = None
    entropy: torch.FloatTensor | None = None


def create_reference_model(
    model: nn.Module, num_shared_layers: int | None = None, pattern: str | None = None
) -> nn.Module:
    """A frozen copy of `model` in eval mode, for the KL penalty of PPO (TRL's `create_reference_model`).

    With `num_shared_layers=k`, what the model runs before its layer `k` (embeddings, a seq2seq model's encoder, layers
    `0..k-1`) is shared: the reference holds the model's own tensors there, not copies, and those parameters are frozen
    in `model` too, as in TRL. The layers are found in any architecture: the decoder's stack of identical blocks.

    Args:
        model: the policy (a value-head model or any transformers model).
        num_shared_layers: how many of the lowest layers to share, `0` (the embeddings only) to the number of layers
            minus one; `None` for a full copy.
        pattern: TRL's way to name the layers, e.g. `"transformer.h.{layer}"`: then, as in TRL, every parameter
            registered before the first one whose name contains `pattern.format(layer=k)` is shared.

    Returns:
        The reference model, its parameters frozen; `reference.shared_trunk` ([`SharedTrunk`]) says what it shares,
        and [`forward_with_reference`] computes the shared part once for both models.

    Raises:
        ReferenceModelError: `num_shared_layers` out of range, a `pattern` that matches no parameter, or DeepSpeed
            ZeRO-3 (load the reference with `from_pretrained` instead, or use `as_reference()` of a PEFT policy).
        LayerStackNotFoundError: `num_shared_layers` without `pattern` on a model with no recognisable layer stack.

    Example:

    ```python
    ref_model = create_reference_model(model, num_shared_layers=6)
    output = model.forward_with_reference(ref_model, input_ids, attention_mask=attention_mask)
    ```
    """
    if is_deepspeed_zero3_enabled():
        # Refused before anything is touched: each rank holds an empty shard of every parameter, so a deep copy
        # would copy shards the engine does not know, and the trace that finds the shared layers cannot run.
        raise ReferenceModelError(
            "DeepSpeed ZeRO-3 is enabled and is not compatible with `create_reference_model()`: the parameters are "
            "partitioned across processes, so they can be neither copied nor shared. Load the reference model "
            "directly with `AutoModelForCausalLM.from_pretrained()` (or the value-head class's `from_pretrained`) "
            "and prepare it with the engine as well; or, for a PEFT policy, take the reference from the same model "
            "with `with model.as_reference():` (the base model, or the adapter kept by "
            "`model.copy_adapter_as_reference()`, called before `deepspeed.initialize` / `accelerator.prepare`)."
        )
    if num_shared_layers is None:
        reference = copy.deepcopy(model)
        reference.requires_grad_(False)
        return reference.eval()

    if isinstance(num_shared_layers, bool) or not isinstance(num_shared_layers, int) or num_shared_layers < 0:
        raise ReferenceModelError(
            f"num_shared_layers must be a whole number of layers from 0 up to the model's number of layers minus one "
            f"(or None for a full copy), got {num_shared_layers!r}."
        )
    stack = _find_stack_for(model, pattern)
    trunk = None
    if stack is not None:
        name, layers = stack
        if num_shared_layers >= len(layers):
            raise ReferenceModelError(
                f"num_shared_layers={num_shared_layers}, but {type(model).__name__} has {len(layers)} layers "
                f"({name}): share at most {len(layers) - 1}, so that the reference keeps at least its top layer, or "
                "pass num_shared_layers=None for a full copy."
            )
        trunk = _trace_trunk(model, name, num_shared_layers)
    if pattern is None:
        shared = [model.get_parameter(name) for name in trunk.parameters]
        buffers = [buffer for name in trunk.modules for buffer in model.get_submodule(name).buffers(recurse=False)]
    else:
        shared, buffers = _shared_by_pattern(model, pattern, num_shared_layers), []
        left_out = _left_out_by_pattern(model, trunk, shared)
        if left_out:
            logger.warning(
                f"pattern {pattern!r} shares by TRL's rule (what is registered before layer {num_shared_layers}), "
                f"which leaves {left_out} unshared although it runs before that layer, so forward_with_reference "
                "will run this reference's full forward. Leave `pattern` out to share what runs before the layer."
            )
            trunk = None

    # The copy gets new Parameter objects around the model's own tensors for the shared part, so it allocates only
    # the rest; and converting or moving one model (`.to()`) leaves the other as it is.
    memo = {id(parameter): nn.Parameter(parameter.data, requires_grad=False) for parameter in shared}
    memo.update({id(buffer): buffer for buffer in buffers})
    reference = copy.deepcopy(model, memo)
    for parameter in shared:
        parameter.requires_grad_(False)
    reference.requires_grad_(False)
    if trunk is not None:
        reference.shared_trunk = trunk
    return reference.eval()


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer stack of `model` and its module name: the shallowest `nn.ModuleList` of blocks of one class
    in the decoder (`model.get_decoder()`; the whole model if it has none), the one with most parameters if several
    are as shallow.

    Raises:
        LayerStackNotFoundError: there is no such list.
    """
    decoder = _decoder_of(model)
    best, best_key = None, None
    for name, module in decoder.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(block) for block in module}) != 1:
            continue
        key = (name.count("."), -sum(parameter.numel() for parameter in module.parameters()))
        if best_key is None or key < best_key:
            best, best_key = module, key
    names = {id(module): name for name, module in model.named_modules()}
    if best is None or id(best) not in names:
        raise LayerStackNotFoundError(
            f"{type(model).__name__} has no recognisable layer stack to share: looked for {_LOOKED_FOR}, found none in "
            f"{type(decoder).__name__}. Pass `pattern=` naming the layers (e.g. 'transformer.h.{{layer}}'), or "
            "num_shared_layers=None for a full copy."
        )
    return names[id(best)], best


def _decoder_of(model: nn.Module) -> nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = None
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
    return decoder if isinstance(decoder, nn.Module) else model


def _find_stack_for(model: nn.Module, pattern: str | None) -> tuple[str, nn.ModuleList] | None:
    """The layer stack; with a `pattern` a model without one is still fine (TRL's rule needs no stack)."""
    try:
        return find_layer_stack(model)
    except LayerStackNotFoundError:
        if pattern is None:
            raise
        logger.info(f"{type(model).__name__} has no layer stack we recognise: the reference shares by `pattern` only.")
        return None


class _ReachedBranch(Exception):
    """Ends the tracing forward when the first unshared layer is about to run."""


def _trace_trunk(model: nn.Module, layers_name: str, num_shared_layers: int) -> SharedTrunk:
    """Runs one token through `model` (eval mode, no gradients) and records the modules that run before layer
    `num_shared_layers`; the forward stops there, so it costs the shared layers on one token."""
    branch = model.get_submodule(layers_name)[num_shared_layers]
    thread = threading.get_ident()
    order: list[nn.Module] = []

    def record(module: nn.Module, args) -> None:
        if threading.get_ident() == thread:
            if module is branch:
                raise _ReachedBranch
            order.append(module)

    handles = [module.register_forward_pre_hook(record) for module in model.modules()]
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(**_one_token(model))
    except _ReachedBranch:
        pass
    else:
        raise LayerStackNotFoundError(
            f"A forward of {type(model).__name__} never ran {layers_name}[{num_shared_layers}], so that list is not "
            f"its layer stack (looked for {_LOOKED_FOR}). Pass `pattern=` naming the layers, or "
            "num_shared_layers=None for a full copy."
        )
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training

    module_names = {id(module): name for name, module in model.named_modules()}
    modules = tuple(dict.fromkeys(module_names[id(module)] for module in order))
    names = {id(parameter): name for name, parameter in model.named_parameters()}  # a tied one under its first name
    used = (id(parameter) for name in modules for parameter in model.get_submodule(name).parameters(recurse=False))
    return SharedTrunk(layers_name, num_shared_layers, modules, tuple(dict.fromkeys(names[key] for key in used)))


def _one_token(model: nn.Module) -> dict[str, torch.Tensor]:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    device = weight.device if weight is not None else next(model.parameters()).device
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    inputs = {"input_ids": token}
    config = getattr(model, "config", None)
    if config is not None:  # a transformers model: say the token is attended (id 0 is often the pad token)
        inputs["attention_mask"] = torch.ones_like(token)
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = token
    return inputs


def _shared_by_pattern(model: nn.Module, pattern: str, num_shared_layers: int) -> list[nn.Parameter]:
    """TRL's rule: the parameters registered before the first one whose name contains the formatted pattern."""
    marker = pattern.format(layer=num_shared_layers)
    named = list(model.named_parameters())
    first = next((index for index, (name, _) in enumerate(named) if marker in name), None)
    if first is None:
        examples = ", ".join(name for name, _ in named[:3])
        raise ReferenceModelError(
            f"pattern {pattern!r} (for layer {num_shared_layers}: {marker!r}) matches no parameter name of "
            f"{type(model).__name__}, whose names look like {examples}, ... Fix the pattern, or leave it out: the "
            "layers are then found by themselves."
        )
    return [parameter for _, parameter in named[:first]]


def _left_out_by_pattern(model: nn.Module, trunk: SharedTrunk | None, shared: list[nn.Parameter]) -> str | None:
    """The first parameter that runs before the branch but that a `pattern` did not share (None if there is none)."""
    if trunk is None:
        return None
    shared_ids = {id(parameter) for parameter in shared}
    return next((name for name in trunk.parameters if id(model.get_parameter(name)) not in shared_ids), None)


def _same_tensor(first: torch.Tensor, second: torch.Tensor) -> bool:
    return (
        first.device == second.device
        and first.dtype == second.dtype
        and first.shape == second.shape
        and first.stride() == second.stride()
        and first.data_ptr() == second.data_ptr()
    )


def _drops_out(module: nn.Module) -> bool:
    """Whether `module` applies dropout now: a dropout module, or a dropout rate it passes to functional code (e.g.
    `attention_dropout`, `layerdrop`), above zero in train mode."""
    if not module.training:
        return False
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return any("drop" in name and isinstance(rate, float) and rate > 0 for name, rate in vars(module).items())


def _one_pass_problem(model: nn.Module, reference: nn.Module) -> str | None:
    """Why the shared layers cannot be computed once for `model` and `reference` (None if they can).

    Raises:
        ReferenceModelError: the shared layers are trainable in `model`, so the reference would change with training.
    """
    trunk = getattr(reference, "shared_trunk", None)
    if trunk is None:
        return (
            "the reference shares no layers with the policy (make it with create_reference_model(model, "
            "num_shared_layers=k))"
        )
    trainable = []
    for name in trunk.parameters:
        try:
            own, referenced = model.get_parameter(name), reference.get_parameter(name)
        except AttributeError:
            return f"the reference was not made from this model (the model has no parameter {name})"
        if not _same_tensor(own, referenced):
            return f"{name} is no longer one tensor of both models (was one of them moved or converted?)"
        if own.requires_grad:
            trainable.append(name)
    if trainable:
        raise ReferenceModelError(
            f"The policy trains {len(trainable)} parameter(s) the reference shares (e.g. {trainable[0]}), so the "
            "reference would change with every step. Freeze them (create_reference_model does; something set "
            "requires_grad back on), or make a reference that shares nothing (num_shared_layers=None)."
        )
    for name in trunk.modules:
        if _drops_out(model.get_submodule(name)):
            return (
                f"dropout is active in {name or type(model).__name__}, which runs before the shared layers end (the "
                "policy is in train mode), so its output is not the reference's; call model.eval() to share the "
                "compute"
            )
    return None


@contextmanager
def _branch_output(model: nn.Module, trunk: SharedTrunk | None) -> Iterator[list]:
    """Collects what the last shared layer of `model` returns during the block (this thread's first call)."""
    captured: list = []
    if trunk is None or trunk.num_shared_layers == 0:
        yield captured
        return
    thread = threading.get_ident()

    def hook(module: nn.Module, args, output) -> None:
        if threading.get_ident() == thread and not captured:
            captured.append(output)

    handle = model.get_submodule(trunk.layers)[trunk.num_shared_layers - 1].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def _encoder_output(model: nn.Module, capture: bool) -> Iterator[list]:
    """Collects the `last_hidden_state` the encoder of `model` (a seq2seq value-head model) returns during the block
    (this thread's first call); collects nothing unless `capture`."""
    captured: list = []
    if not capture:
        yield captured
        return
    thread = threading.get_ident()

    def hook(module: nn.Module, args, output) -> None:
        if threading.get_ident() == thread and not captured:
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = without_peft(model.pretrained_model).get_encoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def _replaying(reference: nn.Module, trunk: SharedTrunk | None, captured: list) -> Iterator[None]:
    """Within the block the shared layers of `reference` compute nothing: on this thread each returns what the
    policy's last shared layer returned (the layers in between only pass it on); other threads run them as usual."""
    if trunk is None or trunk.num_shared_layers == 0:
        yield
        return
    if not captured:
        raise RuntimeError(f"The policy's forward never ran {trunk.layers}[{trunk.num_shared_layers - 1}].")
    output, thread = captured[0], threading.get_ident()
    blocks = list(reference.get_submodule(trunk.layers)[: trunk.num_shared_layers])
    saved = [(block, block.__dict__.get("forward")) for block in blocks]  # e.g. accelerate's hooked forward
    for block in blocks:

        def replay(*args, _forward=block.forward, **kwargs):
            return output if threading.get_ident() == thread else _forward(*args, **kwargs)

        block.forward = replay
    try:
        yield
    finally:
        for block, own_forward in saved:
            if own_forward is None:
                del block.forward
            else:
                block.forward = own_forward


class ReferenceMethods:
    """The reference's log-probabilities and the one-pass policy + reference forward, mixed into
    `PreTrainedModelWrapper`."""

    def compute_reference_logprobs(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.FloatTensor:
        """The reference's log-probabilities of the given tokens, for a PEFT policy (see [`as_reference`]).

        Computed without the full logits, as [`compute_logprobs`] (which takes the same keywords).

        Returns:
            fp32 `(batch, seq - 1)`: entry `t` is log p(token `t + 1` | tokens up to `t`) (for a seq2seq model, of the
            `decoder_input_ids`).

        Raises:
            InvalidInputError: inputs the model cannot run (see [`check_model_inputs`]), before the adapters switch.
        """
        scored_tokens(self.config, input_ids, kwargs)  # raises for missing tokens before the adapters switch
        check_model_inputs(self, dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
        with self.as_reference(), inputs_checked():
            return self.compute_logprobs(input_ids, attention_mask, **kwargs).logprobs

    def forward_with_reference(
        self,
        ref_model: nn.Module,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        return_logprobs: bool = False,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_logits: bool = True,
        **kwargs,
    ) -> PolicyAndReferenceOutput:
        """The policy's logits and values and the reference's logits in one call, running the layers they share once:
        the hidden state leaving the last shared layer of this model feeds both its own upper layers and the
        reference's (which get the masks and position embeddings the reference's own forward builds).

        That needs a reference from [`create_reference_model`] with `num_shared_layers`, whose shared layers are
        still this model's own frozen tensors, and no dropout in them (eval mode, or dropout rates of 0). Otherwise the
        reference runs its full forward, and a warning says why (once per reference and reason); if the shared layers
        are trainable it raises, since the reference would then change with training. The reference runs without
        gradients; the policy as called.

        Args:
            ref_model: the reference model.
            input_ids, attention_mask, kwargs: the inputs of both forwards (no cache is used).
            return_logprobs: also return the log-probabilities of the input tokens (the `decoder_input_ids` of a
                seq2seq model) under both models.
            temperature: the logits are divided by it for the log-probabilities and the entropy.
            return_entropy: also return the policy's entropy at each position.
            return_logits: `False` (with `return_logprobs=True`) computes the log-probabilities and entropy without
                the full logits, as [`compute_logprobs`]: both forwards stop after their decoder, and `logits` and
                `ref_logits` are None.

        Returns:
            [`PolicyAndReferenceOutput`]: `logits`, `value`, `ref_logits` (and `loss` with `labels`; `logprobs` and
            `ref_logprobs` with `return_logprobs`; `entropy` with `return_entropy`).

        Raises:
            ReferenceModelError: the policy trains parameters the reference shares.
            InvalidInputError: inputs the models cannot run (see [`check_model_inputs`]), checked once, before either
                forward.
            InvalidLogProbsSettingError: a temperature that is not above 0.

        Example:

        ```python
        ref_model = create_reference_model(model, num_shared_layers=6)
        output = model.forward_with_reference(ref_model, input_ids, attention_mask=attention_mask, return_logprobs=True)
        kl = output.logprobs - output.ref_logprobs
        ```
        """
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            raise ValueError(
                "forward_with_reference scores whole sequences and takes no cache (`cache` / `past_key_values`)."
            )
        if not return_logits and (not return_logprobs or kwargs.get("labels") is not None):
            raise ValueError(
                "forward_with_reference(return_logits=False) computes log-probabilities without the logits: pass "
                "return_logprobs=True, and no `labels` (the LM loss needs the logits)."
            )
        check_logprobs_settings(temperature, None)
        kwargs.pop("return_dict", None)
        scoring = return_logprobs or return_entropy
        tokens = scored_tokens(self.config, input_ids, kwargs) if scoring else None  # checked before any forward
        settings = {"temperature": temperature, "return_entropy": return_entropy}
        inputs = {**kwargs, "input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        check_model_inputs(self, inputs)
        problem = _one_pass_problem(self, ref_model)
        warned = ref_model.__dict__.setdefault("_one_pass_warnings", set())  # once per reference and reason
        if problem is not None and problem not in warned:
            warned.add(problem)
            logger.warning(f"forward_with_reference runs the reference's full forward: {problem}.")
        trunk = None if problem is not None else ref_model.shared_trunk
        # No switch of either model during the pass (shared holds: other threads' calls still run, and the reference's
        # shared layers replay for this thread only); one pass at a time per reference, which patches its layers.
        ref_lock = getattr(ref_model, "_adapter_lock", None)
        one_pass = _ONE_PASS_LOCKS.setdefault(ref_model, threading.Lock()) if trunk is not None else nullcontext()
        with one_pass, self._adapter_lock.shared(), ref_lock.shared() if ref_lock else nullcontext(), inputs_checked():
            # the encoder runs before the shared layers: its output is the reference's too
            share_encoder = trunk is not None and self.config.is_encoder_decoder
            share_encoder = share_encoder and inputs.get("encoder_outputs") is None
            if not return_logits:
                return self._logprobs_with_reference(ref_model, inputs, tokens, trunk, share_encoder, settings)
            with _branch_output(self, trunk) as captured:
                output = self(**inputs)
            ref_inputs = inputs
            if share_encoder:
                ref_inputs = {**inputs, "encoder_outputs": BaseModelOutput(output.encoder_last_hidden_state)}
            with torch.no_grad(), _replaying(ref_model, trunk, captured):
                ref_logits = ref_model(**ref_inputs).logits
        fields = {}
        if scoring:
            logprobs, fields["entropy"] = logprobs_from_logits(output.logits, tokens, **settings)
        if return_logprobs:
            fields.update(logprobs=logprobs, ref_logprobs=next_token_logprobs(ref_logits, tokens, temperature))
        return PolicyAndReferenceOutput(
            loss=output.loss, logits=output.logits, value=output.value, ref_logits=ref_logits, **fields
        )

    def _logprobs_with_reference(
        self, ref_model: nn.Module, inputs: dict, tokens: torch.LongTensor, trunk, share_encoder: bool, settings: dict
    ) -> PolicyAndReferenceOutput:
        """`forward_with_reference(return_logits=False)`: the policy's and the reference's log-probs (and the
        policy's entropy and values) through the chunked path of [`token_logprobs`], both forwards stopping after
        their decoder. Runs inside `forward_with_reference`'s locks."""
        with _branch_output(self, trunk) as captured, _encoder_output(self, share_encoder) as encoded:
            policy = token_logprobs(self.pretrained_model, inputs, tokens, **settings)
        ref_inputs = inputs
        if share_encoder:
            ref_inputs = {**inputs, "encoder_outputs": BaseModelOutput(encoded[0])}
        with torch.no_grad(), _replaying(ref_model, trunk, captured):
            reference = token_logprobs(
                getattr(ref_model, "pretrained_model", ref_model),  # a value-head reference's LM, or a bare one
                ref_inputs,
                tokens,
                temperature=settings["temperature"],
            )
        return PolicyAndReferenceOutput(
            value=self._value_of(policy.hidden_state),
            logprobs=policy.logprobs,
            ref_logprobs=reference.logprobs,
            entropy=policy.entropy,
        )
