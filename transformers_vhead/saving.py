"""Saves that never leave a half-written checkpoint over a good one."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _weight_files(variant: str | None) -> re.Pattern:
    """The names of one variant's safetensors weights: the single file, its shards, and its index."""
    infix = re.escape(f".{variant}") if variant else ""
    return re.compile(rf"model{infix}(-\d{{5}}-of-\d{{5}})?\.safetensors|model\.safetensors\.index{infix}\.json")


def _publish_order(relative: Path) -> tuple[bool, bool, str]:
    # weights first, then the JSON that points at them, the card last: a crash between two moves leaves old
    # configs beside new weights rather than configs that name weights not yet there
    return relative.name == "README.md", relative.suffix == ".json", str(relative)


@contextmanager
def staged_save(save_directory: str | os.PathLike, variant: str | None = None) -> Iterator[Path]:
    """Yields an empty staging folder inside `save_directory`; write the checkpoint there.

    When the block finishes, each staged file replaces its namesake in `save_directory` (`os.replace`, atomic per
    file), and the weight files of the same `variant` that the new save did not write (a single file replaced by
    shards, shards or an index of an earlier save) are removed. Other files (tokenizer, other variants, user files)
    are kept. When the block raises, `save_directory` is as it was: the previous checkpoint is untouched, the staging
    folder is deleted, and a directory the save created is removed again.

    Example:

    ```python
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp())
    >>> with staged_save(target) as staging:
    ...     _ = (staging / "config.json").write_text("{}")
    >>> sorted(p.name for p in target.iterdir())
    ['config.json']

    ```
    """
    target = Path(save_directory)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".transformers-vhead-staging-", dir=target))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise
    try:
        written = sorted((p.relative_to(staging) for p in staging.rglob("*") if p.is_file()), key=_publish_order)
        for relative in written:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, target / relative)
        weights = _weight_files(variant)
        if any(weights.fullmatch(str(relative)) for relative in written):
            for path in target.iterdir():
                if path.is_file() and weights.fullmatch(path.name) and Path(path.name) not in written:
                    path.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
