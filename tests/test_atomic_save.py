"""A save replaces the checkpoint as a whole (issue 15, item 3): after a `kill -9` at any point of `save_pretrained`,
or a failure at any write, the directory loads the old checkpoint or the new one, complete, never a mix; a full disk
and a read-only directory give `CheckpointSaveError` with the old checkpoint intact; the files a save keeps survive it.

The saves that are killed, or that meet an injected failure, run in forked children (milliseconds each): the audit
hook that counts their file-system events cannot be removed again, and dies with the child.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import resource
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import peft.peft_model
import pytest
import torch
import tqdm
import transformers
from conftest import build_bare, policy_lora
from transformers import AutoModelForCausalLM, modeling_utils

from transformers_vhead import AutoModelForCausalLMWithValueHead, saving
from transformers_vhead import modeling as vhead_modeling
from transformers_vhead.errors import CheckpointSaveError

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or saving._renameat2() is None,
    reason="the whole-directory swap needs Linux's renameat2, and these tests fork their saves",
)

EXCHANGE = "transformers_vhead.saving.exchange"
# the audit events that change the file system (os.replace is audited as os.rename, os.unlink as os.remove)
MUTATIONS = {"os.rename", "os.link", "os.symlink", "os.remove", "os.rmdir", "shutil.rmtree", "os.mkdir", "os.chmod"}
MUTATIONS |= {"os.chown", "os.truncate", EXCHANGE}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# the safetensors writes, which Python does not audit (Rust code): wrapped in the child
SAFETENSORS_WRITERS = [
    (modeling_utils, "safe_save_file"),
    (vhead_modeling, "save_file"),
    (peft.peft_model, "safe_save_file"),
]
UNPRIVILEGED = 65534  # nobody


# --- a checkpoint, its two versions, and what a directory holds ------------------------------------------------------


def tree(directory: Path) -> dict[str, tuple]:
    """Every entry under `directory`: files with their bytes and permission bits, symlinks with their target,
    directories with their bits."""
    entries = {}
    for root, directories, files in os.walk(directory):
        for name in directories + files:
            path = Path(root, name)
            info = path.lstat()
            relative = path.relative_to(directory).as_posix()
            if stat.S_ISLNK(info.st_mode):
                entries[relative] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[relative] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                entries[relative] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return entries


def staging_left(target: Path) -> list[str]:
    """Staging folders of a save of `target`: beside it or inside it."""
    beside = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.transformers-vhead-")]
    inside = [p.name for p in target.iterdir() if "transformers-vhead" in p.name] if target.is_dir() else []
    return beside + inside


def assert_same_weights(expected, actual) -> None:
    expected_sd, actual_sd = expected.state_dict(), actual.state_dict()
    assert expected_sd.keys() == actual_sd.keys()
    assert [key for key in expected_sd if not torch.equal(expected_sd[key], actual_sd[key])] == []


def add_user_files(target: Path) -> None:
    """What a training directory holds beside the checkpoint: a tokenizer, logs in a subdirectory, a symlink."""
    (target / "tokenizer.json").write_text('{"version": "1.0"}')
    (target / "runs" / "events").mkdir(parents=True)
    (target / "runs" / "events" / "log.txt").write_text("step 1\n")
    os.symlink("tokenizer.json", target / "tokenizer-link.json")


@dataclass
class Versions:
    """A target holding a good old checkpoint, a backup to restore it from, and a model whose save differs."""

    target: Path
    backup: Path
    old: object
    new: object
    save_kwargs: dict
    old_tree: dict = field(default_factory=dict)
    new_tree: dict = field(default_factory=dict)
    loaded: set = field(default_factory=set)

    def restore(self) -> None:
        shutil.rmtree(self.target)
        for name in staging_left(self.target):
            shutil.rmtree(self.target.parent / name)
        shutil.copytree(self.backup, self.target, symlinks=True)
        assert tree(self.target) == self.old_tree

    def assert_old_or_new(self) -> str:
        """The target holds exactly the old or the new checkpoint (every entry, every byte, every permission bit),
        and loads it through the auto class with the weights bit-equal to that model's. A directory byte-equal to
        one already loaded loads the same, so each version is loaded once (a load costs more than a kill)."""
        now = tree(self.target)
        version = "old" if now == self.old_tree else "new" if now == self.new_tree else None
        assert version, f"a mix: {sorted(now.keys() ^ self.old_tree.keys())} differ from the old file list"
        if version not in self.loaded:
            reloaded = AutoModelForCausalLM.from_pretrained(self.target)
            assert_same_weights(self.old if version == "old" else self.new, reloaded)
            self.loaded.add(version)
        return version


def tiny_llama_dir(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    if not base.exists():
        build_bare("llama").save_pretrained(base)
    return base


def value_model(base: Path, seed: int, layout: str):
    torch.manual_seed(seed)
    extra = {"peft_config": policy_lora()} if layout == "peft-policy" else {}
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base, **extra).eval()
    with torch.no_grad():
        model.v_head.summary.weight.add_(float(seed))
        if layout != "peft-policy":
            model.get_input_embeddings().weight.mul_(1.0 + seed)
    return model


LAYOUTS = {  # layout -> (keywords of the old save, keywords of the new one)
    "single-file": ({}, {}),
    "sharded": ({"max_shard_size": "20KB"}, {"max_shard_size": "30KB"}),  # 7 shards replaced by 4
    "peft-policy": ({}, {}),
}


def make_versions(tmp_path: Path, layout: str) -> Versions:
    base = tiny_llama_dir(tmp_path)
    old_kwargs, new_kwargs = LAYOUTS[layout]
    versions = Versions(
        tmp_path / "checkpoints" / "out",
        tmp_path / "backup",
        value_model(base, 0, layout),
        value_model(base, 1, layout),
        new_kwargs,
    )
    versions.old.save_pretrained(versions.target, **old_kwargs)
    add_user_files(versions.target)
    shutil.copytree(versions.target, versions.backup, symlinks=True)
    versions.old_tree = tree(versions.target)
    return versions


# --- forked saves ----------------------------------------------------------------------------------------------------


class Events:
    """Counts the file-system events of this process (a forked child); at the `at`-th, `action` runs first."""

    def __init__(self, at: int | None = None, action=None):
        self.at, self.action, self.log = at, action, []
        sys.addaudithook(self.audit)
        for module, name in SAFETENSORS_WRITERS:
            setattr(module, name, self.counted(getattr(module, name)))

    def audit(self, event: str, args: tuple) -> None:
        if event == "open":
            if not isinstance(args[0], (str, bytes, os.PathLike)) or not args[2] & WRITE_FLAGS:
                return
        elif event not in MUTATIONS or (event == "os.mkdir" and os.path.isdir(args[0])):  # makedirs' no-op
            return
        self.tick(event, args[0])

    def counted(self, write):
        def save_file(tensors, filename, metadata=None):
            self.tick("safetensors.write", filename)
            write(tensors, filename, metadata=metadata)
            self.tick("safetensors.written", filename)

        return save_file

    def tick(self, event: str, path) -> None:
        self.log.append((event, os.fsdecode(path)))
        if len(self.log) == self.at:
            self.action(event, path)


def kill_now(event, path) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def no_space(event, path) -> None:
    if event == "safetensors.write":
        Path(path).write_bytes(b"half a shard")  # a partial write, then the disk fills up
    if event != "safetensors.written":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))


def describe(exc: BaseException) -> dict:
    return {"type": type(exc), "message": str(exc), "errno": getattr(exc, "errno", None), "cause": exc.__cause__}


def forked(function, *, delay: float | None = None):
    """Runs `function()` in a forked child. Returns ("killed", None), ("returned", value) or ("raised", details);
    with `delay`, the child is SIGKILLed that many seconds after it says it starts."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.close(read_end)
            # tqdm's lock is a multiprocessing semaphore shared with the parent: a child killed while holding it (in a
            # progress bar of the save) would block the parent's next progress bar for good
            tqdm.tqdm.set_lock(threading.RLock())
            transformers.utils.logging.disable_progress_bar()
            torch.set_num_threads(1)
            sys.dont_write_bytecode = True  # no .pyc written on a lazy import, so runs count the same events
            os.write(write_end, b"s")
            try:
                outcome = ("returned", function())
            except BaseException as exc:
                outcome = ("raised", describe(exc))
            os.write(write_end, pickle.dumps(outcome))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read(1) == b"s"
        if delay is not None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed", None
    assert data, f"the child exited with status {status} and reported nothing"
    return pickle.loads(data)


def new_save(versions: Versions, at: int | None = None, action=None):
    """The save of the new model over the old checkpoint, for a child to run, with `action` at its `at`-th event."""

    def save():
        if action is not None:
            Events(at, action)
        versions.new.save_pretrained(versions.target, **versions.save_kwargs)

    return save


def dry_run(versions: Versions) -> tuple[list, float]:
    """One whole save in a child, counting its events; then the target holds the new checkpoint."""

    def save():
        events = Events()
        start = time.perf_counter()
        versions.new.save_pretrained(versions.target, **versions.save_kwargs)
        return events.log, time.perf_counter() - start

    outcome, (log, seconds) = forked(save)
    assert outcome == "returned"
    versions.new_tree = tree(versions.target)
    assert versions.new_tree != versions.old_tree
    assert versions.assert_old_or_new() == "new" and staging_left(versions.target) == []
    assert [event for event, _ in log].count(EXCHANGE) == 1  # published by the swap, not file by file
    versions.restore()
    return log, seconds


# --- 1. kill -9 at every event, and at a spread of delays ------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kill_at_every_file_system_event_leaves_the_old_or_the_new_checkpoint(tmp_path, layout):
    versions = make_versions(tmp_path, layout)
    log, _ = dry_run(versions)
    exchange_at = [event for event, _ in log].index(EXCHANGE) + 1

    seen = []
    for at in range(1, len(log) + 1):
        outcome, _ = forked(new_save(versions, at, kill_now))
        assert outcome == "killed", f"the save ran past event {at} of {len(log)} ({log[at - 1]})"
        seen.append(versions.assert_old_or_new())
        versions.restore()

    # killed before the swap: the old checkpoint; at the swap or after it: the new one
    assert seen == ["old"] * exchange_at + ["new"] * (len(log) - exchange_at)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kill_after_a_spread_of_delays_leaves_the_old_or_the_new_checkpoint(tmp_path, layout):
    versions = make_versions(tmp_path, layout)
    _, seconds = dry_run(versions)

    seen = set()
    for step in range(10):
        forked(new_save(versions), delay=seconds * step / 8)
        seen.add(versions.assert_old_or_new())
        versions.restore()
    assert "old" in seen  # a kill right at the start; the later ones may land after the save


def test_a_later_save_removes_the_staging_of_a_killed_save_and_nothing_else(tmp_path):
    versions = make_versions(tmp_path, "single-file")
    log, _ = dry_run(versions)
    after_swap = [event for event, _ in log].index(EXCHANGE) + 2  # the old tree, at the sibling's name, not deleted
    forked(new_save(versions, after_swap, kill_now))
    left_by_kill = staging_left(versions.target)
    assert len(left_by_kill) == 1 and versions.assert_old_or_new() == "new"
    parent = versions.target.parent
    alive = parent / f".out.transformers-vhead-{os.getpid()}-0123abcd"  # a save of this process, still running
    unrelated = [parent / ".out.transformers-vhead-notes", parent / ".out.transformers-vhead-1-0123abcd.txt"]
    unrelated.append(parent / ".out.transformers-vhead-999999-0123abcd")  # our name and no such process, but a file
    alive.mkdir()
    unrelated[0].mkdir()
    for path in unrelated[1:]:
        path.write_text("not ours")

    versions.old.save_pretrained(versions.target)

    assert sorted(staging_left(versions.target)) == sorted(p.name for p in [alive, *unrelated])
    assert versions.assert_old_or_new() == "old"


# --- 2. a failure at every write -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sharded", "peft-policy"])
def test_no_space_at_every_write_raises_and_leaves_the_old_checkpoint(tmp_path, layout):
    versions = make_versions(tmp_path, layout)
    log, _ = dry_run(versions)
    writes = [at for at, (event, _) in enumerate(log, 1) if event != "safetensors.written"]
    exchange_at = [event for event, _ in log].index(EXCHANGE) + 1

    for at in writes:
        outcome, details = forked(new_save(versions, at, no_space))
        event, path = log[at - 1]
        if at <= exchange_at:  # while staging, or the swap itself
            assert outcome == "raised", f"a failure at {log[at - 1]} went unnoticed"
            assert details["type"] is CheckpointSaveError and details["errno"] == errno.ENOSPC
            assert isinstance(details["cause"], OSError) and details["cause"].errno == errno.ENOSPC
            assert f"Saving to {versions.target} failed" in details["message"]
            assert "No space left on device (the disk is full)" in details["message"]
            assert f"The checkpoint already in {versions.target} is untouched" in details["message"]
            if event in ("open", "safetensors.write"):
                assert f"while writing {Path(path).name}:" in details["message"]
            assert versions.assert_old_or_new() == "old"
        else:  # deleting the old tree is best effort: the new checkpoint is in place
            assert outcome == "returned", details
            assert versions.assert_old_or_new() == "new"
        assert staging_left(versions.target) == [], f"staging left after a failure at {log[at - 1]}"
        versions.restore()


# --- 3. a full disk for real, a read-only directory ------------------------------------------------------------------


def test_a_file_size_limit_for_real_raises_and_leaves_the_old_checkpoint(tmp_path):
    versions = make_versions(tmp_path, "single-file")

    def save_under_a_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))  # the JSON files fit, the weights do not
        versions.new.save_pretrained(versions.target)

    outcome, details = forked(save_under_a_limit)

    assert outcome == "raised" and details["type"] is CheckpointSaveError and details["errno"] == errno.EFBIG
    assert "failed while writing model.safetensors: File too large" in details["message"]
    assert "untouched" in details["message"] and "ulimit -f" in details["message"]
    assert versions.assert_old_or_new() == "old" and staging_left(versions.target) == []


def test_a_first_save_that_fails_leaves_no_directory_behind(tmp_path):
    model = value_model(tiny_llama_dir(tmp_path), 0, "single-file")
    target = tmp_path / "new" / "deeper" / "out"

    def save_under_a_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))
        model.save_pretrained(target)

    outcome, details = forked(save_under_a_limit)

    assert outcome == "raised" and details["type"] is CheckpointSaveError and details["errno"] == errno.EFBIG
    assert f"Nothing is left at {target} (the directories made for it were removed)" in details["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # new/ and new/deeper/ removed again


@pytest.fixture
def reachable(tmp_path):
    """A directory an unprivileged uid can reach (pytest's temporary directories are private to root), and a function
    that runs a callable in a child as that uid when this process is root (chmod does not stop root), as is
    otherwise."""
    directory = Path(tempfile.mkdtemp(prefix="transformers-vhead-unprivileged-"))
    if os.geteuid() == 0 and not all(parent.stat().st_mode & stat.S_IXOTH for parent in directory.parents):
        shutil.rmtree(directory)
        pytest.skip(f"the temporary directory {directory.parent} is not reachable by an unprivileged uid")
    uid = UNPRIVILEGED if os.geteuid() == 0 else os.geteuid()
    os.chown(directory, uid, uid)

    def as_user(function):
        def dropped():
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(UNPRIVILEGED)
                os.setuid(UNPRIVILEGED)
            return function()

        return forked(dropped)

    def chown_tree(path: Path) -> None:
        for root, directories, files in os.walk(path):
            for name in [".", *directories, *files]:
                os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)

    yield directory, as_user, chown_tree
    for root, directories, _ in os.walk(directory):  # give root's rmtree the bits back, for a run as a user
        for name in [".", *directories]:
            os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(directory)


def test_a_read_only_directory_is_refused_before_anything_is_written(tmp_path, reachable):
    directory, as_user, chown_tree = reachable
    versions = make_versions(tmp_path, "single-file")
    target = directory / "out"
    shutil.copytree(versions.target, target, symlinks=True)
    chown_tree(directory)
    target.chmod(0o555)
    before, beside = tree(target), sorted(os.listdir(directory))

    outcome, details = as_user(lambda: versions.new.save_pretrained(target))

    assert outcome == "raised" and details["type"] is CheckpointSaveError
    assert f"Cannot save to {target}: it is not writable by this process" in details["message"]
    assert "Nothing was written" in details["message"] and "chmod u+w" in details["message"]
    assert tree(target) == before and sorted(os.listdir(directory)) == beside
    assert_same_weights(versions.old, AutoModelForCausalLM.from_pretrained(target))

    new_target = directory / "read-only-parent" / "out"  # a first save whose parent is read-only
    new_target.parent.mkdir(mode=0o555)
    chown_tree(new_target.parent)
    outcome, details = as_user(lambda: versions.new.save_pretrained(new_target))
    assert outcome == "raised" and details["type"] is CheckpointSaveError
    assert f"its parent {new_target.parent} is not writable" in details["message"]
    assert os.listdir(new_target.parent) == []


def test_a_read_only_subdirectory_is_kept_and_the_old_tree_still_deleted(tmp_path, reachable):
    directory, as_user, chown_tree = reachable
    versions = make_versions(tmp_path, "single-file")
    target = directory / "out"
    shutil.copytree(versions.target, target, symlinks=True)
    chown_tree(directory)
    (target / "runs" / "events").chmod(0o555)  # its files cannot be unlinked by a user until it is writable again

    outcome, details = as_user(lambda: versions.new.save_pretrained(target))

    assert outcome == "returned", details
    assert stat.S_IMODE((target / "runs" / "events").stat().st_mode) == 0o555
    assert (target / "runs" / "events" / "log.txt").read_text() == "step 1\n"
    assert staging_left(target) == []
    assert_same_weights(versions.new, AutoModelForCausalLM.from_pretrained(target))


def test_a_parent_that_is_not_writable_falls_back_to_publishing_file_by_file(tmp_path, reachable):
    directory, as_user, chown_tree = reachable
    versions = make_versions(tmp_path, "single-file")
    target = directory / "locked" / "out"
    shutil.copytree(versions.target, target, symlinks=True)
    chown_tree(directory)
    target.parent.chmod(0o555)  # no sibling can be made: the swap is impossible
    inode = target.stat().st_ino

    outcome, details = as_user(lambda: versions.new.save_pretrained(target))

    assert outcome == "returned", details
    assert target.stat().st_ino == inode and os.listdir(target.parent) == ["out"]  # not swapped, nothing beside
    assert staging_left(target) == []
    assert (target / "runs" / "events" / "log.txt").read_text() == "step 1\n"
    assert_same_weights(versions.new, AutoModelForCausalLM.from_pretrained(target))


# --- 4. the files a save keeps ---------------------------------------------------------------------------------------


def test_kept_files_survive_as_hard_links_with_the_directory_bits(tmp_path):
    versions = make_versions(tmp_path, "sharded")
    target = versions.target
    os.symlink("/nonexistent/elsewhere", target / "runs" / "dangling")
    target.chmod(0o2750)  # setgid and group-readable: kept
    (target / "runs").chmod(0o700)
    kept = ["tokenizer.json", "runs/events/log.txt", "README.md"]
    inodes = {name: (target / name).stat().st_ino for name in kept}
    contents = {name: (target / name).read_bytes() for name in kept}
    old_inode = target.stat().st_ino

    versions.new.save_pretrained(target, **versions.save_kwargs)

    assert target.stat().st_ino != old_inode  # swapped as a whole
    assert {name: (target / name).read_bytes() for name in kept} == contents
    assert {name: (target / name).stat().st_ino for name in kept} == inodes  # the same files, not copies
    assert os.readlink(target / "tokenizer-link.json") == "tokenizer.json"
    assert os.readlink(target / "runs" / "dangling") == "/nonexistent/elsewhere"
    assert stat.S_IMODE(target.stat().st_mode) == 0o2750 and stat.S_IMODE((target / "runs").stat().st_mode) == 0o700
    assert not [name for name in os.listdir(target) if name.startswith("model-") and "-of-00007" in name]
    assert staging_left(target) == []
    assert_same_weights(versions.new, AutoModelForCausalLM.from_pretrained(target))


def test_files_another_process_adds_or_replaces_during_the_save_are_kept(tmp_path, monkeypatch):
    versions = make_versions(tmp_path, "single-file")
    target = versions.target
    real_exchange = saving._exchange

    def exchange_while_a_logger_writes(staging, swapped):
        (target / "runs" / "events" / "log2.txt").write_text("step 2\n")  # after the linking, before the swap
        replacement = target / "runs" / "events" / "log.txt.tmp"
        replacement.write_text("step 1, rewritten\n")
        os.replace(replacement, target / "runs" / "events" / "log.txt")
        real_exchange(staging, swapped)

    monkeypatch.setattr(saving, "_exchange", exchange_while_a_logger_writes)
    versions.new.save_pretrained(target)

    assert (target / "runs" / "events" / "log2.txt").read_text() == "step 2\n"
    assert (target / "runs" / "events" / "log.txt").read_text() == "step 1, rewritten\n"
    assert staging_left(target) == []
    assert_same_weights(versions.new, AutoModelForCausalLM.from_pretrained(target))


def test_a_save_into_the_working_directory_falls_back_to_file_by_file(tmp_path, monkeypatch):
    versions = make_versions(tmp_path, "sharded")
    target = versions.target
    monkeypatch.chdir(target)  # a swap would leave this process's working directory in the deleted old tree
    inode = (target / "tokenizer.json").stat().st_ino
    real = modeling_utils.safe_save_file

    def no_space_on_the_second_shard(tensors, filename, metadata=None):
        if filename.endswith("-00002-of-00004.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", no_space_on_the_second_shard)
    with pytest.raises(CheckpointSaveError, match=r"while writing model-00002-of-00004\.safetensors: No space") as info:
        versions.new.save_pretrained(".", **versions.save_kwargs)
    assert isinstance(info.value.__cause__, OSError)
    assert tree(target) == versions.old_tree  # a failure while writing: still untouched in the fallback
    monkeypatch.setattr(modeling_utils, "safe_save_file", real)

    versions.new.save_pretrained(".", **versions.save_kwargs)

    assert Path.cwd() == target and (target / "tokenizer.json").stat().st_ino == inode  # in place, not swapped
    assert staging_left(target) == []
    assert len([name for name in os.listdir(target) if name.endswith("-of-00004.safetensors")]) == 4
    assert not [name for name in os.listdir(target) if name.endswith("-of-00007.safetensors")]
    assert_same_weights(versions.new, AutoModelForCausalLM.from_pretrained(target))


@pytest.mark.parametrize("answer", [errno.EINVAL, errno.EXDEV], ids=["EINVAL", "EXDEV"])
def test_a_filesystem_refusing_the_exchange_falls_back_to_file_by_file(tmp_path, monkeypatch, answer):
    versions = make_versions(tmp_path, "sharded")
    target = versions.target
    inode = target.stat().st_ino

    def renameat2(*args):  # what libc answers on a filesystem (or kernel) without RENAME_EXCHANGE
        ctypes.set_errno(answer)
        return -1

    monkeypatch.setattr(saving, "_renameat2", lambda: renameat2)
    versions.new.save_pretrained(target, **versions.save_kwargs)

    assert target.stat().st_ino == inode  # published in place
    assert staging_left(target) == []
    assert (target / "runs" / "events" / "log.txt").read_text() == "step 1\n"
    assert not [name for name in os.listdir(target) if name.endswith("-of-00007.safetensors")]
    assert_same_weights(versions.new, AutoModelForCausalLM.from_pretrained(target))


def test_a_symlink_to_the_directory_stays_a_symlink(tmp_path):
    versions = make_versions(tmp_path, "single-file")
    link = tmp_path / "latest"
    link.symlink_to(versions.target)

    versions.new.save_pretrained(link)

    assert link.is_symlink() and link.resolve() == versions.target
    assert staging_left(versions.target) == [] and (versions.target / "tokenizer.json").exists()
    assert_same_weights(versions.new, AutoModelForCausalLM.from_pretrained(link))
