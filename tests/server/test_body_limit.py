"""Request size limits over real HTTP (uvicorn on loopback, the fake engine): a declared
Content-Length over the limit is refused before a byte of the body is read, a chunked body is
cut off once it crosses the limit, and each route gets its own limit (admin upload vs the rest).

Raw sockets send the over-limit requests, so the test controls exactly what is sent and when:
a server that waited for the body would time out here instead of answering.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import pytest
import uvicorn

from loraplex.adapters.registry import Registry
from loraplex.server.app import create_app
from loraplex.server.settings import ServerSettings
from tests.server.test_app_unit import FakeEngine
from tests.services import free_port

MAX_REQUEST = 4096
MAX_UPLOAD = 16384


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a loopback port in a thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def raw_request(url: str, head: str, body_parts: Sequence[bytes] = (), timeout: float = 20
                ) -> tuple[int, dict[str, str], bytes, bool]:
    """Send `head` (request line + headers, no blank line) and `body_parts` over one socket;
    return (status, headers, body, closed by the server)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n\r\n")
        for part in body_parts:
            s.sendall(part)
        data = b""
        closed = False
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                lines = data[:head_end].decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (ln.partition(":") for ln in lines[1:])}
                n = int(headers.get("content-length", "-1"))
                if n >= 0 and len(data) >= head_end + 4 + n:
                    # the full response is here; does the server close the connection?
                    try:
                        s.settimeout(5)
                        closed = s.recv(1) == b""
                    except ConnectionResetError:
                        closed = True
                    except TimeoutError:  # still open 5 s after the response
                        closed = False
                    break
    head_end = data.find(b"\r\n\r\n")
    assert head_end >= 0, f"no HTTP response, got {data[:200]!r}"
    lines = data[:head_end].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, data[head_end + 4:], closed


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, toy_model_dir):
    tmp = tmp_path_factory.mktemp("body-limit")
    registry = Registry(f"sqlite:///{tmp / 'r.db'}", str(tmp / "art"))
    registry.register_base("toy", toy_model_dir)
    settings = ServerSettings(home=tmp, model=toy_model_dir, served_model_name="toy",
                              api_keys=["k1"], admin_key="adm", max_request_bytes=MAX_REQUEST,
                              max_upload_bytes=MAX_UPLOAD)
    engine = FakeEngine()
    with live_server(create_app(settings, engine, registry=registry)) as url:
        yield url, engine
    registry.close()


def _error(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


CHAT = "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer k1\r\n" \
       "Content-Type: application/json"
UPLOAD = "POST /admin/adapters?name=big HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer adm"


@pytest.mark.parametrize("expect_continue", [False, True])
def test_declared_too_large_is_refused_before_the_body(server, expect_continue):
    url, engine = server
    n = len(engine.requests)
    # 1 TB declared, nothing sent: only a server that never waits for the body can answer.
    head = CHAT + "\r\nContent-Length: 1000000000000"
    if expect_continue:  # curl's way for large bodies: no 100 Continue may come before the 413
        head += "\r\nExpect: 100-continue"
    status, headers, body, closed = raw_request(url, head)
    assert status == 413, body
    err = _error(body)
    assert err["code"] == "payload_too_large" and err["type"] == "invalid_request_error"
    assert "1000000000000 bytes" in err["message"] and f"limit of {MAX_REQUEST} bytes" in err["message"]
    assert "max_request_bytes" in err["message"] and "LORAPLEX_MAX_REQUEST_BYTES" in err["message"]
    assert headers["connection"] == "close" and closed  # no draining of a terabyte
    assert len(engine.requests) == n


def test_declared_too_large_upload_names_the_upload_limit(server):
    url, _ = server
    status, _, body, closed = raw_request(url, UPLOAD + f"\r\nContent-Length: {MAX_UPLOAD + 1}")
    assert status == 413 and closed
    msg = _error(body)["message"]
    assert f"of {MAX_UPLOAD + 1} bytes" in msg and f"limit of {MAX_UPLOAD} bytes" in msg
    assert "max_upload_bytes" in msg and "--max-upload-bytes" in msg


def test_size_is_checked_before_auth(server):
    # No key at all: the size is refused first, without reading (or authenticating) the body.
    url, _ = server
    status, _, body, _ = raw_request(
        url, "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 99999999")
    assert status == 413 and _error(body)["code"] == "payload_too_large"


def test_chunked_too_large_is_cut_off_while_streaming(server):
    url, engine = server
    n = len(engine.requests)
    part = b"[" + b" " * 1022 + b"]"  # never terminated: the server must not wait for the end
    status, headers, body, closed = raw_request(
        url, CHAT + "\r\nTransfer-Encoding: chunked", [_chunk(part)] * 6)
    assert status == 413, body
    msg = _error(body)["message"]
    assert f"limit of {MAX_REQUEST} bytes" in msg and "max_request_bytes" in msg
    assert headers["connection"] == "close" and closed
    assert len(engine.requests) == n


def test_chunked_upload_over_the_upload_limit(server):
    url, _ = server
    status, _, body, closed = raw_request(url, UPLOAD + "\r\nTransfer-Encoding: chunked",
                                          [_chunk(b"\0" * 4096)] * 5)
    assert status == 413 and closed
    msg = _error(body)["message"]
    assert f"limit of {MAX_UPLOAD} bytes" in msg and "max_upload_bytes" in msg


def test_chunked_too_large_with_a_real_client(server):
    url, _ = server

    def gen():
        for _ in range(8):
            yield b"x" * 1024

    r = httpx.post(f"{url}/v1/chat/completions", content=gen(), timeout=20,
                   headers={"Authorization": "Bearer k1", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_bodies_within_the_limit_pass(server):
    url, engine = server
    h = {"Authorization": "Bearer k1"}
    body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=h, timeout=60)
    assert r.status_code == 200, r.text

    def gen():  # chunked, no Content-Length, under the limit
        data = json.dumps(body).encode()
        yield data[:10]
        yield data[10:]

    r = httpx.post(f"{url}/v1/chat/completions", content=gen(), timeout=60,
                   headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{url}/health", timeout=20).status_code == 200


def test_each_route_has_its_own_limit(server):
    url, _ = server
    junk = b"x" * (MAX_REQUEST * 2)  # over max_request_bytes, under max_upload_bytes
    r = httpx.post(f"{url}/v1/chat/completions", content=junk, timeout=20,
                   headers={"Authorization": "Bearer k1", "Content-Type": "application/json"})
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/admin/adapters", params={"name": "junk"}, content=junk, timeout=20,
                   headers={"Authorization": "Bearer adm"})
    assert r.status_code == 400, r.text  # read in full, then refused as no archive
    assert "not a readable zip or tar" in r.json()["error"]["message"]
    # other admin routes get the request limit
    r = httpx.post(f"{url}/admin/adapters/nope/load", content=junk, timeout=20,
                   headers={"Authorization": "Bearer adm"})
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]


def test_limits_are_settings():
    s = ServerSettings()
    assert s.max_request_bytes == 16 << 20 and s.max_upload_bytes == 2 << 30
    from loraplex.server.limits import BodyLimitMiddleware

    mw = BodyLimitMiddleware(None, max_request_bytes=1, max_upload_bytes=2)
    assert mw.limit_for({"method": "POST", "path": "/admin/adapters"}) == (2, "max_upload_bytes")
    assert mw.limit_for({"method": "POST", "path": "/admin/adapters/"}) == (2, "max_upload_bytes")
    assert mw.limit_for({"method": "POST", "path": "/lp/admin/adapters",
                         "root_path": "/lp"}) == (2, "max_upload_bytes")
    assert mw.limit_for({"method": "PUT", "path": "/admin/adapters"}) == (1, "max_request_bytes")
    assert mw.limit_for({"method": "POST", "path": "/v1/completions"}) == (1, "max_request_bytes")


@pytest.mark.parametrize("value, fragment", [
    ("12a", "invalid Content-Length"), ("-1", "invalid Content-Length"),
    ("٣", "invalid Content-Length"),
])
def test_content_length_parsing(value, fragment):
    from loraplex.adapters.errors import BadRequest
    from loraplex.server.limits import content_length

    assert content_length([(b"content-length", b"12")]) == 12
    assert content_length([(b"host", b"x")]) is None
    with pytest.raises(BadRequest, match=fragment):
        content_length([(b"content-length", value.encode())])
    with pytest.raises(BadRequest, match="conflicting"):
        content_length([(b"content-length", b"1"), (b"Content-Length", b"2")])
