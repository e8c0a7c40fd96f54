"""Base models from where users keep them: a local directory or a Hugging Face hub id.

    resolve_model("./toy")                                   # a directory with config.json
    resolve_model("meta-llama/Llama-3.1-8B-Instruct")        # the hub cache's snapshot of main
    resolve_model("meta-llama/Llama-3.1-8B-Instruct@0e9e39f")  # a branch, tag or commit

A hub id is resolved through `huggingface_hub.snapshot_download` against the local cache
(`HF_HUB_CACHE`, else `$HF_HOME/hub`, read when called): offline (`HF_HUB_OFFLINE=1`) only the
cache is used; online, missing files are downloaded. Every caller (the server's `--model`, the
trainer's `--base`, `loraplex adapters base add`) gets the snapshot directory, so the base
fingerprint is that of the resolved snapshot.

huggingface_hub is imported inside the function: `loraplex.adapters` stays light at import time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loraplex.adapters.errors import ConfigError

# Files a download skips: loraplex reads safetensors weights only, and hub repos often carry
# the same weights again in other formats (e.g. Llama's original/*.pth): 16 GB more for an 8B.
_SKIP = ["original/*", "*.pth", "*.pt", "*.bin", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ckpt"]
# org/name (or a legacy bare name), then an optional @revision (branch, tag or commit hash).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?:@(?P<rev>[\w./-]+))?$")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE), read from the environment now."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    return False


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) of `org/name[@rev]`, or None when `spec` is not shaped like one."""
    m = _HUB_ID.match(spec.strip())
    if not m or ".." in m["repo"] or m["repo"].endswith((".", "-")):
        return None
    return m["repo"], m["rev"]


def _looks_like_path(spec: str) -> bool:
    name = spec.split("@", 1)[0]  # a revision may hold slashes (refs/pr/1)
    return name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1


def resolve_model(spec: str | Path, revision: str | None = None) -> Path:
    """The local directory of a model given as a directory or a hub id `org/name[@revision]`.

    `revision` (a branch, tag or commit) is the same as `@revision` in a hub id. Raises
    ConfigError naming the value and the fix when `spec` is neither a model directory nor a hub
    id in the cache (or, online, on the hub).
    """
    text = str(spec).strip()
    if not text:
        raise ConfigError("empty model: pass a model directory or a hub id such as org/name")
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model {text!r}: the directory has no config.json; pass a Hugging "
                              "Face format model directory or a hub id such as org/name")
        if revision:
            raise ConfigError(f"revision {revision!r} given for the local directory {text!r}; a "
                              "revision selects a hub snapshot: drop it or pass a hub id")
        return local.resolve()
    if _looks_like_path(text):
        raise ConfigError(f"model directory {text!r} does not exist")
    parsed = parse_hub_id(text)
    if parsed is None:
        raise ConfigError(f"model {text!r} is not a local directory and not a hub id; pass a model "
                          "directory or org/name[@revision]")
    repo_id, at = parsed
    if revision and at and revision != at:
        raise ConfigError(f"model {text!r} names revision {at!r} but revision {revision!r} is also "
                          "given; give one")
    return _snapshot(text, repo_id, at or revision or None)


def _snapshot(text: str, repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise ConfigError(f"model {text!r} is not a local directory, and huggingface_hub is not "
                          "installed to resolve it as a hub id (pip install huggingface_hub)") from None
    offline = hub_offline()
    cache = hub_cache_dir()
    rev_text = f" at revision {revision!r}" if revision else ""
    # `hf` is huggingface_hub's CLI (`huggingface-cli` before 1.0).
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                 local_files_only=offline, ignore_patterns=_SKIP)
    except hf_errors.LocalEntryNotFoundError:
        if offline:
            fix = f"run `{download}` on a machine online (with HF_HOME={cache.parent}) or unset HF_HUB_OFFLINE"
        else:
            fix = f"check the network, or run `{download}`"
        raise ConfigError(f"model {text!r}: not a local directory, and {repo_id}{rev_text} is not in "
                          f"the hub cache at {cache}; {fix}", param="model") from None
    except hf_errors.RevisionNotFoundError:
        raise ConfigError(f"model {text!r}: the hub repository {repo_id} has no revision {revision!r}",
                          param="model") from None
    except hf_errors.GatedRepoError:
        raise ConfigError(f"model {text!r}: the hub repository {repo_id} is gated; accept its terms on "
                          "huggingface.co and set HF_TOKEN (or run `huggingface-cli login`)",
                          param="model") from None
    except hf_errors.RepositoryNotFoundError:
        raise ConfigError(f"model {text!r}: not a local directory, and no hub repository {repo_id} "
                          "(or it is private: set HF_TOKEN)", param="model") from None
    except hf_errors.HFValidationError as exc:
        raise ConfigError(f"model {text!r}: not a local directory and not a valid hub id ({exc})",
                          param="model") from None
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        raise ConfigError(f"model {text!r}: cannot fetch {repo_id}{rev_text} from the hub ({exc}); "
                          f"run `{download}` or use a local directory", param="model") from None
    snap = Path(path)
    if not (snap / "config.json").is_file():
        raise ConfigError(f"model {text!r}: the hub snapshot {snap} has no config.json; is {repo_id} "
                          "a Hugging Face format model?", param="model")
    return snap
