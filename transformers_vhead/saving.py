"""Saves that never leave a half-written checkpoint, nor a mix of two, over a good one."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from safetensors import SafetensorError

from .errors import CheckpointSaveError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
# renameat2's answers that mean "no exchange here" (a filesystem or kernel without it, a mount point, a sandbox that
# forbids the call, a sticky parent directory): the save is then published file by file
_NO_EXCHANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EBUSY, errno.EOPNOTSUPP, errno.ENOTSUP}
# os.link's answers after which a kept file is copied instead: hard links forbidden (protected_hardlinks) or
# unsupported by the filesystem, or the file at its link limit
_NO_LINK = {errno.EPERM, errno.EACCES, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}
_FULL_DISK = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file reached the size limit of this process or filesystem",
}
_STAGING_IN_TARGET = "transformers-vhead-staging"


# A PEFT policy's files (peft's adapter, our head beside it). A directory holding them loads as that adapter, so a
# whole-model save over a PEFT policy's directory drops them, as a PEFT save drops a whole model's weights.
_ADAPTER_FILES = re.compile(r"adapter_config\.json|(adapter_model|value_head)\.(safetensors|bin)")


def _is_checkpoint_file(name: str, weights: re.Pattern) -> bool:
    return weights.fullmatch(name) is not None or _ADAPTER_FILES.fullmatch(name) is not None


def _weight_files(variant: str | None) -> re.Pattern:
    """The names of one variant's safetensors weights: the single file, its shards, and its index."""
    infix = re.escape(f".{variant}") if variant else ""
    return re.compile(rf"model{infix}(-\d{{5}}-of-\d{{5}})?\.safetensors|model\.safetensors\.index{infix}\.json")


def _publish_order(relative: Path) -> tuple[bool, bool, str]:
    # weights first, then the JSON that points at them, the card last: a crash between two moves leaves old
    # configs beside new weights rather than configs that name weights not yet there
    return relative.name == "README.md", relative.suffix == ".json", str(relative)


class _NoExchange(Exception):
    """The directory cannot be swapped in one step; the save is published file by file."""


@contextmanager
def staged_save(save_directory: str | os.PathLike, variant: str | None = None) -> Iterator[Path]:
    """Yields an empty staging folder; write the checkpoint there. When the block finishes, the new checkpoint
    replaces the one in `save_directory` as a whole.

    The staging folder is a hidden sibling of `save_directory` (`.<name>.transformers-vhead-<pid>-<random>`). After the
    block, every entry of the old directory the save does not replace is hard-linked into it (copied where a link is
    refused; symlinks recreated as symlinks; subdirectories such as a Trainer's `checkpoint-*` and `runs/` too), except
    the checkpoint files that the new save did not write: the weight files of the same `variant` (a single file
    replaced by shards, shards or an index of an earlier save) and a PEFT policy's files (`adapter_config.json`,
    `adapter_model.*`, `value_head.*`; a directory holding them loads as the adapter). The staging folder gets the old
    directory's permission bits (and owner, where allowed), and one `renameat2(RENAME_EXCHANGE)` swaps it with
    `save_directory`; the old tree, now at the sibling's name, is deleted after taking back what another process added
    to it during the save. An interruption at any point, `kill -9` included, leaves `save_directory` holding the old
    checkpoint or the new one, complete; a later save removes a sibling left by a process that is no longer alive. A
    `save_directory` that does not exist yet is the staged folder renamed.

    When the block raises, `save_directory` is as it was and the staging folder is deleted (directories created for a
    first save too). An `OSError` (a full disk, a quota, a file-size limit), or safetensors' error for one, while
    writing or staging becomes a `CheckpointSaveError` naming the file. A directory that is not writable is refused
    before anything is written.

    Fallback: where the swap is impossible (not Linux, no `renameat2` in the C library, `save_directory` a mount point
    or the current working directory or one of its ancestors, a parent directory that is not writable, a kept entry on
    another mount, or `renameat2` answering EXDEV, EINVAL, ENOSYS, EPERM, EBUSY or EOPNOTSUPP), each new file replaces
    its namesake with `os.replace` (atomic per file, weights first, JSON next, the card last) and the stale weight files
    are removed afterwards. A failure while writing still leaves the old checkpoint untouched, but an interruption
    while publishing can leave new weights beside old configs. The guarantees are for a process that dies; surviving a
    power cut would also need the files synced to disk, which transformers' writers do not do.

    Example:

    ```python
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "checkpoint"
    >>> with staged_save(target) as staging:
    ...     _ = (staging / "config.json").write_text("{}")
    >>> _ = (target / "notes.txt").write_text("a file of the user's, kept")
    >>> with staged_save(target) as staging:
    ...     _ = (staging / "config.json").write_text('{"a": 1}')
    >>> sorted(p.name for p in target.iterdir()), (target / "config.json").read_text()
    (['config.json', 'notes.txt'], '{"a": 1}')
    >>> [p.name for p in target.parent.iterdir()]  # no staging folder left beside it
    ['checkpoint']

    ```
    """
    target = Path(os.path.realpath(save_directory))  # a symlink to the directory stays a symlink
    exists = _check_writable(target)
    _remove_stale_staging(target, exists)
    swap = not exists or _can_exchange(target)
    created = [] if exists else _make_parents(target)
    weights = _weight_files(variant)
    try:
        staging = _make_staging(target, beside=swap)
    except OSError as exc:
        _remove_created(created)
        raise _save_error(exc, target, None, exists) from exc
    try:
        yield staging
    except BaseException as exc:
        _remove_tree(staging)
        _remove_created(created)
        if _errno_of(exc) is None:
            raise
        raise _save_error(exc, target, staging, exists) from exc
    written = _files(staging)
    wrote_checkpoint = any(_is_checkpoint_file(str(relative), weights) for relative in written)

    def stale(relative: Path) -> bool:  # a file of the checkpoint the new save replaces
        return wrote_checkpoint and relative.parent == Path() and _is_checkpoint_file(relative.name, weights)

    file_by_file, doing = False, None
    try:
        if not exists:
            os.rename(staging, target)
            return
        if swap:
            try:
                linked = _carry_over(target, staging, stale)
                _copy_mode(target, staging)
                doing = "swapping the staged checkpoint into place"
                _exchange(staging, target)
            except _NoExchange:
                pass
            else:
                _take_late_arrivals(staging, target, linked, stale)  # `staging` now holds the old tree
                return
        file_by_file = True
        _publish_file_by_file(staging, target, written, stale)
    except OSError as exc:
        _remove_created(created, after=staging)
        raise _save_error(exc, target, staging, exists, publishing=file_by_file, doing=doing) from exc
    finally:
        _remove_tree(staging)


# --- before the save -------------------------------------------------------------------------------------------------


def _check_writable(target: Path) -> bool:
    """Whether `target` exists; refuses a file, and a directory (or, for a new one, the nearest existing parent) that
    this process cannot write, before anything is written: a swap could otherwise replace a directory its owner made
    read-only."""
    if target.exists() and not target.is_dir():
        raise CheckpointSaveError(
            f"Cannot save to {target}: it is a file, not a directory. Nothing was written; pass a directory path."
        )
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointSaveError(
            f"Cannot save to {target}: {existing} is a file, not a directory. Nothing was written; pass a directory "
            "path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it is" if existing == target else f"its parent {existing} is"
        raise CheckpointSaveError(
            f"Cannot save to {target}: {where} not writable by this process (a read-only directory or filesystem). "
            "Nothing was written and the checkpoint already there is untouched; make the directory writable "
            "(`chmod u+w`) or save to another directory."
        )
    return existing == target


def _can_exchange(target: Path) -> bool:
    """Whether the existing directory `target` can be swapped with a sibling (see `staged_save`'s fallback)."""
    if _renameat2() is None or os.path.ismount(target) or not os.access(target.parent, os.W_OK | os.X_OK):
        return False
    try:  # the working directory would stay in the old tree, which is deleted
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:
        return True
    return not cwd.is_relative_to(target)


@lru_cache(maxsize=1)
def _renameat2() -> Callable | None:
    """libc's `renameat2`, or None where there is none (not Linux, glibc before 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _staging_patterns(target: Path) -> list[tuple[Path, re.Pattern]]:
    """(folder, names) of the staging folders a save of `target` makes: beside it, and inside it for the fallback."""
    return [
        (target.parent, re.compile(rf"\.{re.escape(target.name)}\.transformers-vhead-(\d+)-[0-9a-f]{{8}}")),
        (target, re.compile(rf"\.{_STAGING_IN_TARGET}-(\d+)-[0-9a-f]{{8}}")),
    ]


def _make_staging(target: Path, beside: bool) -> Path:
    """A new staging folder, named with this process's id so that a later save can tell a dead one."""
    (folder, _), (inside, _) = _staging_patterns(target)
    prefix = f".{target.name}.transformers-vhead-" if beside else f".{_STAGING_IN_TARGET}-"
    while True:
        staging = (folder if beside else inside) / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:  # private while staged; a new directory gets the umask's bits, as a plain mkdir gives it
            os.mkdir(staging, 0o777 if not target.exists() else 0o700)
            return staging
        except FileExistsError:
            continue


def _remove_stale_staging(target: Path, exists: bool) -> None:
    """Removes staging folders of `target` left by processes that died (`kill -9`) during a save. Only names of our
    exact pattern, only real directories, only when their process is gone."""
    for folder, pattern in _staging_patterns(target)[: 2 if exists else 1]:
        if not os.access(folder, os.W_OK | os.X_OK):
            continue
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir(follow_symlinks=False) and not _alive(int(match.group(1))):
                _remove_tree(Path(entry.path))


def _alive(pid: int) -> bool:
    """Whether process `pid` may still be running (in this pid namespace: a save from another container or host that
    shares the filesystem looks dead, and its staging folder may be removed, failing that save, never mixing it)."""
    if pid == os.getpid() or os.name != "posix":  # Windows' os.kill would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; or not a pid at all: leave it alone
        return True
    return True


def _make_parents(target: Path) -> list[Path]:
    """Creates the missing parents of a new `target` (not `target` itself: the staged folder becomes it)."""
    missing = []
    parent = target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created = []
    try:
        for directory in reversed(missing):
            os.mkdir(directory)
            created.append(directory)
    except OSError as exc:
        _remove_created(created)
        raise _save_error(exc, target, None, exists=False) from exc
    return created


# --- publishing ------------------------------------------------------------------------------------------------------


def _files(root: Path) -> list[Path]:
    return sorted(path.relative_to(root) for path in root.rglob("*") if path.is_file() or path.is_symlink())


def _carry_over(source: Path, staging: Path, stale: Callable[[Path], bool]) -> dict[Path, int]:
    """Hard-links every entry of `source` that the new save does not replace into `staging`; returns the inode of
    each linked file (to spot a file replaced during the save). Raises `_NoExchange` for an entry on another mount:
    the swap would move a mounted filesystem into the tree that is deleted."""
    device = os.stat(source).st_dev
    linked: dict[Path, int] = {}

    def walk(relative: Path, made: bool) -> None:
        with os.scandir(source / relative) as entries:
            entries = list(entries)
        present = {} if made else _listing(staging / relative)  # what the new save wrote there: it wins
        for entry in entries:
            inner = relative / entry.name
            destination = staging / inner
            info = entry.stat(follow_symlinks=False)
            if info.st_dev != device:
                raise _NoExchange
            if stat.S_ISDIR(info.st_mode):
                if entry.name in present and not present[entry.name]:
                    continue  # a file of that name
                if entry.name not in present:
                    os.mkdir(destination, 0o700)
                walk(inner, made=entry.name not in present)
                if entry.name not in present:
                    _copy_mode(Path(entry.path), destination)
            elif entry.name in present or stale(inner):
                continue
            elif stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(entry.path), destination)
            else:
                try:
                    os.link(entry.path, destination, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno == errno.EXDEV:  # a bind mount inside the directory
                        raise _NoExchange from exc
                    if exc.errno not in _NO_LINK:
                        raise
                    shutil.copy2(entry.path, destination, follow_symlinks=False)
                linked[inner] = info.st_ino

    walk(Path(), made=False)
    return linked


def _listing(directory: Path) -> dict[str, bool]:
    """The names in `directory`, each with whether it is a directory (not a symlink to one)."""
    with os.scandir(directory) as entries:
        return {entry.name: entry.is_dir(follow_symlinks=False) for entry in entries}


def _copy_mode(source: Path, destination: Path) -> None:
    """Gives `destination` the permission bits of `source`, and its owner where this process may."""
    info = os.stat(source)
    os.chmod(destination, stat.S_IMODE(info.st_mode))
    mine = os.stat(destination)
    if (mine.st_uid, mine.st_gid) != (info.st_uid, info.st_gid):
        try:
            os.chown(destination, info.st_uid, info.st_gid)
        except OSError:
            pass


def _exchange(staging: Path, target: Path) -> None:
    """Swaps the two directories in one system call."""
    sys.audit("transformers_vhead.saving.exchange", str(staging), str(target))  # ctypes calls are not audited
    if _renameat2()(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        if code in _NO_EXCHANGE:
            raise _NoExchange
        raise OSError(code, os.strerror(code), str(target))


def _take_late_arrivals(old: Path, new: Path, linked: dict[Path, int], stale: Callable[[Path], bool]) -> None:
    """Moves into `new` what another process created in the old directory, or replaced there, between the linking and
    the swap (a logger's new file, say), so that deleting the old tree loses nothing. Best effort."""

    def walk(relative: Path) -> None:
        try:
            with os.scandir(old / relative) as entries:
                entries = list(entries)
            present = _listing(new / relative)
        except OSError:
            return
        for entry in entries:
            inner = relative / entry.name
            destination = new / inner
            try:
                if entry.name not in present:
                    if not stale(inner):
                        os.rename(entry.path, destination)
                elif entry.is_dir(follow_symlinks=False):
                    if present[entry.name]:
                        walk(inner)
                elif inner in linked and entry.inode() != linked[inner]:
                    os.replace(entry.path, destination)
            except OSError:
                continue

    walk(Path())


def _publish_file_by_file(staging: Path, target: Path, written: list[Path], stale: Callable[[Path], bool]) -> None:
    """The fallback: each new file replaces its namesake (atomic per file), then the stale weight files go."""
    for relative in sorted(written, key=_publish_order):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / relative, target / relative)
    for path in target.iterdir():
        if path.is_file() and stale(Path(path.name)) and Path(path.name) not in written:
            path.unlink()


# --- clean-up and errors ---------------------------------------------------------------------------------------------


def _remove_tree(path: Path) -> None:
    """Deletes a staging folder or an old tree; best effort, never raises (what it leaves, a later save removes)."""
    for attempt in range(2):
        try:
            shutil.rmtree(path, ignore_errors=True)
            if attempt or not os.path.lexists(path):
                return
            # a subdirectory without write permission (a user's `chmod -w`) keeps its entries from a user's process
            for root, directories, _ in os.walk(path):
                for name in [".", *directories]:
                    info = os.lstat(os.path.join(root, name))
                    if stat.S_ISDIR(info.st_mode):
                        os.chmod(os.path.join(root, name), info.st_mode | stat.S_IRWXU)
        except OSError:
            continue


def _remove_created(created: list[Path], after: Path | None = None) -> None:
    """Removes the parents made for a first save that failed, deepest first (only while empty)."""
    if after is not None:
        _remove_tree(after)
    for directory in reversed(created):
        try:
            os.rmdir(directory)
        except OSError:
            break


def _errno_of(exc: BaseException) -> int | None:
    """The OS error number of a failed write: an `OSError`'s, or the one safetensors' writer quotes in its message."""
    if isinstance(exc, CheckpointSaveError):
        return None
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    if isinstance(exc, SafetensorError):
        found = re.search(r"I/O error: .*\(os error (\d+)\)", str(exc))
        return int(found.group(1)) if found else None
    return None


def _failing_file(exc: BaseException, staging: Path | None) -> str | None:
    """The file a failed save was writing, relative to the checkpoint, when it can be told."""
    candidates = [getattr(exc, "filename2", None), getattr(exc, "filename", None)]
    # Python's write() and safetensors do not name the file: the innermost frame of the traceback holding a path in
    # the staging folder is the writer's
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    candidates += [value for frame in reversed(frames) for value in frame.f_locals.values()]
    for candidate in candidates:
        if staging is not None and isinstance(candidate, (str, os.PathLike)):
            path = Path(os.path.abspath(candidate))
            if path != staging and path.is_relative_to(staging):
                return str(path.relative_to(staging))
    filename = getattr(exc, "filename", None)
    return None if filename is None else str(filename)


def _save_error(
    exc: BaseException,
    target: Path,
    staging: Path | None,
    exists: bool,
    publishing: bool = False,
    doing: str | None = None,
) -> CheckpointSaveError:
    """The error of a failed save: what failed, on which file, in what state the directory is, what to do."""
    code = _errno_of(exc) or errno.EIO
    reason = f"{os.strerror(code)} ({_FULL_DISK[code]})" if code in _FULL_DISK else os.strerror(code)
    if code == errno.EFBIG:
        advice = "raise the limit (`ulimit -f`) or pass a smaller `max_shard_size`, then save again"
    elif code in _FULL_DISK:
        advice = "free some space (until the swap, the new weights need room beside the old ones) or save elsewhere"
    else:
        advice = "fix the cause, or save to another directory"
    name = _failing_file(exc, staging)
    what = f"while {doing}" if doing else f"while writing {name or 'the checkpoint'}"
    if publishing:
        state = (
            f"The save was being published file by file (this directory cannot be swapped as a whole), so {target} "
            "may now hold a mix of the old and the new checkpoint: save again"
        )
    elif exists:
        state = f"The checkpoint already in {target} is untouched and the staged files were removed"
    else:
        state = f"Nothing is left at {target} (the directories made for it were removed)"
    return CheckpointSaveError(code, f"Saving to {target} failed {what}: {reason}. {state}; {advice}.")
