"""The files of a source (a local directory or a hub id), each looked up once per load.

`SourceFiles` keeps the answer of every look-up, also that a file is not there. A hub id is pinned to the commit of the
first file found, so every file of one load comes from one snapshot of the repository, and the loaders (transformers,
peft) are then pointed at that snapshot's folder, where they look nothing up on the hub again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import constants, is_offline_mode
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import cached_file
from transformers.utils.hub import extract_commit_hash

from .errors import (
    CorruptCheckpointError,
    InvalidConfigError,
    NoModelFoundError,
    NotInOfflineCacheError,
    UnrecognizedLayoutError,
)
from .safe_reading import WeightsReader, first_line

# The `from_pretrained` keywords that say where files come from, in the names `cached_file` takes.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")

# transformers' own lookup order: a single file before an index, safetensors before pickles.
SAFE_WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
GENERATION_CONFIG_NAME = "generation_config.json"


def hub_kwargs_of(kwargs: dict) -> dict:
    """The keywords among `kwargs` that say where files come from (see `HUB_KWARGS`)."""
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


class SourceFiles:
    """The files of one source, each looked up at most once.

    Args:
        source: a local directory or a hub id.
        hub_kwargs: `cache_dir`, `revision`, `token`, `local_files_only`, `subfolder`, ... as for `cached_file` (other
            keywords are left out).
    """

    def __init__(self, source: str | os.PathLike, hub_kwargs: dict):
        self.source = str(source)
        self.hub_kwargs = hub_kwargs_of(hub_kwargs)
        self.is_local = os.path.isdir(self.source)
        self._found: dict[str, str | None] = {}
        self._snapshot: str | None = None
        self._config: dict[str, Any] | None = None

    def find(self, name: str) -> str | None:
        """The local path of file `name` of the source (the hub cache's copy for a hub id), or `None` if it is not
        there."""
        if name not in self._found:
            path = cached_file(
                self.source,
                name,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **self.hub_kwargs,
            )
            self._found[name] = path
            if path is not None and not self.is_local and self._snapshot is None:
                self._pin(path, name)
        return self._found[name]

    def _pin(self, path: str, name: str) -> None:
        """Every further file of this hub id comes from the snapshot `path` is in: `revision` becomes its commit."""
        depth = len(Path(self.hub_kwargs.get("subfolder") or "", name).parts)
        self._snapshot = str(Path(path).parents[depth - 1])
        commit = extract_commit_hash(path, None)
        if commit is not None:
            self.hub_kwargs["revision"] = commit

    @property
    def directory(self) -> str:
        """The local folder the loaders read this source from: the directory itself, or the hub snapshot of the files
        found so far (the hub id while none is)."""
        return self._snapshot or self.source

    def config_dict(self) -> dict[str, Any]:
        """The source's `config.json` as a dict (`{}` when there is none), read once.

        Raises:
            InvalidConfigError: the file is not a JSON object.
        """
        if self._config is None:
            self._config = _read_config_file(self.find("config.json"))
        return self._config


def _read_json(path: str, error: type[Exception], what: str) -> Any:
    """The JSON value of the file `path`; `error`, naming the file as `what`, when it is not JSON or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except ValueError as exc:
        raise error(
            f"{path} is not valid JSON ({first_line(exc)}): {what} is corrupt. Save or download the checkpoint again."
        ) from exc


def _read_config_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    config = _read_json(path, InvalidConfigError, "the config")
    if not isinstance(config, dict):
        raise InvalidConfigError(
            f"{path} holds a JSON {type(config).__name__}, not an object of settings: it is no model config. Save or "
            "download the checkpoint again."
        )
    return config


def _with_variant(name: str, variant: str | None) -> str:
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def checkpoint_tensor_files(
    files: SourceFiles,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    weights_name: str | None = None,
    reader: WeightsReader | None = None,
) -> dict[str, str] | None:
    """The name of every tensor the load of `files` will read, with the local file that holds it; `None` when there
    are no weights.

    Looks at the same files as `PreTrainedModel.from_pretrained`, in its order, and reads each one as the load will,
    before it (headers and memory-mapped pickles, see [`WeightsReader`]), so a bad file is named here rather than
    failing deep inside the load, and a pickle that would run code is refused before transformers opens it. A sharded
    checkpoint's names are those its shards hold: transformers loads every tensor of every shard the index names, also
    one the index does not list.

    Args:
        files: the source's files.
        variant: the weights variant (`model.<variant>.safetensors`).
        use_safetensors: `False` reads only pickles, `True` only safetensors, `None` prefers safetensors.
        weights_name: a file tried first (a config's `transformers_weights`, which transformers loads instead).
        reader: the reader to read the files with (and to keep what was read); a fresh one by default.

    Raises:
        CorruptCheckpointError: a weights file is truncated or corrupt; an index is not valid, names a shard that is
            not there (or outside the checkpoint), or lists a tensor its shard does not hold.
        UnsafePickleError: a pickle that would run code or build other objects than tensors.
    """
    reader = reader or WeightsReader()
    names = [weights_name] if weights_name else []
    if use_safetensors is not False:
        names += [_with_variant(name, variant) for name in SAFE_WEIGHTS_NAMES]
    if not use_safetensors:
        names += [_with_variant(name, variant) for name in PICKLE_WEIGHTS_NAMES]
    for name in names:
        resolved = files.find(name)
        if resolved is None:
            continue
        if not name.endswith(".json"):
            return dict.fromkeys(reader.keys(resolved), resolved)
        return _sharded_tensor_files(files, resolved, reader)
    return None


def _read_index(index_file: str) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index (tensor name to shard file), checked as transformers reads it
    (it also reads the `metadata` object)."""
    index = _read_json(index_file, CorruptCheckpointError, "the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (
        isinstance(weight_map, dict)
        and all(isinstance(shard, str) for shard in weight_map.values())
        and isinstance(index.get("metadata"), dict)
    ):
        raise CorruptCheckpointError(
            f"{index_file} is not a sharded checkpoint's index: it needs a `weight_map` object from tensor names to "
            "shard file names, and a `metadata` object. Save or download the checkpoint again."
        )
    escaping = sorted(shard for shard in set(weight_map.values()) if os.path.isabs(shard) or ".." in shard.split("/"))
    if escaping:
        raise CorruptCheckpointError(
            f"{index_file} names shards outside the checkpoint ({', '.join(escaping[:3])}): an index only names files "
            "beside it. Save or download the checkpoint again."
        )
    return weight_map


def _sharded_tensor_files(files: SourceFiles, index_file: str, reader: WeightsReader) -> dict[str, str]:
    listed: dict[str, list[str]] = {}
    for key, shard in _read_index(index_file).items():
        listed.setdefault(shard, []).append(key)
    paths = {shard: files.find(shard) for shard in sorted(listed)}
    missing = [shard for shard, path in paths.items() if path is None]
    if missing:
        raise CorruptCheckpointError(
            f"{index_file} names {len(missing)} shard(s) that are not there: {_listing(missing)}. The checkpoint was "
            "not saved or downloaded completely: save or download it again."
        )
    tensor_files: dict[str, str] = {}
    for shard, path in paths.items():  # transformers' order: a tensor in two shards is the later shard's
        held = reader.keys(path)
        absent = [key for key in listed[shard] if key not in held]
        if absent:
            raise CorruptCheckpointError(
                f"{index_file} lists {_listing(absent)} in {path}, which does not hold it: the index and its shards "
                "are from different saves, or the shard is corrupt. Save or download the checkpoint again."
            )
        tensor_files.update(dict.fromkeys(held, path))
    return tensor_files


def _listing(names: list[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


# Files a checkpoint directory can hold that say nothing about a model (git and hub bookkeeping, cards, licences).
_NOT_MODEL_FILES = (".gitattributes", "README.md", "LICENSE", "LICENSE.txt", "USE_POLICY.md")
# transformers' weight files, with or without a variant or shard number, and the ones of the layouts we read.
_WEIGHT_FILE_PATTERN = re.compile(
    r"^(model|pytorch_model|adapter_model|value_head)([.-].*)?\.(safetensors|bin)(\.index\.json)?$|\.gguf$"
)


def check_model_source(files: SourceFiles, config_given: bool = False) -> None:
    """Fails early, with a message that says what to do, when the source cannot hold a model we load.

    A local directory must hold a `config.json` (or a PEFT `adapter_config.json`) and weights that transformers reads;
    a hub id, while downloads are off, must be in the hub cache: its adapter config, or its config unless the caller
    passed one (the auto classes pass the one they found there). Anything else is left to transformers.

    Raises:
        NoModelFoundError: the path does not exist, or the directory holds no model files at all.
        UnrecognizedLayoutError: the directory holds files, but in no layout we read (they are listed).
        NotInOfflineCacheError: a hub id with no copy in the cache while `HF_HUB_OFFLINE=1` or `local_files_only`.
    """
    hub_kwargs = files.hub_kwargs
    subfolder = hub_kwargs.get("subfolder")
    path = os.path.join(files.source, subfolder) if subfolder else files.source
    if os.path.isdir(path):
        names = sorted(name for name in os.listdir(path) if not name.startswith("."))
        model_files = [name for name in names if name not in _NOT_MODEL_FILES]
        if not model_files:
            found = f" (only {', '.join(names)})" if names else ""
            raise NoModelFoundError(
                f"{path} holds no model{found}. Point to the directory that `save_pretrained` wrote, with its "
                "config.json and weights."
            )
        has_config = "config.json" in names or "adapter_config.json" in names
        has_weights = any(_WEIGHT_FILE_PATTERN.search(name) for name in names)
        if not (has_config and has_weights):
            missing = (
                "weights (model.safetensors, pytorch_model.bin or a sharded index)"
                if has_config
                else "config.json (or a PEFT adapter_config.json)"
            )
            raise UnrecognizedLayoutError(
                f"{path} is not a checkpoint layout we can read: it has no {missing}. Found: {', '.join(names)}. "
                "Layouts read: transformers-vhead, TRL, trlx, OpenRLHF, LLaMA-Factory, verl, DeepSpeed-Chat and "
                "transformers' own (save_pretrained), or a PEFT adapter."
            )
        return
    if os.path.exists(path):
        raise NoModelFoundError(f"{path} is a file, not a model directory: pass the directory that holds it.")
    try:
        validate_repo_id(files.source)
    except HFValidationError:
        raise NoModelFoundError(f"{files.source} does not exist, and it is not a hub id (`org/name`).") from None
    if not (is_offline_mode() or hub_kwargs.get("local_files_only")):
        return
    if files.find("adapter_config.json") or config_given or files.find("config.json"):
        return
    why = "local_files_only=True" if hub_kwargs.get("local_files_only") else "HF_HUB_OFFLINE=1 is set"
    cache = hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE
    raise NotInOfflineCacheError(
        f"{files.source} is not a local directory, and the hub cache at {cache} has no copy of it"
        f"{' at revision ' + hub_kwargs['revision'] if hub_kwargs.get('revision') else ''}; downloads are off "
        f"({why}). Download it where there is a network (`hf download {files.source}`) into this cache, or pass a "
        "local directory."
    )
