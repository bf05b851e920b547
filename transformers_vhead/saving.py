"""Saves that never leave a half-written checkpoint over a good one."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Weight files a new save makes stale when it does not write them again: shards (as transformers cleans them) and the
# index of an earlier sharded save, which would otherwise point at shards that are gone.
_STALE_WEIGHTS = re.compile(
    r"model(\.[\w-]+)?-\d{5}-of-\d{5}\.safetensors|model(\.[\w-]+)?\.safetensors\.index(\.[\w-]+)?\.json"
)


@contextmanager
def staged_save(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging folder inside `save_directory`; write the checkpoint there.

    When the block finishes, each staged file replaces its namesake in `save_directory` (`os.replace`, atomic per file)
    and stale shards of an earlier save are removed. When the block raises, nothing in `save_directory` has changed:
    the files of the checkpoint that was there are untouched, and the staging folder is deleted.

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
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".transformers-vhead-staging-", dir=target))
    try:
        yield staging
        written = {path.relative_to(staging) for path in staging.rglob("*") if path.is_file()}
        for relative in sorted(written):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, target / relative)
        for path in target.iterdir():
            if path.is_file() and _STALE_WEIGHTS.fullmatch(path.name) and Path(path.name) not in written:
                path.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
