"""Value-head models: a transformers language model plus a scalar head, as one registered `PreTrainedModel`.

The wrapped model sits under `pretrained_model` and the head under `v_head` (TRL's names and checkpoint keys). A forward
runs the wrapped model once and reads the final hidden state from a hook on its decoder stack, so no layer's hidden
states are kept for it; a value-only call stops right after the decoder and never runs the LM head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput, logging

from .adapters import AdapterMethods, check_language_model
from .capture import final_hidden_state, install_capture_hook
from .cards import render_model_card
from .compat import CACHE_NAME
from .configuration import (
    HEAD_SETTINGS,
    CausalLMWithValueHeadConfig,
    Seq2SeqLMWithValueHeadConfig,
    ValueHeadConfig,
    describe_v_head_init,
    explicit_head_settings,
)
from .distributed import gather_for_save, refuse_zero3_shards, wait_for_writer, writes_checkpoint
from .errors import MissingLMHeadError
from .heads import NOT_GIVEN, ValueHead, init_linear
from .hub import push_to_hub
from .inputs import check_model_inputs
from .layouts import ADAPTER_HEAD_NAMES, HeadSource
from .loading import load_adapter_value_head, load_pretrained
from .locking import AdapterLock
from .logprobs import LogProbsMethods
from .outputs import (
    CausalLMOutputWithValue,
    CausalLMOutputWithValueAndPast,
    Seq2SeqLMOutputWithValue,
    Seq2SeqLMOutputWithValueAndPast,
)
from .packing import is_packed_form
from .peft_support import is_peft_model, without_peft
from .placement import keep_fresh_head_off_disk
from .reference import ReferenceMethods
from .reward import RewardScoring
from .saving import staged_save
from .sources import SourceFiles

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.get_logger(__name__)


class PreTrainedModelWrapper(AdapterMethods, ReferenceMethods, LogProbsMethods, RewardScoring, PreTrainedModel):
    """The common base of the value-head models: a wrapped transformers LM (`pretrained_model`) and a `v_head`.

    Subclasses set `config_class`, `transformers_parent_class` (the auto class that builds the wrapped model) and their
    output classes. The TRL class attributes (`supported_args`, `supported_modules`, `supported_rm_modules`) are kept
    for code that reads them.
    """

    config_class = ValueHeadConfig
    base_model_prefix = "pretrained_model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_missing = [r"^v_head\."]  # a fresh head is reported by `v_head_source`, not as "missing"
    _keep_in_fp32_modules_strict = ["v_head"]
    _keep_in_fp32_modules = ["v_head"]  # what transformers' quantizers (bitsandbytes, ...) leave unquantized

    transformers_parent_class: ClassVar[type | None] = None
    supported_args: ClassVar[tuple[str, ...]] = (
        "summary_dropout_prob",
        "v_head_initializer_range",
        "v_head_init_strategy",
    )
    supported_modules: ClassVar[tuple[str, ...]] = ("v_head",)
    supported_rm_modules: ClassVar[tuple[str, ...]] = ("score",)
    _output_class: ClassVar[type[ModelOutput]]
    _output_class_with_past: ClassVar[type[ModelOutput]]

    def __init__(self, config: ValueHeadConfig | PreTrainedModel | PeftModel, **head_settings):
        """
        Args:
            config: the model's config (the wrapped model is built from `config.text_config`), or, as in TRL, a
                transformers model or a `peft.PeftModel` to wrap as it is.
            head_settings: with a model instance only, the head's settings (`summary_dropout_prob`,
                `v_head_init_strategy`, `v_head_initializer_range`, `upcast_logits`, `score_mean`, `score_std`), and
                TRL's `score_module`, `supports_rm_adapter`, `rm_adapter_name` (a reward adapter already loaded).
        """
        pretrained_model = None
        score_module = head_settings.pop("score_module", None)
        rm_adapter_name = head_settings.pop("rm_adapter_name", None)
        supports_rm_adapter = head_settings.pop("supports_rm_adapter", score_module is not None)
        if isinstance(config, PreTrainedModel) or is_peft_model(config):
            pretrained_model = config
            check_language_model(pretrained_model)
            config = self.config_class(
                text_config=pretrained_model.config,
                base_model_name_or_path=pretrained_model.name_or_path or None,
                **explicit_head_settings(_head_settings(head_settings)),
            )
        elif head_settings or score_module is not None:
            raise TypeError(
                f"{type(self).__name__}(config) takes no other arguments, got {sorted(head_settings)}: set them on "
                "the config."
            )
        super().__init__(config)
        wrapping_an_instance = pretrained_model is not None
        if not wrapping_an_instance:
            pretrained_model = self.transformers_parent_class.from_config(config.text_config)
        if pretrained_model.get_output_embeddings() is None:
            raise MissingLMHeadError(
                f"{type(pretrained_model).__name__} has no language-model head, so it cannot give logits. Wrap the "
                f"model class with a head (e.g. what {self.transformers_parent_class.__name__} loads)."
            )
        if wrapping_an_instance:
            for module in pretrained_model.modules():  # a model given to wrap keeps its weights as they are
                module._is_hf_initialized = True
        self.pretrained_model = pretrained_model
        config.text_config = pretrained_model.config  # one config object: changes through either side are seen by both
        dropout = NOT_GIVEN if config.summary_dropout_prob is None else config.summary_dropout_prob  # None: default
        self.v_head = ValueHead(config.text_config, dropout, config.v_head_hidden_size)
        self.v_head_source = HeadSource(
            init=describe_v_head_init(config.v_head_init_strategy, config.v_head_initializer_range)
        )
        self._adapter_lock = AdapterLock()
        self.supports_rm_adapter = bool(supports_rm_adapter)
        self.rm_adapter_name = rm_adapter_name
        if score_module is not None:
            self.score = score_module
        self.post_init()
        install_capture_hook(pretrained_model.get_decoder())  # before any call: a compiled first call needs it there
        if pretrained_model.device.type != "meta":
            self.v_head.to(pretrained_model.get_output_embeddings().weight.device)

    def _init_weights(self, module: nn.Module) -> None:
        # The wrapped model initialises its own modules; only the head is ours. transformers visits modules that hold
        # parameters directly, so each of the head's Linear layers is initialised when it is visited.
        if any(module is layer for layer in self.v_head.linear_layers):
            init_linear(module, self.config.v_head_init_strategy, self.config.v_head_initializer_range)

    @property
    def is_peft_model(self) -> bool:
        """Whether the wrapped model is a `peft.PeftModel` (TRL's attribute)."""
        return is_peft_model(self.pretrained_model)

    def get_input_embeddings(self) -> nn.Module:
        return self.pretrained_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.pretrained_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.pretrained_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.pretrained_model.set_output_embeddings(new_embeddings)

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        """Resizes the wrapped model's embeddings exactly as on the bare model (`config.vocab_size` follows)."""
        return self.pretrained_model.resize_token_embeddings(*args, **kwargs)

    def _move_missing_keys_from_meta_to_device(self, missing_keys, device_map: dict | None, *args, **kwargs) -> None:
        # transformers materialises the weights a checkpoint lacks (a fresh head) after it offloaded the checkpoint's
        # weights to disk, so a fresh head mapped to "disk" would have no weights there at the first forward. It is
        # kept with the LM head instead (it is hidden_size + 1 numbers); the map is the one accelerate dispatches with.
        if device_map is not None and any(str(key).startswith("v_head.") for key in missing_keys):
            keep_fresh_head_off_disk(self, device_map)
        return super()._move_missing_keys_from_meta_to_device(missing_keys, device_map, *args, **kwargs)

    def _forward_with_value(self, inputs: dict[str, Any], return_past_key_values: bool, return_logits: bool):
        """The forward of both classes: the wrapped model once, the head on the final hidden state it captured.

        The inputs are checked first ([`check_model_inputs`]), and the call holds the model's lock, so that a switch
        of adapter or modes in another thread (scoring, `as_reference`) cannot happen during it.
        """
        if inputs.get("use_cache") is None and (return_past_key_values or not return_logits or is_packed_form(inputs)):
            # no cache for a value-only call unless it is asked for, nor for a packed batch: transformers keeps its
            # sequences apart only without one
            inputs["use_cache"] = return_past_key_values
        check_model_inputs(self, inputs)
        return_dict = inputs.pop("return_dict", True)
        if not return_logits and inputs.get("labels") is not None:
            raise ValueError("A value-only call (return_logits=False) cannot compute the LM loss: drop `labels`.")
        base_output = None
        with self._adapter_lock.shared():  # the adapters and modes stay as they are until the head has run
            with final_hidden_state(self.pretrained_model.get_decoder(), stop=not return_logits) as captured:
                base_output = self.pretrained_model(**inputs)
            value = self._value_of(captured[-1])

        output_class = self._output_class_with_past if return_past_key_values else self._output_class
        fields = {"value": value}
        if base_output is not None:
            for name in output_class.__dataclass_fields__:
                if name != "value" and getattr(base_output, name, None) is not None:
                    fields[name] = getattr(base_output, name)
            if self.config.upcast_logits:
                fields["logits"] = fields["logits"].float()
        output = output_class(**fields)
        return tuple(output) if return_dict is False else output

    def _value_of(self, last_hidden_state: torch.Tensor) -> torch.FloatTensor:
        """The head's fp32 values `(batch, seq)` of the decoder's final hidden state."""
        head_device = self.v_head.summary.weight.device
        if head_device.type != "meta":  # a head offloaded by accelerate is on meta; its hook moves the input itself
            last_hidden_state = last_hidden_state.to(head_device)
        return self.v_head(last_hidden_state).squeeze(-1)

    def compute_values(
        self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.FloatTensor:
        """Values only, for a critic or reward model: the LM head never runs (see `forward(return_logits=False)`).

        Returns:
            fp32 values, `(batch, seq)` (decoder positions for a seq2seq model).

        Example:

        ```python
        values = model.compute_values(input_ids, attention_mask=attention_mask)
        ```
        """
        return self(input_ids=input_ids, attention_mask=attention_mask, return_logits=False, **kwargs).value

    def generate(self, *args, **kwargs):
        """The wrapped model's `generate`: same tokens as the bare model, and the value head never runs. It holds the
        model's lock throughout, so no other thread's adapter switch (scoring, `as_reference`) lands mid-generation."""
        with self._adapter_lock.shared():
            without_peft(self.pretrained_model).generation_config = self.generation_config  # the one saved with us
            return self.pretrained_model.generate(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        Loads a value-head model, or wraps a language model with a fresh value head.

        `pretrained_model_name_or_path` may be:
        - a directory or hub id saved by this package (the head loads exactly);
        - a plain causal / seq2seq LM directory or hub id (the head is freshly initialised);
        - a TRL checkpoint: `v_head.*` merged into `model.safetensors`, `pytorch_model.bin` or one shard of a sharded
          checkpoint, local or from the hub cache;
        - a PEFT adapter directory or hub id (`adapter_config.json`): the base model it names, the adapter on it
          (frozen unless `is_trainable=True`, as in TRL), and the value head saved with it (`value_head.safetensors`,
          or TRL's `pytorch_model.bin` holding only `v_head.*`);
        - a transformers model or a `peft.PeftModel` instance, wrapped as it is (TRL's behaviour).

        Keywords: TRL's `peft_config`, `is_trainable`, `reward_adapter`, `reward_adapter_name` and head settings
        (`summary_dropout_prob`, `v_head_init_strategy`, `v_head_initializer_range`), `upcast_logits`, `score_mean`,
        `score_std`, and every keyword of `PreTrainedModel.from_pretrained` (`dtype`, `device_map`,
        `attn_implementation`, `revision`, `token`, `local_files_only`, `quantization_config`, ...). A keyword that is a
        setting of the wrapped model's config (e.g. `use_cache=False`) goes to `text_config`.

        - `peft_config`: a `peft.PeftConfig` (not prompt learning); the wrapped model becomes a trainable
          `PeftModel` with it. Ignored, with a warning, when the source already holds an adapter.
        - `reward_adapter`, `reward_adapter_name` (default `"reward_adapter"`): a reward adapter (LoRA plus `score`
          head, saved by peft with `task_type="SEQ_CLS"`) loaded frozen next to the policy's adapter; see
          [`compute_sequence_scores`] and [`compute_reward_score`]. Needs a PEFT policy.

        Where the head came from is logged once and kept in `model.v_head_source`.

        Raises:
            InvalidModelSourceError: the argument is neither a path, a hub id nor a model.
            HeadShapeMismatchError: the checkpoint's head does not fit the model (names the file and both shapes).
            CorruptCheckpointError: a weights file is truncated or corrupt (names the file).
            InvalidConfigError: a `config.json` that cannot describe a model: not JSON, a field of the wrong type, no
                `text_config`, or one without `model_type` (names the file, or the hub id).
            CheckpointMismatchError: the weights do not fit the model the config describes: none of them fit (the
                config names another model), a shape differs (unless `ignore_mismatched_sizes=True`), or, in this
                package's own layout, a tensor is missing or left over (names the directory and the keys).
            PeftConfigError: `peft_config` is not a usable `PeftConfig`, or an adapter is prompt learning.
            RewardAdapterError, AdapterNotFoundError, MissingScoreHeadError, AdapterMismatchError: a bad reward
                adapter (see [`add_and_load_reward_modeling_adapter`]).
        """
        return load_pretrained(cls, pretrained_model_name_or_path, model_args, kwargs, super().from_pretrained)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # transformers drops the keys `_keys_to_ignore_on_load_missing` names (the head's, so that a fresh head is not
        # reported as missing) from its report here; which of the head's tensors the checkpoint lacked is kept first
        self._missing_on_load = set(loading_info.missing_keys)
        super()._adjust_missing_and_unexpected_keys(loading_info)

    def _load_adapter_value_head(self, files: SourceFiles) -> None:
        """Loads the value head saved next to an adapter (`files`), if there is one (`AdapterMethods.load_adapter`)."""
        load_adapter_value_head(self, files)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        variant: str | None = None,
        overwrite_model_card: bool = False,
        **kwargs,
    ) -> None:
        """`PreTrainedModel.save_pretrained` (safetensors, sharding, config, generation config), plus a `README.md`
        model card when the directory has none (or `overwrite_model_card=True`). The checkpoint is written to a staging
        folder beside `save_directory`, which then replaces the directory as a whole in one step (the other files of
        the directory are kept, hard-linked): killed or failing at any point, the save leaves the old checkpoint or
        the new one, never a mix (see [`transformers_vhead.saving.staged_save`], and its fallback where a directory
        cannot be swapped). In a distributed run only the writing rank stages and publishes.

        A PEFT policy is saved as its adapter (peft's files, an ordinary adapter of the base model), the value head in
        `value_head.safetensors`, and this model's `config.json` (the head's settings). The reward adapter and a
        reference adapter are not saved: they are inputs of training, loaded again with `reward_adapter=` and
        `copy_adapter_as_reference()`.

        Raises:
            CheckpointSaveError: the directory (or, for a new one, its parent) is not writable, refused before anything
                is written; or writing failed (a full disk, a quota, a file-size limit), naming the file, with the old
                checkpoint untouched.
        """
        state_dict, gathered = gather_for_save(self, state_dict)  # FSDP2's shards: a collective of every rank
        is_main_process = writes_checkpoint(is_main_process)
        save_kwargs = dict(state_dict=state_dict, max_shard_size=max_shard_size, variant=variant, **kwargs)
        if not is_main_process:  # writes nothing, but takes part in gathering a distributed state dict
            if not self.is_peft_model:
                super().save_pretrained(save_directory, is_main_process=False, **save_kwargs)
            wait_for_writer(gathered)
            return
        refuse_zero3_shards(self, state_dict)  # the writer only: the other ranks of accelerate's idiom pass None
        with staged_save(save_directory, variant=variant) as staging:
            if self.is_peft_model:
                self._save_policy_adapter(staging, state_dict)
            else:
                super().save_pretrained(staging, **save_kwargs)
            if overwrite_model_card or not os.path.exists(os.path.join(save_directory, "README.md")):
                adapter = self.pretrained_model.active_peft_config if self.is_peft_model else None
                card = render_model_card(
                    self.config, str(save_directory), self.v_head_source, self.name_or_path, adapter
                )
                card.save(staging / "README.md")
        wait_for_writer(gathered)
        if push_to_hub:
            hub_keywords = ("commit_message", "private", "token", "revision", "create_pr")
            self.push_to_hub(
                kwargs.get("repo_id", os.path.basename(os.path.abspath(save_directory))),
                max_shard_size=max_shard_size,
                overwrite_model_card=overwrite_model_card,
                **{key: kwargs[key] for key in hub_keywords if key in kwargs},
            )

    def push_to_hub(self, repo_id: str, *, overwrite_model_card: bool = False, **kwargs) -> Any:
        """`PreTrainedModel.push_to_hub`, with this package's model card: see [`transformers_vhead.hub.push_to_hub`]."""
        return push_to_hub(self, repo_id, overwrite_model_card=overwrite_model_card, **kwargs)

    def _save_policy_adapter(self, directory, state_dict: dict | None = None) -> None:
        """`state_dict`: this model's tensors to write (gathered from FSDP2's shards, or accelerate's `get_state_dict`)
        instead of its parameters'."""
        peft_model = self.pretrained_model
        names = [name for name in peft_model.peft_config if name not in (self.rm_adapter_name, self.ref_adapter_name)]
        base = self.name_or_path
        if base:  # the weights the adapter sits on: where this model was loaded from
            base = os.path.abspath(base) if os.path.isdir(base) else base
            for name in names:
                peft_model.peft_config[name].base_model_name_or_path = base
        peft_state = None if state_dict is None else _under(state_dict, "pretrained_model.")
        peft_model.save_pretrained(directory, selected_adapters=names, safe_serialization=True, state_dict=peft_state)
        Path(directory, "README.md").unlink(missing_ok=True)  # peft's card; ours is written when the directory has none
        head_state = self.v_head.state_dict() if state_dict is None else _under(state_dict, "v_head.")
        head = {f"v_head.{key}": tensor.detach().cpu().contiguous() for key, tensor in head_state.items()}
        save_file(head, os.path.join(directory, ADAPTER_HEAD_NAMES[0]), metadata={"format": "pt"})
        self.config.save_pretrained(directory)
        if self.can_generate():
            self.generation_config.save_pretrained(directory)


class AutoModelForCausalLMWithValueHead(PreTrainedModelWrapper, GenerationMixin):
    """A causal LM with a value head; TRL's `AutoModelForCausalLMWithValueHead` as a real transformers model.

    Example:

    ```python
    import transformers_vhead
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("path/saved/by/transformers-vhead")
    logits, loss, value = model(input_ids)
    ```
    """

    config_class = CausalLMWithValueHeadConfig
    transformers_parent_class = AutoModelForCausalLM
    _output_class = CausalLMOutputWithValue
    _output_class_with_past = CausalLMOutputWithValueAndPast

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        return_past_key_values: bool = False,
        *,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithValue | tuple:
        r"""
        Runs the wrapped causal LM once and the value head on its final hidden state. The first four arguments are
        TRL's, in TRL's order.

        Args:
            input_ids, attention_mask, position_ids, inputs_embeds, labels, use_cache: as for the wrapped model
                (`labels` gives the LM `loss`). `position_ids` restarting at 0 without an attention mask are a
                padding-free batch ([`pack_batch`]): it runs without a cache.
            past_key_values, cache: the cache, under either name (transformers 5.24 renamed `past_key_values` to
                `cache`); it reaches the wrapped model under the installed transformers' name.
            return_past_key_values (`bool`, defaults to `False`): TRL's flag; the output then also unpacks to the
                cache: `logits, loss, value, past_key_values = model(...)`.
            return_logits (`bool`, defaults to `True`): `False` is the value-only call of a critic or reward model:
                the forward stops after the decoder, the LM head never runs, and `logits` is `None`.
            kwargs: passed to the wrapped model.

        Returns:
            [`CausalLMOutputWithValue`]: `logits` (fp32 unless `config.upcast_logits` is off), `loss`, `value`
            `(batch, seq)` fp32, the cache when one was used; TRL's tuple with `return_dict=False`.
        """
        inputs = dict(
            input_ids=input_ids,
            **{CACHE_NAME: _one_cache(past_key_values, cache)},
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )
        return self._forward_with_value(inputs, return_past_key_values, return_logits)


class AutoModelForSeq2SeqLMWithValueHead(PreTrainedModelWrapper, GenerationMixin):
    """A seq2seq LM with a value head on its decoder; TRL's `AutoModelForSeq2SeqLMWithValueHead` as a real
    transformers model."""

    config_class = Seq2SeqLMWithValueHeadConfig
    transformers_parent_class = AutoModelForSeq2SeqLM
    _output_class = Seq2SeqLMOutputWithValue
    _output_class_with_past = Seq2SeqLMOutputWithValueAndPast

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        return_past_key_values: bool = False,
        *,
        cache: Cache | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple | ModelOutput | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> Seq2SeqLMOutputWithValue | tuple:
        r"""
        Runs the wrapped seq2seq LM once and the value head on its decoder's final hidden state: one value per
        decoder position. Arguments and outputs as for [`AutoModelForCausalLMWithValueHead.forward`], plus the
        wrapped model's decoder inputs.
        """
        inputs = dict(
            input_ids=input_ids,
            **{CACHE_NAME: _one_cache(past_key_values, cache)},
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )
        return self._forward_with_value(inputs, return_past_key_values, return_logits)


def _under(state_dict: dict, prefix: str) -> dict:
    """The entries of `state_dict` under `prefix`, named without it."""
    return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    if past_key_values is not None and cache is not None:
        raise ValueError("Pass the cache once, as `cache` or as `past_key_values` (its name before transformers 5.24).")
    return cache if cache is not None else past_key_values


def _head_settings(settings: dict) -> dict:
    unknown = sorted(set(settings) - set(HEAD_SETTINGS))
    if unknown:
        raise TypeError(
            f"Unexpected keyword(s) {unknown} when wrapping a model instance: only the head's settings "
            f"{list(HEAD_SETTINGS)} apply (the instance is already loaded, so loading keywords cannot)."
        )
    return settings
