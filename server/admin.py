"""Admin routes (admin key): register, load, unload, pin, unpin, move an alias.

Registration goes through the shared registry (validation, immutable artifacts, a new
revision), so every replica sees it at its next poll, not only this one.

An uploaded archive is streamed to a temp file (never held in memory), its size enforced as it
arrives (`max_upload_bytes`), then unpacked by `server/archives.py` (plain files and
directories only, within `MAX_ARCHIVE_MEMBERS` and `max_adapter_bytes`). Any refusal leaves
nothing: the temp directory goes, and nothing reaches the registry or the artifact store.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.requests import ClientDisconnect

from loraplex.adapters.adapter_format import check_tool_format
from loraplex.adapters.errors import BadRequest, PayloadTooLarge
from loraplex.adapters.refs import check_alias, check_name
from loraplex.server.archives import MAX_ARCHIVE_MEMBERS, extract
from loraplex.server.limits import content_length, too_large

_WRITE_CHUNK = 4 << 20  # upload bytes buffered before each write to the temp file


def _fetch_uri(uri: str, dest: Path, storage_options: dict[str, Any], max_members: int,
               max_bytes: int) -> Path:
    """Copy a registry-readable directory (fsspec URL) to `dest`, after checking its file count
    and total size against the same caps as an upload."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    except (ValueError, ImportError) as exc:  # unknown protocol, or its package not installed
        raise BadRequest(f"cannot open uri {uri!r} ({exc})", param="uri") from None
    path = path.rstrip("/")
    listing = fs.find(path, detail=True, maxdepth=None)
    if not listing:
        raise BadRequest(f"{uri!r} holds no files: point uri at an adapter directory the "
                         "server can read", param="uri")
    if len(listing) > max_members:
        raise BadRequest(f"{uri!r} holds over {max_members} files (found {len(listing)}): "
                         "point uri at the adapter directory", param="uri")
    total = sum(int(info.get("size") or 0) for info in listing.values())
    if total > max_bytes:
        raise PayloadTooLarge(f"{uri!r} holds {total} bytes, over the limit of {max_bytes} bytes "
                              "(max_adapter_bytes)", param="uri")
    fs.get(path + "/", str(dest), recursive=True)
    return dest


async def _receive_upload(request: Request, dest: Path, limit: int) -> int:
    """Stream the request body to `dest`, refusing it (413) once over `limit` bytes."""
    declared = content_length(request.headers.raw)
    if declared is not None and declared > limit:
        raise too_large(limit, "max_upload_bytes", declared, "upload")
    size = 0
    buf = bytearray()
    with dest.open("wb") as f:
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit, "max_upload_bytes", what="upload")
                buf += chunk
                if len(buf) >= _WRITE_CHUNK:
                    await asyncio.to_thread(f.write, buf)
                    buf = bytearray()
        except ClientDisconnect:
            raise BadRequest(f"upload interrupted: the client disconnected after {size} bytes",
                             param="file") from None
        if buf:
            await asyncio.to_thread(f.write, buf)
    return size


def build_admin_router(state, require_admin) -> APIRouter:
    r = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
    reg = lambda: state.manager.registry  # noqa: E731

    @r.post("/adapters")
    async def register(request: Request, name: str, alias: str | None = None,
                       uri: str | None = None, description: str = "",
                       tool_format: str | None = None):
        """Register from `uri` (a registry-readable fsspec directory) or an uploaded archive
        (the raw request body: .tar.gz or .zip of a PEFT LoRA directory)."""
        # Names first: a bad one is refused before a byte of a (large) upload is read.
        check_name(name)
        if alias is not None:
            check_alias(alias)
        check_tool_format(tool_format)
        settings = state.settings
        caps = {"max_members": MAX_ARCHIVE_MEMBERS, "max_bytes": settings.max_adapter_bytes}
        tmp = Path(tempfile.mkdtemp(prefix="loraplex-upload-"))
        handed_off = False
        try:
            if not uri:
                archive = tmp / "upload"
                if await _receive_upload(request, archive, settings.max_upload_bytes) == 0:
                    raise BadRequest("send a uri=... query parameter or an archive as the body",
                                     param="uri")

            def materialize_and_push():
                # One thread does the work and the cleanup, so a cancelled request cannot
                # remove the directory while files are still being written into it.
                try:
                    if uri:
                        src = _fetch_uri(uri, tmp / "adapter", settings.storage_options(), **caps)
                    else:
                        src = extract(tmp / "upload", tmp / "x", **caps)
                        (tmp / "upload").unlink()  # free the disk before the push copies
                    return reg().push(src, name, alias=alias, base=settings.base,
                                      description=description, tool_format=tool_format)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)

            handed_off = True
            result = await asyncio.to_thread(materialize_and_push)
        finally:
            if not handed_off:
                await asyncio.to_thread(shutil.rmtree, tmp, True)
        await state.manager.refresh()
        return {"version": result.version.model_dump(mode="json", exclude={"chat_template"}),
                "created": result.created, "message": result.message, "notes": result.notes}

    async def _version(ref: str):
        v = await state.manager.resolve(ref, None)
        if v is None:
            raise BadRequest(f"{ref!r} is the base model, not an adapter", param="ref")
        return v

    @r.post("/adapters/{ref}/load")
    async def load(ref: str):
        v = await _version(ref)
        await state.manager.ensure_loaded(v)
        return {"loaded": v.ref}

    @r.post("/adapters/{ref}/unload")
    async def unload(ref: str):
        v = await _version(ref)
        return {"unloaded": v.ref, "was_loaded": await state.manager.unload(v)}

    @r.post("/adapters/{ref}/pin")
    async def pin(ref: str):
        v = await _version(ref)
        await state.manager.pin(v)
        return {"pinned": v.ref}

    @r.post("/adapters/{ref}/unpin")
    async def unpin(ref: str):
        v = await _version(ref)
        await state.manager.unpin(v)
        return {"unpinned": v.ref}

    @r.put("/aliases/{name}/{alias}")
    async def set_alias(name: str, alias: str, target: str):
        """`target`: a version (`3`) or a weighted split (`3:90,4:10`)."""
        a = await asyncio.to_thread(reg().set_alias, name, alias, target)
        await state.manager.refresh()
        return a.model_dump(mode="json")

    @r.delete("/aliases/{name}/{alias}")
    async def remove_alias(name: str, alias: str):
        await asyncio.to_thread(reg().remove_alias, name, alias)
        await state.manager.refresh()
        return {"removed": f"{name}:{alias}"}

    return r
