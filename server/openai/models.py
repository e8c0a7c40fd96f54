"""/v1/models and /v1/models/{id}: the base, then per adapter name the name, each version and
each alias as a model id (all of them accepted as `model` in requests)."""

from __future__ import annotations

import time

from loraplex.adapters.records import not_found_name
from loraplex.adapters.refs import ref_name


def list_models(settings, manager) -> list[dict]:
    snap = manager.snapshot
    base_fp = manager.base.fingerprint
    now = int(time.time())
    data: list[dict] = [{"id": settings.served_model_name, "object": "model", "created": now,
                         "owned_by": "loraplex", "root": str(settings.model), "parent": None}]
    names = sorted({v.name for v in snap.versions
                    if v.state == "active" and v.base_fingerprint == base_fp})
    for name in names:
        versions = [v for v in snap.versions if v.name == name and v.state == "active"]
        aliases = {a.alias: a.target for a in snap.aliases if a.name == name}
        try:
            default = snap.resolve(name)
        except Exception:
            continue
        common = {"object": "model", "owned_by": "loraplex", "parent": settings.served_model_name}
        data.append({"id": name, **common, "created": int(default.created_at.timestamp()),
                     "root": default.ref, "versions": [v.version for v in versions],
                     "aliases": aliases, "chat_template_sha256": default.chat_template_sha256,
                     "tool_format": default.tool_format})
        for v in versions:
            data.append({"id": v.ref, **common, "created": int(v.created_at.timestamp()),
                         "root": v.ref, "chat_template_sha256": v.chat_template_sha256,
                         "tool_format": v.tool_format})
        for alias, target in aliases.items():
            data.append({"id": f"{name}:{alias}", **common, "created": now,
                         "root": f"{name}:{alias}", "target": target})
    return data


def get_model(settings, manager, model_id: str) -> dict:
    """One entry of the list; an id that does not resolve is the same 404 a request gets."""
    for m in list_models(settings, manager):
        if m["id"] == model_id:
            return m
    manager.snapshot.resolve(model_id)  # raises its own 404: unknown version, alias...
    raise not_found_name(ref_name(model_id))  # resolves, but not on this server's base
