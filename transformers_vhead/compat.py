"""What differs between the transformers releases we support, found by feature checks (no version numbers).

transformers 5.24 renamed the cache from `past_key_values` to `cache`, in its outputs and in the forward keywords of
its models; 5.23 (our floor) has only the old name.
"""

from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

# The name transformers' own outputs give the cache, and the name its models' forwards take it by.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# The other name: TRL-era code reads and passes `past_key_values`, code written for 5.24+ uses `cache`.
OTHER_CACHE_NAME = "past_key_values" if CACHE_NAME == "cache" else "cache"
