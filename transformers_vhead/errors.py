"""The exceptions of transformers-vhead.

Each one subclasses the builtin a caller would already catch (`ValueError`, `TypeError`, `OSError`), so code written
for TRL or transformers keeps working, and says what was wrong and what to do about it.
"""

from __future__ import annotations


class TransformersVheadError(Exception):
    """Base class of every error raised by transformers-vhead."""


class InvalidModelSourceError(TransformersVheadError, TypeError, ValueError):
    """`from_pretrained` got something that is neither a path, a hub id nor a model. A `TypeError`, and a `ValueError`
    as TRL raised there."""


class UnknownInitStrategyError(TransformersVheadError, ValueError):
    """`v_head_init_strategy` names no strategy we know."""


class HiddenSizeNotFoundError(TransformersVheadError, ValueError):
    """The wrapped model's config gives no hidden size for the value head."""


class UnknownBaseModelTypeError(TransformersVheadError, ValueError):
    """`text_config` has a `model_type` that the installed transformers does not know."""


class WrongModelKindError(TransformersVheadError, ValueError):
    """A causal LM was given where a seq2seq LM is needed, or the other way round."""


class MissingLMHeadError(TransformersVheadError, ValueError):
    """The wrapped model has no language-model head, so it cannot give logits."""


class HeadShapeMismatchError(TransformersVheadError, ValueError):
    """A checkpoint's value head does not fit the model it is loaded into."""


class CorruptCheckpointError(TransformersVheadError, OSError):
    """A weights file is truncated, corrupt, or not the format its name says; an index names a shard that is not there;
    a value head holds NaN or infinity."""


class UnsafePickleError(CorruptCheckpointError):
    """A pickled weights file (`.bin`) that would run code or build objects other than tensors when unpickled. It was
    not unpickled."""


class InvalidConfigError(TransformersVheadError, ValueError):
    """A `config.json` that cannot describe a model: not JSON, a field of the wrong type, a `text_config` without a
    `model_type`."""


class CheckpointMismatchError(TransformersVheadError, ValueError):
    """A checkpoint's weights do not fit the model its config describes: tensors the model lacks, weights of the model
    the checkpoint lacks, or shapes that differ."""


class CheckpointSaveError(TransformersVheadError, OSError):
    """`save_pretrained` could not write the checkpoint (a full disk, a read-only directory); the checkpoint already
    in the directory is left as it was."""


class PeftConfigError(TransformersVheadError, ValueError):
    """A `peft_config` (or an adapter) that cannot serve a value-head policy: not a `PeftConfig`, or prompt learning."""


class PeftNotInstalledError(TransformersVheadError, ImportError):
    """A PEFT feature (an adapter, `peft_config`, a reward adapter) was asked for, but peft is not installed."""


class AdapterNotFoundError(TransformersVheadError, FileNotFoundError):
    """A path or hub id that was meant to hold a PEFT adapter holds no adapter files."""


class AdapterMismatchError(TransformersVheadError, ValueError):
    """An adapter (or its score head) was trained for another base model: its tensor shapes do not fit this one."""


class RewardAdapterError(TransformersVheadError, ValueError):
    """A reward adapter was asked of a model that cannot have one (no PEFT), or scoring of a model without one."""


class MissingScoreHeadError(RewardAdapterError):
    """A reward adapter's weights hold no `score` head."""


class InvalidInputError(TransformersVheadError, ValueError):
    """Model inputs that cannot be run: `input_ids` and `attention_mask` of different shapes, an empty batch, rows of
    no tokens."""


class InputDtypeError(InvalidInputError, TypeError):
    """`input_ids` (or an attention mask) of a dtype the model cannot take, e.g. float token ids."""


class TokenIdOutOfRangeError(InvalidInputError, IndexError):
    """A token id outside the model's vocabulary (negative, or at least `vocab_size`); the bare model's embedding
    raises `IndexError` there."""


class EmptySequenceError(InvalidInputError):
    """A row of the attention mask is all zeros, so that sequence has no token to score."""


class InvalidPackedBatchError(InvalidInputError):
    """A padding-free (packed) batch that is malformed: `position_ids` of another shape than the ids, not starting at
    0, negative, or restarting at another value than 0; or a packed batch with a cache."""


class PackedBatchNotSupportedError(InvalidInputError):
    """A packed batch (several sequences in one row, told apart by `position_ids`) given to an architecture whose
    attention cannot keep them apart (see `transformers_vhead.packing.UNSUPPORTED_MODEL_TYPES`)."""


class NotAValueHeadModelError(TransformersVheadError, ValueError):
    """A value-head pipeline was given a plain language model (or anything else without a value head)."""


class ReferenceModelError(TransformersVheadError, ValueError):
    """A reference model cannot be made or used as asked: `num_shared_layers` out of range, a `pattern` that matches
    nothing, DeepSpeed ZeRO-3, or shared layers the policy still trains."""


class LayerStackNotFoundError(ReferenceModelError):
    """The model has no recognisable stack of decoder layers to share."""


class NoModelFoundError(TransformersVheadError, FileNotFoundError):
    """A directory (or hub snapshot) holds no model: no config, no weights, no adapter."""


class UnrecognizedLayoutError(TransformersVheadError, OSError):
    """A directory holds files, but in no checkpoint layout we can read (the message lists what was found)."""


class NotInOfflineCacheError(TransformersVheadError, OSError):
    """A hub id that is not in the local hub cache, while downloads are off (`HF_HUB_OFFLINE=1`, `local_files_only`)."""


class ExportError(TransformersVheadError, ValueError):
    """A model cannot be written in the asked format without losing something (e.g. a head bias a SeqCls head has no
    place for), or the format does not fit the model (a seq2seq model as a causal LM)."""


class DeviceMapError(TransformersVheadError, ValueError):
    """A `device_map` dict that does not place this model's modules: it names modules of the bare language model
    (without the `pretrained_model.` prefix), or gives no device for the value head `v_head`."""


class ZeRO3ShardsSaveError(TransformersVheadError, ValueError):
    """`save_pretrained` without a `state_dict` on a model whose parameters are DeepSpeed ZeRO-3 shards (empty on each
    rank): the checkpoint would hold 0-element tensors."""


class InvalidLogProbsSettingError(TransformersVheadError, ValueError):
    """A setting of `compute_logprobs` (or of the log-probs of `forward_with_reference`) that cannot be used: a
    temperature that is not a finite number above 0, a chunk size below 1."""
