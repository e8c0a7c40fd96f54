"""Data where users keep it: the same rows as JSON lines, Parquet, `datasets` save_to_disk
directories (a Dataset; a DatasetDict and a split) and hub dataset ids in the local Hugging Face
cache (prepared by `load_dataset`, or the raw repository files of a download) give token-identical
examples; Arrow rows come back as the JSON they were written from (no null struct fields); bad
rows keep their file and row index; split errors list the splits; nothing touches the network.

No network: the hub tests build the two caches a download leaves, in a temporary HF_HOME.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.adapters.chat import builtin_template
from loraplex.adapters.errors import BadRequest
from loraplex.trainer import sources
from loraplex.trainer.config import load_config
from loraplex.trainer.dataset import prepare_data, sha256_file
from loraplex.trainer.formats import read_rows
from loraplex.trainer.sources import data_sources

from .conftest import qa, qa_rows

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

HERMES = builtin_template("hermes")  # renders tool definitions, calls and results
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


def _call(name: str, args: dict, cid: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def rows() -> list[dict]:
    """Plain rows, a system prompt, and tool rows whose nested structs differ row to row (in
    Arrow every message gets `tool_calls`/`tool_call_id` and each tool schema the properties of
    the other tool, as nulls, unless they are dropped)."""
    out = qa_rows(6) + [qa("Hi?", "Hello.", system="Be brief.")]
    out.append({"tools": [WEATHER, ADD], "messages": [
        {"role": "user", "content": "Weather in Rome, and 2 plus 3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            _call("get_weather", {"city": "Rome"}, "c1"), _call("add", {"a": 2, "b": 3}, "c2")]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"weather": "warm"}'},
        {"role": "tool", "tool_call_id": "c2", "content": "5"},
        {"role": "assistant", "content": "It is warm, and 2 plus 3 is 5."}]})
    out.append({"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            _call("get_weather", {"city": "Oslo"}, "call_0")]}]})
    return out


HELD = qa_rows(3, 20)  # the test split


def cfg_for(data: list, **over):
    return load_config(None, {"base": "unused", "data": [str(p) for p in data],
                              "output": "unused", **over})


def tokens(data) -> list:
    return [(ex.input_ids, ex.labels, ex.messages, ex.tools) for ex in data]


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HF_HOME, and a network that refuses (and records) every connection."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        if isinstance(address, tuple):  # AF_INET/AF_INET6; unix sockets are local
            attempts.append(address)
            raise OSError("network disabled in this test")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield home
    assert attempts == [], f"tried to reach the network: {attempts}"


def write_parquet(path: Path, data: list[dict], row_group_size: int | None = None) -> Path:
    """The schema inferred from every row (Table.from_pylist looks at the first row's keys only
    and would drop the `tools` column)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_batches([pa.RecordBatch.from_struct_array(pa.array(data))])
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def to_dataset(data: list[dict]):
    """A datasets.Dataset of every row's columns (Dataset.from_list takes the first row's keys
    as the columns, which would drop `tools`)."""
    keys = list(dict.fromkeys(k for r in data for k in r))
    return datasets.Dataset.from_dict({k: [r.get(k) for r in data] for k in keys})


def prepare_hub_cache(home: Path, repo: str, splits: dict[str, list[dict]], tmp: Path) -> Path:
    """The Arrow cache `datasets.load_dataset(repo)` leaves after a download: for a hub repo of
    Parquet files, `HubDatasetModuleFactory` hands the Parquet builder a `default` config with
    the repo's data files, `repo_id` and the commit, and the builder writes
    `<HF_HOME>/datasets/<owner>___<name>/default/0.0.0/<commit>/<name>-<split>.arrow` and
    `dataset_info.json`. The same builder is run here on local copies of the files: only the
    download is skipped (repo_id is set after construction, because the builder checks that its
    data files are hf:// URLs of the repo)."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

    files = {s: [str(write_parquet(tmp / repo / f"{s}.parquet", r))] for s, r in splits.items()}
    data_files = DataFilesDict.from_patterns(files)

    class HubParquet(Parquet):
        BUILDER_CONFIGS = [ParquetConfig(name="default", data_files=data_files)]

    builder = HubParquet(cache_dir=str(home / "datasets"), dataset_name=repo.split("/")[1],
                         config_name="default", hash="0123456789abcdef0123456789abcdef01234567")
    builder.repo_id = repo
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    return Path(builder._cache_dir)


def hub_snapshot(home: Path, repo: str, splits: dict[str, list[dict]]) -> Path:
    """What `hf download --repo-type dataset REPO` leaves in the hub cache: refs/main naming a
    commit, and the repo's files under snapshots/<commit>/ (data/<split>-*.parquet, the layout
    `push_to_hub` writes and `datasets` reads splits from)."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    root = home / "hub" / f"datasets--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    for split, data in splits.items():
        write_parquet(snap / "data" / f"{split}-00000-of-00001.parquet", data)
    return snap


def test_every_source_gives_token_identical_examples(tmp_path, write_jsonl, toy_tok, hf_home,
                                                     monkeypatch):
    monkeypatch.setattr(sources, "ARROW_BATCH", 4)  # several record batches per source
    data = rows()
    jsonl = write_jsonl("d.jsonl", data)
    parquet = write_parquet(tmp_path / "d.parquet", data, row_group_size=3)
    one = tmp_path / "one"
    to_dataset(data).save_to_disk(str(one))
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": to_dataset(data),
                          "test": to_dataset(HELD)}).save_to_disk(str(dd))
    shards = tmp_path / "shards"  # a directory mixing JSON lines and Parquet shards
    write_jsonl("shards/a.jsonl", data[:5])
    write_parquet(shards / "b.parquet", data[5:])
    prepare_hub_cache(hf_home, "someone/tiny_chat", {"train": data, "test": HELD}, tmp_path)
    hub_snapshot(hf_home, "someone/raw_chat", {"train": data, "test": HELD})

    ref = prepare_data(cfg_for([jsonl]), toy_tok, HERMES)
    assert ref.report.train == len(data) and not ref.report.rejected
    assert any(ex.tools for ex in ref.train)
    specs = {"parquet": parquet, "disk": one, "dict": dd, "shards": shards,
             "hub": "hf:someone/tiny_chat", "hub_raw": "hf:someone/raw_chat"}
    for name, spec in specs.items():
        got = prepare_data(cfg_for([spec]), toy_tok, HERMES)
        assert not got.report.rejected, (name, got.report.rejected)
        assert tokens(got.train) == tokens(ref.train), name
        assert got.report.data_sha256 == ref.report.data_sha256, name
    # Provenance: JSON rows are file:line, Arrow rows name[index] (0-based).
    got = prepare_data(cfg_for([dd]), toy_tok, HERMES)
    assert [ex.source for ex in got.train][:2] == [f"{dd}[train][0]", f"{dd}[train][1]"]
    got = prepare_data(cfg_for([parquet]), toy_tok, HERMES)
    assert got.train[-1].source == f"{parquet}[{len(data) - 1}]"
    offline = datasets.config.HF_HUB_OFFLINE
    got = prepare_data(cfg_for(["hf:someone/tiny_chat"]), toy_tok, HERMES)
    assert got.train[0].source == "hf:someone/tiny_chat[train][0]"
    assert datasets.config.HF_HUB_OFFLINE == offline  # switched for the read, then restored
    # Held-out data from the same kinds of sources: --eval-split (default test).
    for spec in (dd, "hf:someone/tiny_chat", "hf:someone/raw_chat"):
        got = prepare_data(cfg_for([spec], eval_data=[str(spec)]), toy_tok, HERMES)
        assert (got.report.train, got.report.eval) == (len(data), len(HELD))
        assert got.report.eval_files == [f"{spec}[test]"]


def test_arrow_rows_read_back_as_the_json_they_were_written_from(tmp_path):
    data = rows()
    f = write_parquet(tmp_path / "d.parquet", data)
    raw = pq.read_table(f).to_pylist()
    assert raw[0]["messages"][0]["tool_calls"] is None  # what Arrow gives for absent fields
    assert raw[7]["tools"][0]["function"]["parameters"]["properties"]["a"] is None
    assert list(sources.iter_parquet(f)) == [_without_nulls(r) for r in data]
    pq_rows, rejected = read_rows([f])
    assert not rejected and [r.tools for r in pq_rows][7:] == [[WEATHER, ADD], [WEATHER]]
    assert "tool_calls" not in pq_rows[0].messages[1]


def _without_nulls(obj):
    if isinstance(obj, dict):
        return {k: _without_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_without_nulls(v) for v in obj]
    return obj


def test_bad_parquet_row_is_reported_with_file_and_row_index(tmp_path, toy_tok, monkeypatch):
    monkeypatch.setattr(sources, "ARROW_BATCH", 3)  # the bad row is in the second batch
    data = qa_rows(6)
    data[4] = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]}
    data.append({"instruction": "Name a fruit.", "output": ""})  # mixed formats in one file
    f = write_parquet(tmp_path / "bad.parquet", data)
    out = prepare_data(cfg_for([f]), toy_tok, HERMES)
    got = {r.source: r.code for r in out.report.rejected}
    assert got == {f"{f}[4]": "unknown_role", f"{f}[6]": "empty_output"}
    assert out.report.train == 5 and out.report.rows == 7
    summary = "\n".join(out.report.summary())
    assert f"{f}[4]: unknown role 'robot' in messages[1].role" in summary
    with pytest.raises(BadRequest, match=re.escape(f"{f}[4]: unknown role")):
        prepare_data(cfg_for([f], strict=True), toy_tok, HERMES)
    d = tmp_path / "ds"
    to_dataset(data).save_to_disk(str(d))
    out = prepare_data(cfg_for([d]), toy_tok, HERMES)
    assert {r.source: r.code for r in out.report.rejected} == {
        f"{d}[4]": "unknown_role", f"{d}[6]": "empty_output"}
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(BadRequest, match="cannot read the Parquet file"):
        read_rows([tmp_path / "junk.parquet"])


def test_split_errors_list_the_splits(tmp_path, toy_tok, hf_home):
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": to_dataset(qa_rows(3)),
                          "test": to_dataset(HELD)}).save_to_disk(str(dd))
    with pytest.raises(BadRequest, match=r"without a 'validation' split; its splits: train, test; "
                       r"pick one with --split") as exc:
        prepare_data(cfg_for([dd], split="validation"), toy_tok, HERMES)
    assert exc.value.param == "split"
    with pytest.raises(BadRequest, match=r"without a 'dev' split; its splits: train, test; pick "
                       r"one with --eval-split"):
        prepare_data(cfg_for([dd], eval_data=[str(dd)], eval_split="dev"), toy_tok, HERMES)
    got = prepare_data(cfg_for([dd], split="test"), toy_tok, HERMES)
    assert got.report.files == [f"{dd}[test]"] and got.report.train == len(HELD)
    prepare_hub_cache(hf_home, "someone/tiny_chat", {"train": qa_rows(3), "test": HELD}, tmp_path)
    with pytest.raises(BadRequest, match=r"no 'validation' split; its splits: train, test"):
        data_sources(["hf:someone/tiny_chat"], "validation")


def test_hub_ids_are_read_offline_or_explained(tmp_path, hf_home, monkeypatch):
    with pytest.raises(BadRequest) as exc:
        data_sources(["hf:someone/missing"])
    msg = exc.value.message
    assert "someone/missing is not in the local Hugging Face cache" in msg
    assert "never downloads" in msg and "datasets.load_dataset('someone/missing')" in msg
    assert "hf download --repo-type dataset someone/missing" in msg
    for bad in ("hf:someone/x@main", "hf:a/b/c", "hf:someone/x:"):
        with pytest.raises(BadRequest, match="hf:OWNER/NAME"):
            data_sources([bad])
    with pytest.raises(BadRequest, match="write hf:someone/missing"):
        data_sources(["someone/missing"])  # not a path: the hint names the hub form
    with pytest.raises(BadRequest, match="does not exist$"):
        data_sources(["data/missing.jsonl"])
    # A config name after the id selects the cached configuration.
    prepare_hub_cache(hf_home, "someone/tiny_chat", {"train": qa_rows(2)}, tmp_path)
    (src,) = data_sources(["hf:someone/tiny_chat:default"])
    assert src.label == "hf:someone/tiny_chat:default[train]" and len(src.dataset) == 2
    with pytest.raises(BadRequest, match=r"not in the local Hugging Face cache.*'nope'"):
        data_sources(["hf:someone/tiny_chat:nope"])
    # A path that exists is a path, even when it is spelled like a hub id.
    local = tmp_path / "hf:someone" / "missing"
    local.mkdir(parents=True)
    (local / "a.jsonl").write_text(json.dumps(qa("q", "a")) + "\n")
    monkeypatch.chdir(tmp_path)
    (src,) = data_sources(["hf:someone/missing"])
    assert src.kind == "file" and src.path == Path("hf:someone/missing/a.jsonl")


def test_sources_are_hashed_deterministically(tmp_path, toy_tok, hf_home, write_jsonl):
    data = qa_rows(4)
    f = write_jsonl("d.jsonl", data)
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": to_dataset(data)}).save_to_disk(str(dd))
    cached = prepare_hub_cache(hf_home, "someone/tiny_chat", {"train": data}, tmp_path)
    cfg = cfg_for([f, dd, "hf:someone/tiny_chat"], dedup="none")
    a = prepare_data(cfg, toy_tok, HERMES).report
    assert a.files_sha256[str(f)] == sha256_file(f)
    split_dir = dd / "train"
    listing = "".join(f"{sha256_file(split_dir / n)}  {n}\n"
                      for n in sorted(p.name for p in split_dir.iterdir()))
    assert a.files_sha256[f"{dd}[train]"] == hashlib.sha256(listing.encode()).hexdigest()
    arrow = cached / "tiny_chat-train.arrow"
    assert a.files_sha256["hf:someone/tiny_chat[train]"] == hashlib.sha256(
        f"{sha256_file(arrow)}  {arrow.name}\n".encode()).hexdigest()
    b = prepare_data(cfg, toy_tok, HERMES).report
    assert a.files_sha256 == b.files_sha256 and a.data_sha256 == b.data_sha256
    assert set(a.to_dict()["files_sha256"]) == set(a.files) == {
        str(f), f"{dd}[train]", "hf:someone/tiny_chat[train]"}


def test_config_split_options_and_lazy_imports(tmp_path):
    cfg = cfg_for(["x.jsonl"])
    assert (cfg.split, cfg.eval_split) == ("train", "test")
    hp = cfg.hyperparameters()
    assert "split" not in hp and "eval_split" not in hp  # data selection: in the data report
    y = tmp_path / "c.yaml"
    y.write_text("base: b\ndata: hf:someone/x\noutput: o\nsplit: validation\neval-split: dev\n")
    cfg = load_config(y)
    assert (cfg.data, cfg.split, cfg.eval_split) == (["hf:someone/x"], "validation", "dev")
    # Reading JSON lines imports neither pyarrow nor datasets.
    code = ("import sys; from loraplex.trainer.dataset import prepare_data; "
            "from loraplex.trainer.formats import read_rows; "
            f"rows, _ = read_rows([{str(tmp_path / 'd.jsonl')!r}]); assert len(rows) == 1; "
            "print(sorted(m for m in ('pyarrow', 'datasets') if m in sys.modules))")
    (tmp_path / "d.jsonl").write_text(json.dumps(qa("q", "a")) + "\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
