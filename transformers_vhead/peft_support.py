"""peft is optional, as it was for TRL: without it, everything but the PEFT features works.

A `PeftModel` or a `PeftConfig` cannot exist before peft is imported, so the checks here look in `sys.modules` and never
import peft themselves: a model that uses no adapter costs no peft import, and works where peft is not installed.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from torch import nn

from .errors import PeftNotInstalledError

PEFT_INSTALL_COMMAND = 'pip install "transformers-vhead[peft]"'


def _imported_peft() -> ModuleType | None:
    return sys.modules.get("peft")


def is_peft_model(obj: object) -> bool:
    """Whether `obj` is a `peft.PeftModel`."""
    peft = _imported_peft()
    return peft is not None and isinstance(obj, peft.PeftModel)


def is_peft_config(obj: object) -> bool:
    """Whether `obj` is a `peft.PeftConfig`."""
    peft = _imported_peft()
    return peft is not None and isinstance(obj, peft.PeftConfig)


def without_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a `PeftModel` (`model` itself when it is none)."""
    return model.get_base_model() if is_peft_model(model) else model


def require_peft(feature: str) -> ModuleType:
    """The `peft` module, imported now.

    Args:
        feature: what needs peft, for the error (e.g. "Loading the PEFT adapter at org/policy").

    Raises:
        PeftNotInstalledError: peft is not installed (an `ImportError` naming the install command).
    """
    try:
        return importlib.import_module("peft")
    except ImportError as exc:
        raise PeftNotInstalledError(
            f"{feature} needs peft, which is not installed: `{PEFT_INSTALL_COMMAND}` (or `pip install peft`)."
        ) from exc
