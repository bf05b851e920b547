"""Where a value-head model's parts go under a `device_map`: a map is checked against this model's module names before
anything loads, and a fresh head (not in the checkpoint, so it cannot be offloaded) is kept off "disk".

The names are the composite model's: the language model under `pretrained_model`, the head `v_head`.
"""

from __future__ import annotations

from transformers import PreTrainedModel
from transformers.utils import logging

from .errors import DeviceMapError

logger = logging.get_logger(__name__)


def _is_under(name: str, module: str) -> bool:
    """Whether `name` is `module` or inside it (a device map's key `""` holds everything)."""
    return not module or name == module or name.startswith(module + ".")


def _mapped_device(device_map: dict, name: str):
    """The device `device_map` gives to the parameter or module `name`: its most specific key's."""
    keys = [key for key in device_map if _is_under(name, key)]
    return device_map[max(keys, key=len)] if keys else None


def check_device_map(device_map, model_name: str):
    """A copy of a `device_map` dict (anything else as it is), rejected before anything is loaded when it does not
    place this model's modules.

    Raises:
        DeviceMapError: a key names no module of the value-head model (a map written for the bare LM), or no key
            gives the value head a device.
    """
    if not isinstance(device_map, dict):
        return device_map
    keys = [str(key) for key in device_map]
    foreign = [key for key in keys if key and not _is_under(key, "pretrained_model") and not _is_under(key, "v_head")]
    if foreign:
        raise DeviceMapError(
            f"device_map names {foreign}, which are not modules of {model_name}: the language model is under "
            "`pretrained_model` and the value head is `v_head`. A device map written for the bare model (as TRL "
            f"took it) needs `pretrained_model.` before each key, e.g. {'pretrained_model.' + foreign[0]!r}, and an "
            "entry for 'v_head'; `model.hf_device_map` of a model loaded with device_map='auto' shows the names."
        )
    if "" not in keys and not any(_is_under(key, "v_head") for key in keys):
        raise DeviceMapError(
            "device_map gives no device for the value head: add 'v_head': <device>, the device of the wrapped "
            "model's LM head and final norm (the head reads the decoder's final hidden state), or use '' for "
            "everything not named."
        )
    return dict(device_map)


def keep_fresh_head_off_disk(model: PreTrainedModel, device_map: dict) -> None:
    """Maps a fresh head that `device_map` puts on "disk" to the LM head's device (accelerate's main device when the
    LM head is on disk too), in place."""
    head_keys = [f"v_head.{name}" for name, _ in model.v_head.named_parameters()]
    if all(_mapped_device(device_map, key) != "disk" for key in head_keys):
        return
    output_embeddings = model.get_output_embeddings()
    lm_head = next((name for name, module in model.named_modules() if module is output_embeddings), None)
    device = None if lm_head is None else _mapped_device(device_map, f"{lm_head}.weight")
    if device in (None, "disk"):
        accelerators = list(set(device_map.values()) - {"cpu", "disk"})  # accelerate's main device, the same way
        device = accelerators[0] if accelerators else "cpu"
    for key in [key for key in device_map if _is_under(str(key), "v_head")]:
        del device_map[key]
    if "" in device_map:  # accelerate cannot keep a module in memory inside one it offloads: name the LM instead
        device_map.setdefault("pretrained_model", device_map.pop(""))
    device_map["v_head"] = device
    logger.info(f"The fresh value head is placed on {device!r}, not offloaded to disk: it is not in the checkpoint.")
