"""Admin routes (admin key): register, load, unload, pin, unpin, move an alias.

Registration goes through the shared registry (validation, immutable artifacts, a new
revision), so every replica sees it at its next poll, not only this one.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request

from loraplex.adapters.errors import BadRequest
from loraplex.adapters.validate import safe_relpath

MAX_UPLOAD = 2 << 30


def _extract(data: bytes, dest: Path) -> Path:
    """Unpack a .tar(.gz) or .zip of a PEFT directory, refusing links and paths outside dest."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                if not safe_relpath(info.filename.rstrip("/")):
                    raise BadRequest(f"archive member {info.filename!r} escapes the archive",
                                     param="file")
            z.extractall(dest)
    else:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
                for m in t.getmembers():
                    if not (m.isfile() or m.isdir()) or not safe_relpath(m.name.rstrip("/")):
                        raise BadRequest(f"archive member {m.name!r} is a link or escapes the "
                                         "archive: send plain files", param="file")
                t.extractall(dest, filter="data")
        except tarfile.TarError as exc:
            raise BadRequest(f"the upload is neither a zip nor a tar archive ({exc})",
                             param="file") from None
    # Accept an archive of the directory itself or of its contents.
    found = [p.parent for p in dest.rglob("adapter_config.json")]
    if len(found) != 1:
        raise BadRequest("the archive must hold exactly one adapter_config.json "
                         f"(found {len(found)})", param="file")
    return found[0]


def build_admin_router(state, require_admin) -> APIRouter:
    r = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
    reg = lambda: state.manager.registry  # noqa: E731

    @r.post("/adapters")
    async def register(request: Request, name: str, alias: str | None = None,
                       uri: str | None = None, description: str = ""):
        """Register from `uri` (a registry-readable fsspec directory) or an uploaded archive
        (the raw request body: .tar.gz or .zip of a PEFT LoRA directory)."""
        tmp = Path(tempfile.mkdtemp(prefix="loraplex-upload-"))
        try:
            if uri:
                import fsspec

                src = tmp / "adapter"
                fs, path = fsspec.core.url_to_fs(uri, **state.settings.storage_options())
                await asyncio.to_thread(fs.get, path.rstrip("/") + "/", str(src), recursive=True)
            else:
                data = await request.body()
                if not data:
                    raise BadRequest("send a uri=... query parameter or an archive as the body",
                                     param="uri")
                if len(data) > MAX_UPLOAD:
                    raise BadRequest(f"upload over {MAX_UPLOAD} bytes", param="file")
                src = _extract(data, tmp / "x")
            result = await asyncio.to_thread(
                reg().push, src, name, alias=alias, base=state.settings.base,
                description=description)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
