"""transformers-vhead: value-head language models as first-class Hugging Face transformers models.

Importing the package registers its config and model classes with transformers' auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads a saved value-head model without `trust_remote_code`, and the
"value-scoring" pipeline task, so `pipeline("value-scoring", model=path)` scores texts.
"""

from .auto import register
from .configuration import CausalLMWithValueHeadConfig, Seq2SeqLMWithValueHeadConfig, ValueHeadConfig
from .export import EXPORT_FORMATS, ExportResult, export_model
from .heads import ValueHead
from .layouts import HeadSource
from .logprobs import LogProbsOutput
from .modeling import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PreTrainedModelWrapper
from .outputs import CausalLMOutputWithValue, Seq2SeqLMOutputWithValue
from .packing import PackedBatch, pack_batch
from .pipelines import ValueScoringPipeline
from .reference import PolicyAndReferenceOutput, SharedTrunk, create_reference_model

__version__ = "0.1.0"

__all__ = [
    "EXPORT_FORMATS",
    "ExportResult",
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "CausalLMOutputWithValue",
    "CausalLMWithValueHeadConfig",
    "HeadSource",
    "LogProbsOutput",
    "PackedBatch",
    "PolicyAndReferenceOutput",
    "PreTrainedModelWrapper",
    "Seq2SeqLMOutputWithValue",
    "Seq2SeqLMWithValueHeadConfig",
    "SharedTrunk",
    "ValueHead",
    "ValueHeadConfig",
    "ValueScoringPipeline",
    "create_reference_model",
    "export_model",
    "pack_batch",
    "register",
]

register()
