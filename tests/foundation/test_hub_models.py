"""Models from where users keep them: a local directory or a hub id from the HF cache.

The cache is built offline under a temp HF_HOME in the layout huggingface_hub itself writes
(`hub/models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
refs/<branch>}`), holding the toy model's files; nothing touches the network (HF_HUB_OFFLINE=1).
`resolve_model`, `loraplex adapters base add`, `loraplex serve --model` and
`loraplex train --base` all take `org/name[@revision]`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from loraplex.adapters.errors import ConfigError
from loraplex.adapters.fingerprint import fingerprint_base
from loraplex.adapters.models import resolve_model

REPO = "toy-org/toy-chat"
MAIN = "1" * 40  # the commit refs/main points at
OLD = "2" * 40  # an older commit, reachable by hash (and by the tag v0.1)


def write_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes],
                   refs: tuple[str, ...] = ()) -> Path:
    """One snapshot of `repo_id` in a hub cache, as snapshot_download leaves it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hf_home(toy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME whose hub cache holds REPO: main = the toy model, OLD (tag v0.1) = it with
    max_position_embeddings halved in config.json (so its fingerprint differs)."""
    home = tmp_path_factory.mktemp("hf-home")
    files = {p.name: p.read_bytes() for p in toy_model_dir.iterdir() if p.is_file()}
    write_snapshot(home / "hub", REPO, MAIN, files, refs=("main",))
    cfg = json.loads(files["config.json"])
    cfg["max_position_embeddings"] = cfg.get("max_position_embeddings", 1024) // 2
    old = dict(files, **{"config.json": json.dumps(cfg).encode()})
    write_snapshot(home / "hub", REPO, OLD, old, refs=("v0.1",))
    return home


@pytest.fixture
def hub_env(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def snapshot(hf_home: Path, commit: str) -> Path:
    return hf_home / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit


# -- resolve_model ------------------------------------------------------------------------------

def test_resolve_by_id_and_revision(hub_env: Path, toy_model_dir: Path):
    main = snapshot(hub_env, MAIN)
    assert resolve_model(REPO) == main
    assert resolve_model(f"{REPO}@main") == main
    assert resolve_model(f"{REPO}@{MAIN}") == main
    assert resolve_model(REPO, revision="main") == main
    assert resolve_model(f"{REPO}@{OLD}") == snapshot(hub_env, OLD)
    assert resolve_model(f"{REPO}@v0.1") == snapshot(hub_env, OLD)
    # the snapshot is the model: same fingerprint as the directory it was made from
    assert fingerprint_base(resolve_model(REPO)) == fingerprint_base(toy_model_dir)
    assert fingerprint_base(resolve_model(f"{REPO}@v0.1")) != fingerprint_base(toy_model_dir)


def test_resolve_local_directory_first(hub_env: Path, toy_model_dir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch):
    assert resolve_model(toy_model_dir) == toy_model_dir.resolve()
    assert resolve_model(str(toy_model_dir)) == toy_model_dir.resolve()
    # a directory that happens to look like a hub id wins over the cache
    local = tmp_path / "toy-org" / "toy-chat"
    shutil.copytree(toy_model_dir, local)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(REPO) == local.resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model("empty")
    with pytest.raises(ConfigError, match="'./missing' does not exist"):
        resolve_model("./missing")
    with pytest.raises(ConfigError, match="revision"):
        resolve_model(local, revision="main")


def test_offline_errors_name_the_value_and_the_fix(hub_env: Path):
    cache = str(hub_env / "hub")
    with pytest.raises(ConfigError) as exc:
        resolve_model("toy-org/not-cached")
    msg = exc.value.message
    assert "'toy-org/not-cached'" in msg and cache in msg
    assert "hf download toy-org/not-cached" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(ConfigError) as exc:
        resolve_model(f"{REPO}@no-such-branch")
    assert "no-such-branch" in exc.value.message and cache in exc.value.message
    with pytest.raises(ConfigError, match="not a local directory and not a hub id"):
        resolve_model("not a model!")
    with pytest.raises(ConfigError, match="revision"):
        resolve_model(f"{REPO}@main", revision=OLD)


def test_hf_hub_cache_overrides_hf_home(hf_home: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(REPO) == snapshot(hf_home, MAIN)


def test_online_with_the_hub_unreachable_uses_the_cache(hf_home: Path):
    """Not offline, but no hub answers (an endpoint on a closed local port): a cached id still
    resolves to its snapshot, an uncached one fails naming it. In a subprocess, because
    huggingface_hub reads HF_ENDPOINT once, at import."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
               HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_CACHE", None)
    code = ("import sys\nfrom loraplex.adapters.models import resolve_model\n"
            "from loraplex.adapters.errors import ConfigError\n"
            f"print(resolve_model({REPO!r}))\n"
            "try:\n    resolve_model('toy-org/absent')\n"
            "except ConfigError as e:\n    print('ERR', e.message)\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    first, err = p.stdout.strip().splitlines()[-2:]
    assert first == str(snapshot(hf_home, MAIN))
    assert err.startswith("ERR model 'toy-org/absent'") and "hf download toy-org/absent" in err


# -- loraplex adapters base add -------------------------------------------------------------------

def test_base_add_by_id_records_the_snapshot(hub_env: Path, toy_model_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture):
    from loraplex.adapters.cli import main
    from loraplex.adapters.registry import Registry

    db, store = f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "artifacts")
    common = ["--registry-url", db, "--artifacts-url", store]
    assert main(["adapters", "base", "add", "toy", REPO, *common]) == 0
    assert "fingerprint " + fingerprint_base(toy_model_dir) in capsys.readouterr().out
    assert main(["adapters", "base", "add", "toy", f"{REPO}@{MAIN}", *common]) == 0  # idempotent
    with Registry(db, store) as reg:
        b = reg.get_base("toy")
    assert b.fingerprint == fingerprint_base(snapshot(hub_env, MAIN))
    assert b.source_dir == str(snapshot(hub_env, MAIN))
    # another revision is another model: refused under the same name
    assert main(["adapters", "base", "add", "toy", f"{REPO}@v0.1", *common]) == 2
    assert "already registered" in capsys.readouterr().err
    # not cached, offline: exit 2 with the fix, no traceback
    assert main(["adapters", "base", "add", "other", "toy-org/absent", *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'toy-org/absent'") and "HF_HUB_OFFLINE" in err


# -- loraplex serve --model org/name --------------------------------------------------------------

@pytest.mark.engine
def test_serve_by_hub_id_answers_chat(hub_env: Path, toy_model_dir: Path, test_loras: dict,
                                      tmp_path: Path):
    from openai import OpenAI

    from loraplex.adapters.registry import Registry
    from tests.services import free_port, server_env, spawn_server, wait_ready

    home = tmp_path / "home"
    with Registry(f"sqlite:///{home / 'registry.db'}", str(home / "artifacts")) as reg:
        reg.register_base("toy", resolve_model(REPO))
        reg.push(test_loras["upper"], "upper", base="toy")
    port = free_port()
    # no LORAPLEX_MAX_MODEL_LEN: the engine takes the context length from the model
    env = server_env(home, port, HF_HOME=str(hub_env), HF_HUB_OFFLINE="1")
    env.pop("LORAPLEX_MAX_MODEL_LEN")
    env.pop("HF_HUB_CACHE", None)
    log = tmp_path / "server.log"
    proc = spawn_server(REPO, env, log)  # `loraplex serve --model toy-org/toy-chat`
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log, timeout=300)
        c = OpenAI(base_url=url + "/v1", api_key="test-key", max_retries=0)
        assert {"toy", "upper"} <= {m.id for m in c.models.list().data}
        answers = {}
        for model in ("toy", "upper"):
            r = c.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "cat dog"}])
            assert r.choices[0].finish_reason in ("stop", "length")
            answers[model] = r.choices[0].message.content
        assert answers["toy"] and answers["upper"] and answers["toy"] != answers["upper"]
        assert str(snapshot(hub_env, MAIN)) in log.read_text()  # resolved once, logged
    finally:
        from tests.server.conftest import stop_server

        stop_server(proc)


def test_serve_unknown_hub_id_fails_fast(hub_env: Path, tmp_path: Path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env.update(LORAPLEX_HOME=str(tmp_path), HF_HOME=str(hub_env), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "loraplex.adapters.cli", "serve", "--model",
                        "toy-org/absent"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "toy-org/absent" in p.stderr and "hub cache" in p.stderr and "Traceback" not in p.stderr


# -- loraplex train --base org/name ---------------------------------------------------------------

def test_train_by_hub_id(hub_env: Path, toy_model_dir: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture):
    from loraplex.adapters.cli import main
    from loraplex.adapters.registry import Registry

    data = Path(__file__).resolve().parents[2] / "trainer" / "data"
    db, store = f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "artifacts")
    assert main(["adapters", "base", "add", "toy", REPO, "--registry-url", db,
                 "--artifacts-url", store]) == 0
    capsys.readouterr()
    rc = main(["train", "--base", REPO, "--data", str(data / "words.alpaca.jsonl"),
               "--output", str(tmp_path / "adapter"), "--max-steps", "2", "--batch-size", "4",
               "--lora-r", "4", "--lora-alpha", "8", "--no-progress-bar",
               "--eval-exact-match", "0", "--register", "words",
               "--registry-url", db, "--artifacts-url", store, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["registered"] == "words@1"
    with Registry(db, store) as reg:
        v = reg.resolve("words@1")
    # trained against the snapshot: registered under the base with its fingerprint
    assert v.base_name == "toy" and v.base_fingerprint == fingerprint_base(toy_model_dir)


def test_train_by_hub_id_names_a_new_base_after_the_model(hub_env: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture):
    """No base registered yet: the new base is named after the hub model, not after its
    snapshot directory (a commit hash)."""
    from loraplex.adapters.cli import main
    from loraplex.adapters.registry import Registry

    data = Path(__file__).resolve().parents[2] / "trainer" / "data"
    db, store = f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "artifacts")
    rc = main(["train", "--base", REPO, "--data", str(data / "words.alpaca.jsonl"),
               "--output", str(tmp_path / "adapter"), "--max-steps", "1", "--batch-size", "4",
               "--lora-r", "4", "--lora-alpha", "8", "--no-progress-bar",
               "--eval-exact-match", "0", "--register", "words",
               "--registry-url", db, "--artifacts-url", store])
    assert rc == 0, capsys.readouterr().err
    with Registry(db, store) as reg:
        assert reg.resolve("words@1").base_name == REPO.split("/")[1].lower()
