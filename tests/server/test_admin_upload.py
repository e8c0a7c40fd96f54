"""Admin uploads over real HTTP (uvicorn on loopback, the fake engine, a real registry): a good
archive registers (tar.gz with Content-Length, zip streamed chunked); every hostile archive is
refused with 400/413 naming the member and the reason, and leaves nothing behind: no version,
no revision bump, no file in the artifact store, the temp dir or the adapter cache.

Each hostile archive is built here, in both zip and tar form where the format can express it.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from loraplex.adapters.errors import PayloadTooLarge
from loraplex.adapters.registry import Registry
from loraplex.server import archives
from loraplex.server.app import create_app
from loraplex.server.settings import ServerSettings
from tests.server.test_app_unit import FakeEngine
from tests.server.test_body_limit import live_server

ADMIN = {"Authorization": "Bearer adm"}
MAX_UPLOAD = 4 << 20
CONFIG = b'{"peft_type": "LORA"}'  # enough to pass the archive checks (never validated here)


@pytest.fixture(scope="module")
def adapter(toy_model_dir, lora_trainer, tmp_path_factory) -> Path:
    return lora_trainer(toy_model_dir, tmp_path_factory.mktemp("lora") / "a", "upper", steps=1)


@pytest.fixture(scope="module")
def live(tmp_path_factory, toy_model_dir, adapter):
    tmp = tmp_path_factory.mktemp("admin-upload")
    registry = Registry(f"sqlite:///{tmp / 'r.db'}", str(tmp / "art"))
    registry.register_base("toy", toy_model_dir)
    size = sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file())
    # Room for the real adapter, not for the bombs below.
    settings = ServerSettings(home=tmp / "home", model=toy_model_dir, served_model_name="toy",
                              admin_key="adm", max_upload_bytes=MAX_UPLOAD,
                              max_adapter_bytes=size + (256 << 10))
    with live_server(create_app(settings, FakeEngine(), registry=registry)) as url:
        yield url, registry, settings, tmp / "art"
    registry.close()


@pytest.fixture
def tmpdir_watch(tmp_path, monkeypatch) -> Path:
    """The process's temp dir, fresh and empty for this test (uploads are unpacked under it)."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def upload(url: str, name: str, content, **params) -> httpx.Response:
    return httpx.post(f"{url}/admin/adapters", params={"name": name, **params}, content=content,
                      headers=ADMIN, timeout=120)


# -- archive builders ------------------------------------------------------------------------------

def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.GNU_FORMAT) as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tinfo(name: str, type_: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def zip_of(members: list[tuple[str, bytes, int | None]]) -> bytes:
    """(name, data, unix mode or None) -> a deflated zip."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        warnings.simplefilter("ignore")  # "Duplicate name": some archives here mean it
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.create_system = 3
                info.external_attr = mode << 16
            z.writestr(info, data)
    return buf.getvalue()


def tar_ok(*extra: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    return tar_of([(tinfo("adapter/adapter_config.json"), CONFIG), *extra])


def zip_ok(*extra: tuple[str, bytes, int | None]) -> bytes:
    return zip_of([("adapter/adapter_config.json", CONFIG, None), *extra])


def zip_with_lying_size(data: bytes, claimed: int) -> bytes:
    """A zip whose headers claim `claimed` uncompressed bytes for 'adapter/zeros' (really more)."""
    raw = bytearray(zip_ok(("adapter/zeros", data, None)))
    name = b"adapter/zeros"
    local, central = raw.find(name) - 30, raw.rfind(name) - 46
    assert raw[local:local + 4] == b"PK\x03\x04" and raw[central:central + 4] == b"PK\x01\x02"
    struct.pack_into("<I", raw, local + 22, claimed)   # local header: uncompressed size
    struct.pack_into("<I", raw, central + 24, claimed)  # central directory: uncompressed size
    return bytes(raw)


def gnu_longname_bomb(size: int) -> bytes:
    """A tar.gz whose first header is a GNU long-name header with `size` bytes of name data."""
    import gzip

    hdr = bytearray(512)
    hdr[0:13] = b"././@LongLink"
    hdr[100:108] = b"0000644\x00"
    hdr[108:116] = hdr[116:124] = b"0000000\x00"
    hdr[124:136] = f"{size:011o}\x00".encode()
    hdr[136:148] = b"00000000000\x00"
    hdr[156:157] = b"L"
    hdr[257:265] = b"ustar  \x00"
    hdr[148:156] = b" " * 8
    hdr[148:156] = f"{sum(hdr):06o}\x00 ".encode()
    body = bytes(hdr) + b"a" * size + b"\0" * (-size % 512) + b"\0" * 1024
    return gzip.compress(body)


ZEROS = 3 << 20  # uncompressed; well over max_adapter_bytes, a few KB compressed

# id -> (archive bytes, expected status, fragments of the message)
HOSTILE: dict[str, tuple[Callable[[], bytes], int, list[str]]] = {
    "tar-symlink": (lambda: tar_ok((tinfo("adapter/evil", tarfile.SYMTYPE, linkname="/etc/passwd"), None)),
                    400, ["'adapter/evil'", "is a symbolic link (to '/etc/passwd')"]),
    "tar-symlink-dir": (lambda: tar_ok((tinfo("adapter/sub", tarfile.SYMTYPE, linkname="/"), None),
                                       (tinfo("adapter/sub/x.json"), b"{}")),
                        400, ["'adapter/sub'", "is a symbolic link"]),
    "tar-hardlink": (lambda: tar_ok((tinfo("adapter/evil", tarfile.LNKTYPE, linkname="/etc/passwd"), None)),
                     400, ["'adapter/evil'", "is a hard link (to '/etc/passwd')"]),
    "tar-absolute": (lambda: tar_ok((tinfo("/tmp/evil.json"), b"{}")),
                     400, ["'/tmp/evil.json'", "is an absolute path"]),
    "tar-dotdot": (lambda: tar_ok((tinfo("../escape.json"), b"{}")),
                   400, ["'../escape.json'", "'..' component", "escapes the archive"]),
    "tar-dotdot-inner": (lambda: tar_ok((tinfo("adapter/../../escape.json"), b"{}")),
                         400, ["'adapter/../../escape.json'", "'..' component"]),
    "tar-chardev": (lambda: tar_ok((tinfo("adapter/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)),
                    400, ["'adapter/null'", "is a device file"]),
    "tar-blockdev": (lambda: tar_ok((tinfo("adapter/sda", tarfile.BLKTYPE, devmajor=8), None)),
                     400, ["'adapter/sda'", "is a device file"]),
    "tar-fifo": (lambda: tar_ok((tinfo("adapter/pipe", tarfile.FIFOTYPE), None)),
                 400, ["'adapter/pipe'", "is a FIFO"]),
    "tar-duplicate": (lambda: tar_ok((tinfo("adapter/adapter_config.json"), b"{}")),
                      400, ["'adapter/adapter_config.json'", "appears twice"]),
    "tar-file-as-dir": (lambda: tar_ok((tinfo("adapter/w"), b"x"), (tinfo("adapter/w/x"), b"y")),
                        400, ["'adapter/w/x'", "inside 'adapter/w', which is a file"]),
    "tar-root-file": (lambda: tar_ok((tinfo("./"), b"x")),
                      400, ["'./'", "is a file named like the archive root"]),
    "tar-too-many": (lambda: tar_ok(*[(tinfo(f"adapter/f{i}"), b"") for i in range(1000)]),
                     400, ["'adapter/f999'", "past the limit of 1000 archive members"]),
    "tar-bomb": (lambda: tar_ok((tinfo("adapter/zeros"), b"\0" * ZEROS)),
                 413, ["'adapter/zeros'", "declared by the headers", "max_adapter_bytes"]),
    "tar-bomb-bz2": (lambda: tar_of([(tinfo("adapter/adapter_config.json"), CONFIG),
                                     (tinfo("adapter/zeros"), b"\0" * ZEROS)], "w:bz2"),
                     413, ["'adapter/zeros'", "max_adapter_bytes"]),
    "tar-metadata-bomb": (lambda: gnu_longname_bomb(4 << 20),
                          400, ["'././@LongLink'", "metadata header of 4194304 bytes"]),
    "zip-symlink": (lambda: zip_ok(("adapter/evil", b"/etc/passwd", stat.S_IFLNK | 0o777)),
                    400, ["'adapter/evil'", "is a symbolic link"]),
    "zip-absolute": (lambda: zip_ok(("/tmp/evil.json", b"{}", None)),
                     400, ["'/tmp/evil.json'", "is an absolute path"]),
    "zip-dotdot": (lambda: zip_ok(("../escape.json", b"{}", None)),
                   400, ["'../escape.json'", "escapes the archive"]),
    "zip-backslash-dotdot": (lambda: zip_ok(("..\\..\\escape.json", b"{}", None)),
                             400, ["'..\\\\..\\\\escape.json'", "'..' component"]),
    "zip-chardev": (lambda: zip_ok(("adapter/null", b"", stat.S_IFCHR | 0o666)),
                    400, ["'adapter/null'", "is a device file"]),
    "zip-fifo": (lambda: zip_ok(("adapter/pipe", b"", stat.S_IFIFO | 0o644)),
                 400, ["'adapter/pipe'", "is a FIFO"]),
    "zip-duplicate": (lambda: zip_ok(("adapter/adapter_config.json", b"{}", None)),
                      400, ["'adapter/adapter_config.json'", "appears twice"]),
    "zip-too-many": (lambda: zip_ok(*[(f"adapter/f{i}", b"", None) for i in range(1000)]),
                     400, ["declares 1001 members", "limit of 1000 archive members"]),
    "zip-bomb": (lambda: zip_ok(("adapter/zeros", b"\0" * ZEROS, None)),
                 413, ["'adapter/zeros'", "declared by the headers", "max_adapter_bytes"]),
    # headers understating the content: stopped while extracting (zip's size/CRC check)
    "zip-bomb-lying-headers": (lambda: zip_with_lying_size(b"\0" * ZEROS, 100),
                               400, ["corrupt", "adapter/zeros"]),
    "not-an-archive": (lambda: b"hello, this is not an archive" * 10,
                       400, ["not a readable zip or tar"]),
    "truncated-gzip": (lambda: tar_ok((tinfo("adapter/w"), os.urandom(100_000)))[:5000],
                       400, ["corrupt"]),
    "no-config": (lambda: tar_of([(tinfo("adapter/README.md"), b"hi")]),
                  400, ["exactly one adapter_config.json (found 0)"]),
    "two-configs": (lambda: tar_ok((tinfo("other/adapter_config.json"), CONFIG)),
                    400, ["exactly one adapter_config.json (found 2: "]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_refused_leaving_nothing(case, live, tmpdir_watch):
    url, registry, settings, store = live
    build, status, fragments = HOSTILE[case]
    name = "evil-" + case
    rev, stored = registry.revision(), _files(store)
    r = upload(url, name, build())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == "file", err
    for fragment in fragments:
        assert fragment in err["message"], err["message"]
    # nothing registered, nothing stored, nothing left on disk
    assert [v for v in registry.list(include_archived=True) if v.name == name] == []
    assert registry.revision() == rev
    assert _files(store) == stored
    assert _files(tmpdir_watch) == []
    assert _files(settings.cache_dir) == []


def test_good_uploads_register(live, adapter, tmpdir_watch):
    url, registry, settings, _ = live
    # tar.gz of the directory's contents, as `tar -czf a.tgz -C dir .` writes it ('./x')
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(adapter, arcname=".")
    r = upload(url, "good-tar", buf.getvalue(), alias="prod")
    assert r.status_code == 200, r.text
    assert r.json()["version"]["version"] == 1 and r.json()["created"] is True
    # a zip of the directory itself, streamed chunked (no Content-Length)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(adapter.rglob("*")):
            z.write(p, "adapter/" + str(p.relative_to(adapter)))
    data = zbuf.getvalue()
    r = upload(url, "good-zip", (data[i:i + 65536] for i in range(0, len(data), 65536)))
    assert r.status_code == 200, r.text
    assert {v.name for v in registry.list()} >= {"good-tar", "good-zip"}
    assert _files(tmpdir_watch) == []


def test_upload_over_the_limit_streamed_is_413(live, tmpdir_watch):
    url, registry, _, store = live
    stored = _files(store)
    chunk = os.urandom(1 << 20)
    r = upload(url, "too-big", (chunk for _ in range(6)))  # chunked: no Content-Length
    assert r.status_code == 413, r.text
    assert f"limit of {MAX_UPLOAD} bytes" in r.json()["error"]["message"]
    assert "max_upload_bytes" in r.json()["error"]["message"]
    assert _files(tmpdir_watch) == [] and _files(store) == stored
    assert not [v for v in registry.list(include_archived=True) if v.name == "too-big"]


def test_bad_name_refused_before_the_body_is_read(live, tmpdir_watch):
    url, *_ = live
    r = upload(url, "Bad/Name", b"x" * 1000)
    assert r.status_code == 400 and "invalid name 'Bad/Name'" in r.json()["error"]["message"]
    r = upload(url, "ok-name", b"x", alias="latest")
    assert r.status_code == 400 and "reserved" in r.json()["error"]["message"]
    assert _files(tmpdir_watch) == []


def test_extraction_enforces_the_cap_while_writing(tmp_path):
    """Headers that pass but content that does not: the byte count while writing stops it."""
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_ok(("adapter/w", b"\0" * 5000, None)))
    plan = archives._zip_plan(archive, 100, 1 << 20)
    plan.max_bytes = 3000  # as if the headers had understated the sizes
    (tmp_path / "x").mkdir()
    with pytest.raises(PayloadTooLarge, match="'adapter/w' brings the uncompressed size while "
                       "extracting to 5021 bytes, over the limit of 3000"):
        archives._zip_extract(archive, tmp_path / "x", plan)


def test_route_enforces_the_upload_limit_without_the_middleware(tmp_path, toy_model_dir,
                                                               monkeypatch, tmpdir_watch):
    """The upload route counts the streamed bytes itself, so it stays bounded on its own."""
    from fastapi.testclient import TestClient

    from loraplex.server import limits

    async def passthrough(self, scope, receive, send):
        await self.app(scope, receive, send)

    monkeypatch.setattr(limits.BodyLimitMiddleware, "__call__", passthrough)
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    registry.register_base("toy", toy_model_dir)
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                              admin_key="adm", max_upload_bytes=10_000)
    with TestClient(create_app(settings, FakeEngine(), registry=registry)) as client:
        r = client.post("/admin/adapters", params={"name": "x"}, headers=ADMIN,
                        content=(b"\0" * 4096 for _ in range(4)))
        assert r.status_code == 413, r.text
        msg = r.json()["error"]["message"]
        assert msg.startswith("upload is over the limit of 10000 bytes (max_upload_bytes)"), msg
        r = client.post("/admin/adapters", params={"name": "x"}, headers=ADMIN,
                        content=b"\0" * 10_001)
        assert r.status_code == 413 and "upload of 10001 bytes" in r.json()["error"]["message"]
    registry.close()
    assert _files(tmpdir_watch) == []


def test_register_from_uri_is_bounded_too(live, adapter, tmp_path, tmpdir_watch):
    url, registry, settings, _ = live
    r = upload(url, "from-uri", b"", uri=str(adapter))
    assert r.status_code == 200, r.text
    r = upload(url, "from-uri-missing", b"", uri=str(tmp_path / "nothing-here"))
    assert r.status_code == 400 and "holds no files" in r.json()["error"]["message"]
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_bytes(CONFIG)
    with (big / "zeros").open("wb") as f:
        f.truncate(settings.max_adapter_bytes + 1)  # sparse: no disk used
    r = upload(url, "from-uri-big", b"", uri=str(big))
    assert r.status_code == 413 and "max_adapter_bytes" in r.json()["error"]["message"]
    assert _files(tmpdir_watch) == []
    assert not [v for v in registry.list(include_archived=True) if v.name.startswith("from-uri-")]
