"""Where training rows come from: files, directories of shards, Parquet, `datasets`.

Sources (`data_sources`): `.jsonl` (one object per line, streamed) or `.json` (one array of
objects, or JSONL in disguise) files, `.parquet` files (read one record batch at a time), a
directory of such shards, a `datasets` `save_to_disk` directory (a Dataset, or a DatasetDict and
a split), and `hf:OWNER/NAME[:CONFIG]`, a hub dataset from the local Hugging Face cache (never
downloaded). Arrow rows (Parquet, `datasets`) come back as plain dicts and lists with null
fields dropped: Arrow gives every struct every field of its column's type, so a user message
would otherwise carry `tool_calls: None` and a tool schema the properties of every other row.
A row's provenance is `file:line` for JSON, `name[index]` (0-based) for Arrow rows.
pyarrow and datasets are imported only when such a source is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import BadRequest

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_PREFIX = "hf:"  # hf:OWNER/NAME[:CONFIG], a hub dataset in the local cache
ARROW_BATCH = 1024  # rows converted to Python objects at a time


# -- files ---------------------------------------------------------------------------------------

def data_files(specs: list[str | Path]) -> list[Path]:
    """Expand files and directories of shards (*.jsonl, *.json, *.parquet, sorted) into a file
    list. `data_sources` also reads `datasets` directories and hub datasets."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            if saved_dataset_kind(p):
                raise BadRequest(f"data directory {str(p)!r} is a `datasets` save_to_disk "
                                 "directory, not a directory of shards: read it with "
                                 "data_sources", param="data")
            shards = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
            if not shards:
                raise BadRequest(f"data directory {str(p)!r} holds no *.jsonl, *.json or "
                                 "*.parquet files (nor is it a `datasets` save_to_disk "
                                 "directory)", param="data")
            files += shards
        elif p.is_file():
            files.append(p)
        else:
            raise BadRequest(f"data path {str(p)!r} does not exist", param="data")
    return files


@dataclass
class DataSource:
    """One place rows come from: a file (`kind` "file": JSON lines, a JSON array or Parquet),
    a `datasets` save_to_disk directory ("disk": `path` is the Dataset's directory, a split's
    for a DatasetDict) or a hub dataset from the local cache ("hub": `dataset` is the opened
    split, memory-mapped). `label` names it in the report; its rows are `label:line` (JSON) or
    `label[index]` (0-based, Arrow)."""

    kind: str
    label: str
    path: Path | None = None
    dataset: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def file(cls, path: Path) -> DataSource:
        return cls("file", str(path), path)

    def iter_rows(self) -> Iterator[tuple[str, Any, str | None]]:
        """(row source, object, None) per row, or (row source, None, error) for a bad line."""
        if self.kind == "file":
            assert self.path is not None
            if self.path.suffix == ".parquet":
                for i, obj in enumerate(iter_parquet(self.path)):
                    yield f"{self.label}[{i}]", obj, None
            else:
                for line, obj, error in iter_objects(self.path):
                    yield f"{self.label}:{line}", obj, error
            return
        ds = self.dataset if self.dataset is not None else _load_from_disk(self.path)
        for i, obj in enumerate(_arrow_rows(ds.with_format("arrow").iter(batch_size=ARROW_BATCH))):
            yield f"{self.label}[{i}]", obj, None

    def files(self) -> list[tuple[str, Path]]:
        """(name, path) of the files holding its rows, sorted: what the report hashes. A
        directory's files are named relative to it; a hub dataset's by its cached Arrow files."""
        if self.kind == "file":
            assert self.path is not None
            return [(self.path.name, self.path)]
        if self.kind == "disk":
            assert self.path is not None
            return sorted((f.relative_to(self.path).as_posix(), f)
                          for f in self.path.rglob("*") if f.is_file())
        paths = sorted(Path(c["filename"]) for c in self.dataset.cache_files)
        return [(f.name, f) for f in paths]


def data_sources(specs: Sequence[str | Path], split: str = "train",
                 split_option: str = "--split") -> list[DataSource]:
    """Every source the specs name: files, directories of shards, `datasets` save_to_disk
    directories (`split` picks a DatasetDict's split) and `hf:OWNER/NAME[:CONFIG]` hub datasets
    from the local cache. A path that exists is a path. `split_option` is the option the errors
    tell the user to change."""
    out: list[DataSource] = []
    for spec in specs:
        text = str(spec)
        p = Path(text).expanduser()
        if p.is_dir() and saved_dataset_kind(p):
            out.append(_disk_source(p, split, split_option))
        elif p.exists():
            out += [DataSource.file(f) for f in data_files([p])]
        elif text.startswith(HUB_PREFIX):
            out.append(_hub_source(text, split, split_option))
        else:
            from loraplex.adapters.models import parse_hub_id

            hub_like = ("/" in text and p.suffix not in DATA_SUFFIXES
                        and not text.startswith((".", "/", "~")) and parse_hub_id(text))
            hint = (f"; for the hub dataset {text} in the local Hugging Face cache write "
                    f"{HUB_PREFIX}{text}" if hub_like else "")
            raise BadRequest(f"data path {str(p)!r} does not exist{hint}", param="data")
    return out


def saved_dataset_kind(p: Path) -> str | None:
    """"dict" for a DatasetDict.save_to_disk directory, "dataset" for a Dataset's, else None."""
    if (p / "dataset_dict.json").is_file():
        return "dict"
    if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
        return "dataset"
    return None


def _disk_source(p: Path, split: str, option: str) -> DataSource:
    if saved_dataset_kind(p) == "dataset":  # one Dataset: no splits to pick from
        return DataSource("disk", str(p), p)
    try:
        splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        splits = [str(x) for x in splits]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise BadRequest(f"cannot read {str(p / 'dataset_dict.json')!r} (a `datasets` "
                         f"DatasetDict directory): {exc}", param="data") from None
    if split not in splits:
        raise BadRequest(f"{str(p)!r} is a `datasets` DatasetDict without a {split!r} split; its "
                         f"splits: {', '.join(splits) or 'none'}; pick one with {option}",
                         param=option.removeprefix("--").replace("-", "_"))
    return DataSource("disk", f"{p}[{split}]", p / split)


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise BadRequest("reading a `datasets` directory or a hub dataset needs the datasets "
                         "package: pip install datasets", param="data") from None
    return datasets


def _load_from_disk(path: Path | None) -> Any:
    datasets = _import_datasets()
    try:
        return datasets.load_from_disk(str(path), keep_in_memory=False)  # memory-mapped Arrow
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read the `datasets` directory {str(path)!r}: {exc}",
                         param="data") from None


def _hf_home() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return Path(home).expanduser()


def datasets_cache_dir() -> Path:
    """The cache `datasets.load_dataset` prepares hub datasets in: HF_DATASETS_CACHE, else
    $HF_HOME/datasets (read when called, not when `datasets` was imported)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    return _hf_home() / "datasets"


@contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """`datasets` and huggingface_hub in offline mode (and quiet) for the block: the flags are
    read from the environment at import, so the module settings are switched and restored."""
    import huggingface_hub.constants as hub_constants

    cfg = datasets.config
    saved = (cfg.HF_HUB_OFFLINE, cfg.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE,
             datasets.logging.get_verbosity())
    cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        (cfg.HF_HUB_OFFLINE, cfg.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE) = saved[:3]
        datasets.logging.set_verbosity(saved[3])


def _hub_source(text: str, split: str, option: str) -> DataSource:
    from loraplex.adapters.models import parse_hub_id

    repo, sep, config = text[len(HUB_PREFIX):].partition(":")
    parsed = parse_hub_id(repo)
    if parsed is None or parsed[1] is not None or (sep and not config):
        raise BadRequest(f"data {text!r}: a hub dataset is written hf:OWNER/NAME or "
                         "hf:OWNER/NAME:CONFIG (no @revision: the local cache is read as it is)",
                         param="data")
    dd = _open_hub(text, repo, config or None)
    if split not in dd:
        raise BadRequest(f"{text}: the cached dataset has no {split!r} split; its splits: "
                         f"{', '.join(dd) or 'none'}; pick one with {option}",
                         param=option.removeprefix("--").replace("-", "_"))
    return DataSource("hub", f"{text}[{split}]", None, dd[split])


def _open_hub(text: str, repo: str, config: str | None) -> Any:
    """Every split of a hub dataset, from the local cache only: the Arrow files a past
    `load_dataset(repo)` prepared, else the repository files a download left in the hub cache
    (`hf download --repo-type dataset`, `snapshot_download`), prepared now."""
    from loraplex.adapters.models import hub_cache_dir

    datasets = _import_datasets()
    cache = datasets_cache_dir()
    with _offline(datasets):
        try:
            # hf://datasets/ keeps a local directory named like the repo from being read instead
            return datasets.load_dataset(f"hf://datasets/{repo}", name=config,
                                         cache_dir=str(cache))
        except Exception as exc:  # datasets raises ConnectionError, ValueError, FileNotFound...
            prepared = f"{type(exc).__name__}: {exc}".splitlines()
        snapshot = _hub_snapshot(repo, hub_cache_dir())
        if snapshot is not None:
            try:
                return datasets.load_dataset(str(snapshot), name=config, cache_dir=str(cache))
            except Exception as exc:
                raise BadRequest(f"data {text!r}: the hub cache holds {repo} ({snapshot}), but "
                                 f"datasets cannot read it: {type(exc).__name__}: {exc}",
                                 param="data") from None
    args = f"'{repo}'" + (f", '{config}'" if config else "")
    raise BadRequest(f"data {text!r}: {repo} is not in the local Hugging Face cache (datasets "
                     f"cache {cache}, hub cache {hub_cache_dir()}; datasets said: "
                     f"{' '.join(prepared)}). loraplex reads data offline and never downloads "
                     "it: on a machine online, with the same HF_HOME, run `python -c \"import "
                     f"datasets; datasets.load_dataset({args})\"` (or `hf download --repo-type "
                     f"dataset {repo}`), or save it with save_to_disk and pass the directory",
                     param="data")


def _hub_snapshot(repo: str, cache: Path) -> Path | None:
    """The cached snapshot of the dataset repo's main revision, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, repo_type="dataset", cache_dir=str(cache),
                                      local_files_only=True))
    except (ImportError, OSError, ValueError):  # LocalEntryNotFoundError is an OSError
        return None


def iter_parquet(path: Path) -> Iterator[Any]:
    """The rows of a Parquet file as plain objects, one record batch in memory at a time."""
    try:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException
    except ImportError:
        raise BadRequest(f"reading {str(path)!r} needs pyarrow: pip install pyarrow",
                         param="data") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=ARROW_BATCH)
        yield from _arrow_rows(batches)
    except (OSError, ArrowException) as exc:
        raise BadRequest(f"cannot read the Parquet file {str(path)!r}: {exc}",
                         param="data") from None


def _arrow_rows(batches: Any) -> Iterator[Any]:
    for batch in batches:
        for obj in batch.to_pylist():
            yield _drop_nulls(obj)


def _drop_nulls(value: Any) -> Any:
    """Arrow stores an absent struct field as null: drop null fields (at every depth), so an
    Arrow row reads as the JSON object it was written from (an explicit JSON null is lost too;
    nowhere in a row does it mean more than absence, except a `null` in a tool schema)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read data file {str(path)!r}: {exc}", param="data") from None


def iter_objects(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, object, None) per row, or (line, None, error) for a line that is not JSON. A
    `.json` file is read whole (it may be one array); JSON lines are streamed."""
    if path.suffix == ".json":
        text = _read_text(path)
        if text.lstrip().startswith("["):
            yield from _iter_array(path, text)
            return
        lines: Iterator[tuple[int, str]] = enumerate(text.splitlines(), start=1)
    else:
        lines = _iter_lines(path)
    for n, line in lines:
        if not line.strip():
            continue
        try:
            yield n, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield n, None, f"bad JSON: {exc.msg} (column {exc.colno})"


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, start=1)
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read data file {str(path)!r}: {exc}", param="data") from None


def _iter_array(path: Path, text: str) -> Iterator[tuple[int, Any, str | None]]:
    """Items of a top-level JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)

    def skip(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # A broken array cannot be re-synchronised: the rest of the file is unreadable.
            raise BadRequest(f"{path}:{exc.lineno}: bad JSON: {exc.msg} (column {exc.colno}); "
                             "a .json file is one array, so nothing after this point can be "
                             "read: fix it (or use JSONL, where one bad line drops one row)",
                             param="data") from None
        yield line, obj, None
        pos = skip(pos)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            return
        raise BadRequest(f"{path}:{text.count(chr(10), 0, pos) + 1}: bad JSON: expected ',' or "
                         "']' between array items", param="data")
