"""Issue 11's findings, each refused as a 4xx problem naming its field or limit: bodies streamed past the cap
or without a key, callback hosts spelled as numbers or inside IPv6, lone surrogates, empty prompt lists,
malformed bodies without a key, huge attribute lists, prompts in the access log, prompts too long in tokens.

Raw sockets send chunked bodies that never end: a server that waited for the whole body would never answer,
so an answer at all shows it answered from a part. Socket timeouts only stop a hung run.
"""

from __future__ import annotations

import json
import logging
import select
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from app.serving import ModelServer
from eigenshift_core.loading import LoadedModel
from tests.api.conftest import admin_key
from workers.settings import Settings

HUNG_S = 120  # only stops a run whose server never answers
CHUNK = b"x" * 65_536


def chunked_post(base_url: str, path: str, headers: dict[str, str], first: bytes, chunks: int) -> tuple[int, dict[str, str], bytes]:
    """POST `first`, then up to `chunks` CHUNKs, as a chunked body that never ends (no last chunk); stop sending
    once the server answers. The answer's status, headers (lower-case names) and body."""
    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=HUNG_S) as sock:
        head = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Transfer-Encoding: chunked",
                *(f"{name}: {value}" for name, value in headers.items())]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for piece in (first, *[CHUNK] * chunks):
            if select.select([sock], [], [], 0)[0]:
                break  # answered already
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break  # answered and closed
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
        try:
            more = sock.recv(65_536)
        except ConnectionResetError:
            more = b""
        if not more:
            break
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


# -- A: bodies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-key", "Basic YWRtaW46YWRtaW4="])
def test_a_chunked_body_without_a_valid_key_is_401_before_it_is_read(live_server: str,
                                                                    authorization: str | None) -> None:
    headers = {"Content-Type": "application/json"} | ({"Authorization": authorization} if authorization else {})
    status, answer_headers, body = chunked_post(live_server, "/score", headers, b'{"texts": ["', chunks=3)
    assert status == 401, body
    assert answer_headers["content-type"] == "application/problem+json"
    assert answer_headers["connection"] == "close" and answer_headers["www-authenticate"] == "Bearer"


MULTIPART = (b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="prompts.txt"\r\n'
             b"Content-Type: text/plain\r\n\r\n")


@pytest.mark.parametrize(("path", "content_type", "first"), [
    ("/score", "application/json", b'{"texts": ["'),
    ("/files", "multipart/form-data; boundary=b0undary", MULTIPART),
])
def test_a_chunked_body_over_the_cap_is_413_before_it_ends(live_server: str, settings: Settings, path: str,
                                                          content_type: str, first: bytes) -> None:
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {admin_key(settings)}"}
    chunks = settings.max_body_bytes // len(CHUNK) + 4  # past the cap, and never the end
    status, answer_headers, body = chunked_post(live_server, path, headers, first, chunks)
    assert status == 413, body
    assert answer_headers["content-type"] == "application/problem+json" and answer_headers["connection"] == "close"
    assert "max_body_bytes" in json.loads(body)["detail"]


def test_a_body_under_the_cap_still_passes_chunked(live_server: str, settings: Settings) -> None:
    import httpx

    def body() -> Iterator[bytes]:
        yield b'{"texts": ["a friendly'
        yield b' sentence"]}'

    response = httpx.post(f"{live_server}/score", content=body(), trust_env=False, timeout=HUNG_S,
                          headers={"Content-Type": "application/json", "Authorization": f"Bearer {admin_key(settings)}"})
    assert response.status_code == 200, response.text


# -- B: callback hosts at the API -------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://[64:ff9b::7f00:2]:9/hook", "http://[::127.0.0.2]:9/hook",
                                 "http://0x7f000002:9/hook", "http://2130706434:9/hook", "http://127.2:9/hook"])
def test_a_callback_hidden_in_a_numeric_or_ipv6_spelling_is_422(client: TestClient, settings: Settings,
                                                                monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setattr(settings, "webhook_allowed_hosts", ["*", "127.0.0.1"])  # any public host, and 127.0.0.1
    body = {"prompts": {"texts": ["Once upon a time"]}, "samples": 1, "max_new_tokens": 2, "callback_url": url}
    response = client.post("/jobs/generate", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "callback_url"


# -- D: low findings --------------------------------------------------------------------------------------

CHAT = {"model": "embedded", "max_tokens": 1, "temperature": 0}


@pytest.mark.parametrize(("url", "body", "field"), [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a\ud800"}]}, "messages"),
    ("/v1/completions", {**CHAT, "prompt": ["fine", "b\udfff"]}, "prompt"),
    ("/jobs/generate", {"prompts": {"texts": ["fine", "a\ud800"]}, "samples": 1}, "prompts"),
    ("/generate", {"items": [{"prompt": "a\ud800", "max_new_tokens": 1, "detox": False}]}, "items.0.prompt"),
    ("/v1/moderations", {"input": ["\udc00"]}, "input"),
])
def test_a_lone_surrogate_is_422_naming_its_field(client: TestClient, url: str, body: dict, field: str) -> None:
    content = json.dumps(body)  # ASCII-escaped: the surrogate travels as `\ud800`, as a hostile client sends it
    assert "\\ud800" in content or "\\udfff" in content or "\\udc00" in content
    response = client.post(url, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert error_of(response)[0] == field


def error_of(response: httpx.Response) -> tuple[str | None, str]:
    """(field, message) of an error answer: OpenAI's envelope on /v1/…, problem+json elsewhere."""
    if response.request.url.path.startswith("/v1/"):
        assert response.headers["content-type"] == "application/json"
        return response.json()["error"]["param"], response.json()["error"]["message"]
    assert response.headers["content-type"] == "application/problem+json"
    return response.json().get("field"), response.json()["detail"]


def test_completions_of_no_prompts_is_422(client: TestClient) -> None:
    response = client.post("/v1/completions", json={**CHAT, "prompt": []})
    assert response.status_code == 422 and error_of(response)[0] == "prompt"


@pytest.mark.parametrize("url", ["/v1/chat/completions", "/jobs/generate", "/score", "/files"])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-key"])
def test_a_malformed_body_without_a_key_is_401(client: TestClient, url: str, authorization: str | None) -> None:
    anonymous = TestClient(client.app, raise_server_exceptions=False)  # the same app, without the admin key
    headers = {"content-type": "application/json"} | ({"Authorization": authorization} if authorization else {})
    response = anonymous.post(url, content=b'{"messages": [', headers=headers)
    assert response.status_code == 401, response.text
    error_of(response)  # the route's own error format


def test_thousands_of_requested_attributes_get_a_short_answer(client: TestClient) -> None:
    attributes = {f"A{i}": {} for i in range(50_000)}  # 600 kB, under max_body_bytes
    response = client.post("/v1alpha1/comments:analyze", json={"comment": {"text": "hello"},
                                                                "requestedAttributes": attributes})
    assert response.status_code == 422 and response.json()["field"] == "requestedAttributes"
    assert len(response.content) < 4_000
    few = {f"NO_SUCH_ATTRIBUTE_{i}": {} for i in range(20)}
    response = client.post("/v1alpha1/comments:analyze", json={"comment": {"text": "hello"}, "requestedAttributes": few})
    assert response.status_code == 400 and len(response.json()["errors"]) <= 5 and len(response.content) < 4_000


def test_many_invalid_items_get_a_short_answer(client: TestClient) -> None:
    response = client.post("/score", json={"texts": [1] * 50_000})
    assert response.status_code == 422 and len(response.json()["errors"]) <= 20 and len(response.content) < 10_000


def test_the_access_log_never_holds_a_query_string(live_server: str) -> None:
    import httpx

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    access = logging.getLogger("uvicorn.access")
    handler, level = Keep(), access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        httpx.get(f"{live_server}/generate", params={"prompt": "my secret prompt"}, trust_env=False, timeout=HUNG_S)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert any("/generate" in line for line in lines), lines
    assert not any("secret" in line for line in lines), lines


# -- E: prompts in tokens ---------------------------------------------------------------------------------


def test_the_token_limit_leaves_room_in_the_context(tiny_llama: LoadedModel) -> None:
    server = ModelServer(tiny_llama, lambda _: pytest.fail("no intervention"), max_size=1, window_s=0)
    assert server.prompt_token_limit(max_new_tokens=200, max_prompt_tokens=2048) == 256 - 200
    assert server.prompt_token_limit(max_new_tokens=10, max_prompt_tokens=32) == 32
    assert server.prompt_tokens(["abc", ""]) == [3, 0]


@pytest.fixture
def few_tokens(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(settings, "max_prompt_tokens", 24)
    return 24


LONG = "the quick brown fox jumps over the lazy dog " * 8  # ~80 tokens, 360 characters (under max_prompt_chars)


@pytest.mark.usefixtures("few_tokens")
@pytest.mark.parametrize(("method", "url", "body", "field"), [
    ("GET", "/generate", {"prompt": LONG, "max_new_tokens": 1}, "prompt"),
    ("POST", "/generate", {"items": [{"prompt": "hi", "max_new_tokens": 1}, {"prompt": LONG, "max_new_tokens": 1}]},
     "items.1.prompt"),
    ("POST", "/v1/completions", {**CHAT, "prompt": LONG}, "prompt"),
    ("POST", "/v1/completions", {**CHAT, "prompt": ["hi", LONG]}, "prompt.1"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": ""}] * 300}, "messages"),
])
def test_a_prompt_over_the_token_limit_is_413_naming_it(client: TestClient, method: str, url: str, body: dict,
                                                       field: str) -> None:
    response = client.get(url, params=body) if method == "GET" else client.post(url, json=body)
    assert response.status_code == 413, response.text
    named, message = error_of(response)
    assert named == field and "max_prompt_tokens=24" in message


@pytest.mark.usefixtures("few_tokens")
def test_a_prompt_within_the_token_limit_passes(client: TestClient) -> None:
    assert client.get("/generate", params={"prompt": "Hello", "max_new_tokens": 1, "detox": False}).status_code == 200
    answer = client.post("/v1/completions", json={**CHAT, "prompt": "Hello"})
    assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] <= 24
