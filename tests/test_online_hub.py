"""Loading by hub id online, into an empty cache, from a fake hub.

Only the hub's HTTP endpoint is faked: `FakeHub` is a real HTTP server on 127.0.0.1 (a free port) that answers the
routes huggingface_hub downloads from as huggingface.co does; huggingface_hub, transformers and peft run unmodified,
online (the fixture flips huggingface_hub's offline flag and points its endpoint constants at the server, with
monkeypatch). The offline tests (test_load_resolutions.py) read a cache that already holds every file; here the cache
starts empty and ends up holding only what the load asked for, so a file our plan forgot to look up, and transformers
then reads from the snapshot folder, would be missing: the load would fail, or differ from a load of the directory.

How the fake answers (as huggingface_hub's `get_hf_file_metadata`, `_get_metadata_or_catch_error` and `http_get` read
it), HEAD or GET of `/<repo>/resolve/<main or the commit>/<file>`:
- a file kept in git (configs): 200 with `X-Repo-Commit`, `ETag` (its git blob sha1) and `Content-Length`;
- an LFS file (weights): 302 to a "CDN" on another origin (`localhost` rather than `127.0.0.1`, so the HEAD stops at the
  redirect, as for cdn-lfs.hf.co), with `X-Repo-Commit`, `X-Linked-Etag` (sha256) and `X-Linked-Size`; the GET of the
  content then goes to the CDN;
- a file not in the repo: 404 with `X-Error-Code: EntryNotFound` and `X-Repo-Commit` (huggingface_hub then records it
  under `.no_exist/<commit>/`); another revision: 404 with `X-Error-Code: RevisionNotFound`.
Any other route is answered 404 and recorded, and the tests assert there was none. That includes
`HfApi.resolve_revision`'s `/api/models/<repo>/revision/<rev>`, deliberately not served: transformers calls it only for
a hub id, and our plan hands transformers and peft local snapshot folders, so a request to it would be a look-up of
their own (it is best-effort: a 404 would only make transformers keep the revision it was given).
"""

import hashlib
import re
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import transformers.utils.hub
from conftest import build_bare, model_inputs, policy_lora, populate_hub_cache
from huggingface_hub import constants
from huggingface_hub.utils import _detect_agent
from transformers.utils import cached_file

from transformers_vhead import AutoModelForCausalLMWithValueHead

LFS_SUFFIXES = (".safetensors", ".bin")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")
CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<commit>[0-9a-f]{40})/(?P<file>.+)$")


@dataclass(frozen=True)
class Request:
    repo: str
    file: str
    method: str  # HEAD or GET of /resolve, or "CDN GET"
    revision: str
    status: int


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_port}"
        self.cdn = f"http://localhost:{self.server_port}/cdn"
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}  # repo id: (commit, {file: content})
        self.log: list[Request] = []
        self.others: list[str] = []

    def add(self, repo_id: str, directory: Path) -> None:
        files = {
            path.relative_to(directory).as_posix(): path.read_bytes() for path in directory.rglob("*") if path.is_file()
        }
        self.repos[repo_id] = (hashlib.sha1(repo_id.encode()).hexdigest(), files)

    def requests_of(self, repo_id: str) -> list[Request]:
        return [request for request in self.log if request.repo == repo_id]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def do_HEAD(self):
        self._answer(with_body=False)

    def do_GET(self):
        self._answer(with_body=True)

    def log_message(self, *args):
        pass

    def _answer(self, with_body: bool) -> None:
        hub, path = self.server, unquote(urlsplit(self.path).path)
        if (cdn := CDN.match(path)) and cdn["repo"] in hub.repos:
            data = hub.repos[cdn["repo"]][1][cdn["file"]]
            hub.log.append(Request(cdn["repo"], cdn["file"], f"CDN {self.command}", cdn["commit"], 200))
            return self._send(200, {"Content-Length": len(data)}, data if with_body else b"")
        match = RESOLVE.match(path)
        if match is None or match["repo"] not in hub.repos:
            hub.others.append(f"{self.command} {self.path}")
            return self._send(404, {}, b"")
        repo, revision, name = match.group("repo", "revision", "file")
        commit, files = hub.repos[repo]
        data, headers = files.get(name, b""), {"X-Repo-Commit": commit}
        if revision not in ("main", commit):
            status, headers = 404, {"X-Error-Code": "RevisionNotFound"}
        elif name not in files:
            status, headers["X-Error-Code"] = 404, "EntryNotFound"
        elif name.endswith(LFS_SUFFIXES):
            status = 302
            headers["Location"] = f"{hub.cdn}/{repo}/{commit}/{name}"
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = len(data)
        else:
            status = 200
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
            headers["Content-Length"] = len(data)
        hub.log.append(Request(repo, name, self.command, revision, status))
        self._send(status, headers, data if status == 200 and with_body else b"")

    def _send(self, status: int, headers: dict, data: bytes) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": len(data), **headers}.items():
            self.send_header(key, str(value))
        self.end_headers()
        self.wfile.write(data)


def outputs(model) -> tuple[torch.Tensor, torch.Tensor, dict]:
    inputs = model_inputs("llama")
    with torch.no_grad():
        return model(**inputs).logits, model.compute_values(**inputs), model.generation_config.to_dict()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The repos' folders, saved offline, and what a load of each folder (offline) gives."""
    root = tmp_path_factory.mktemp("checkpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        bare = build_bare("llama")
        bare.generation_config.max_new_tokens = 5  # non-default settings: a generation config not read would show
        bare.save_pretrained(root / "base")
        ours = AutoModelForCausalLMWithValueHead.from_pretrained(root / "base", v_head_init_strategy="normal")
        ours.generation_config.max_new_tokens = 7
        ours.save_pretrained(root / "ours")
        ours.save_pretrained(root / "sharded", max_shard_size="20KB")
        cache = root / "offline-cache"  # the policy's adapter_config.json then names the hub id org/base
        populate_hub_cache(cache, "org/base", root / "base")
        policy = AutoModelForCausalLMWithValueHead.from_pretrained(
            "org/base", cache_dir=cache, peft_config=policy_lora(), v_head_init_strategy="normal"
        )
        policy.generation_config.max_new_tokens = 6  # the policy's own, saved beside its adapter
        policy.save_pretrained(root / "policy")
        expected = {
            name: outputs(AutoModelForCausalLMWithValueHead.from_pretrained(root / name, cache_dir=cache))
            for name in ("ours", "sharded", "policy")
        }
    return root, expected


@pytest.fixture
def hub(monkeypatch, checkpoints):
    """The fake hub serving org/base, org/ours, org/sharded and org/policy, and huggingface_hub online against it."""
    server = FakeHub()
    for name in ("base", "ours", "sharded", "policy"):
        server.add(f"org/{name}", checkpoints[0] / name)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # peft reads the variable itself
    monkeypatch.setattr(constants, "ENDPOINT", server.url)  # `hf_hub_url` and `HfApi` read these at call time
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    # transformers' shared HfApi keeps the endpoint it was built with: a fresh one is built against the fake hub
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    # the user agent names a detected AI agent from a registry fetched from the hub (and written to HF_HOME) once
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


SHARDS = {f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)}
DOWNLOADED = {  # what an online load of each repo fetches: every model file but the card
    "ours": {"org/ours": {"config.json", "generation_config.json", "model.safetensors"}},
    "sharded": {"org/sharded": {"config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS}},
    "policy": {
        "org/policy": {
            "adapter_config.json",
            "adapter_model.safetensors",
            "config.json",
            "generation_config.json",
            "value_head.safetensors",
        },
        "org/base": {"config.json", "generation_config.json", "model.safetensors"},
    },
}


@pytest.mark.parametrize("name", ["ours", "sharded", "policy"])
def test_an_online_load_into_an_empty_cache_gives_the_local_model(hub, checkpoints, tmp_path, name):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(f"org/{name}", cache_dir=tmp_path / "cache")
    logits, values, generation = outputs(model)
    local_logits, local_values, local_generation = checkpoints[1][name]
    assert torch.equal(logits, local_logits) and torch.equal(values, local_values)
    assert generation == local_generation
    assert generation["max_new_tokens"] == (6 if name == "policy" else 7)  # the policy's own, beside its adapter
    assert model.name_or_path == model.config.name_or_path == ("org/base" if name == "policy" else f"org/{name}")
    assert model.is_peft_model == (name == "policy")

    counts = Counter((request.repo, request.file, request.method) for request in hub.log)
    assert max(counts.values()) == 1, counts  # each file asked for once: a HEAD, then one GET of what is found
    assert not hub.others  # transformers and peft looked nothing up on the hub (nor resolved a revision)
    assert {request.repo for request in hub.log} == set(DOWNLOADED[name])
    for repo, files in DOWNLOADED[name].items():
        commit = hub.repos[repo][0]
        requests = [request for request in hub.requests_of(repo) if not request.method.startswith("CDN")]
        found = {request.file for request in requests if request.status in (200, 302)}
        got = {request.file for request in hub.requests_of(repo) if request.method in ("GET", "CDN GET")}
        assert found == got == files
        snapshot = tmp_path / "cache" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
        assert {path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*")} == files
        # the first file found pins the revision: every request after its own (HEAD, GET) names the commit
        first = next(i for i, request in enumerate(requests) if request.status in (200, 302))
        assert [request.revision for request in requests[:first]] == ["main"] * first
        for request in requests[first:]:
            assert request.revision == ("main" if request.file == requests[first].file else commit), request


def test_a_missing_file_is_answered_as_the_hub_does(hub, checkpoints, tmp_path):
    commit = hub.repos["org/ours"][0]
    missing = {"cache_dir": tmp_path, "_raise_exceptions_for_missing_entries": False}
    assert cached_file("org/ours", "no-such-file.json", **missing) is None
    assert (tmp_path / "models--org--ours" / ".no_exist" / commit / "no-such-file.json").is_file()
    assert cached_file("org/ours", "no-such-file.json", revision=commit, **missing) is None  # from .no_exist
    with pytest.raises(OSError, match="does not appear to have a file named no-such-file.json"):
        cached_file("org/ours", "no-such-file.json", cache_dir=tmp_path)
    found = Path(cached_file("org/ours", "model.safetensors", cache_dir=tmp_path))
    assert found.read_bytes() == (checkpoints[0] / "ours" / "model.safetensors").read_bytes()
    assert found.parent.name == commit
    assert [(r.file, r.method, r.revision, r.status) for r in hub.log] == [
        ("no-such-file.json", "HEAD", "main", 404),
        ("no-such-file.json", "HEAD", "main", 404),
        ("model.safetensors", "HEAD", "main", 302),
        ("model.safetensors", "CDN GET", commit, 200),
    ]
