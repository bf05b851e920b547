"""What differs between the transformers releases we support, found by feature checks (no version numbers).

transformers 5.24 renamed the cache from `past_key_values` to `cache`, in its outputs and in the forward keywords of
its models; 5.23 (our floor) has only the old name. Falcon's causal mask takes the position ids (so packed batches)
from 5.24.
"""

from __future__ import annotations

import functools
import inspect
import re

import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

# The name transformers' own outputs give the cache, and the name its models' forwards take it by.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# The other name: TRL-era code reads and passes `past_key_values`, code written for 5.24+ uses `cache`.
OTHER_CACHE_NAME = "past_key_values" if CACHE_NAME == "cache" else "cache"


@functools.cache
def causal_mask_ignores_position_ids(model_type: str) -> bool:
    """Whether the installed release's base model of `model_type` builds its causal mask without the position ids,
    so that it cannot keep the sequences of a packed batch apart (Falcon before transformers 5.24). Read off the
    `create_causal_mask(...)` call in its forward, the one place the releases differ; False where there is none."""
    class_name = MODEL_MAPPING_NAMES.get(model_type)
    model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if model_class is None:
        return False
    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return False
    call = re.search(r"create_causal_mask\((.*?)\n\s*\)", source, re.DOTALL)
    return call is not None and "position_ids" not in call.group(1)
