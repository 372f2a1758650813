"""service/jobs/webhooks.py: signatures checked by the `standardwebhooks` reference verifier, the SSRF guard
(address classes, odd IP literals, allowlists, URL syntax), and delivery against a real HTTP receiver on
127.0.0.1 (retries, redirects not followed, a hanging receiver, per-job order, the pending bound), and the
connection pinned to the checked address (plain HTTP, and HTTPS with SNI and certificate checks intact)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service.jobs import webhooks as wh
from service.jobs.webhooks import (Allowlist, Deliverer, WebhookRefused, check_syntax, parse_url,
                                   resolve_checked, secret_bytes, sign)

KEY = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
LOCAL = Allowlist.parse(["127.0.0.1"])


# --- signing ------------------------------------------------------------------------------------------


def _signed_headers(key: bytes, msg_id: str, body: bytes) -> dict[str, str]:
    ts = int(time.time())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(key, msg_id, ts, body)}


@pytest.mark.parametrize("secret, reference", [
    (SECRET, SECRET),  # whsec_<base64>: the reference decodes it the same way
    (SECRET.rstrip("="), SECRET),  # unpadded base64 too
    ("a plain shared secret", b"a plain shared secret"),  # anything else: its UTF-8 bytes
])
def test_sign_verified_by_reference(secret, reference):
    body = wh.payload("completed", {"id": "job-1", "status": "succeeded", "images": 2})
    headers = _signed_headers(secret_bytes(secret), "job-1.completed.3", body)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(reference).verify(body, headers)["type"] == "job.completed"
    with pytest.raises(WebhookVerificationError):
        Webhook(reference).verify(body.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(reference).verify(body, {**headers, "webhook-id": "job-1.completed.4"})


def test_secret_bytes_rejects_empty_and_bad_base64():
    for bad in ["", "whsec_", "whsec_not*base64"]:
        with pytest.raises(ValueError):
            secret_bytes(bad)


def test_payload_shape():
    when = dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=dt.timezone.utc)
    for event, kind in [("start", "job.started"), ("progress", "job.progress"), ("completed", "job.completed")]:
        doc = json.loads(wh.payload(event, {"id": "j", "step": 3}, when))
        assert doc == {"type": kind, "timestamp": "2024-05-01T12:00:00.123Z", "data": {"id": "j", "step": 3}}
    assert json.loads(wh.payload("start", {"x": 1}))["timestamp"].endswith("Z")


# --- the SSRF guard -----------------------------------------------------------------------------------


def _resolve(url: str, allow: Allowlist = Allowlist()) -> list:
    return asyncio.run(resolve_checked(url, allow))


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1/", "loopback"),
    ("http://localhost:8000/hook", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://100.127.255.254/", "CGNAT"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://239.255.255.250/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://198.18.0.1/", "private"),
    ("http://[fec0::1]/", "site-local"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),  # NAT64 of 169.254.169.254
])
def test_non_global_addresses_refused(url, reason):
    with pytest.raises(WebhookRefused, match=reason):
        _resolve(url)


@pytest.mark.parametrize("url", [
    "http://2130706433/", "http://0x7f.1/", "http://0x7f000001/", "http://0177.0.0.1/", "http://127.1/",
    "http://127.0.0.1./", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/", "http://[0:0:0:0:0:ffff:7f00:1]/",
    "http://017700000001/", "HTTP://LOCALHOST/",
])
def test_odd_loopback_literals_refused_as_loopback(url):
    with pytest.raises(WebhookRefused, match="loopback"):
        _resolve(url)


def test_odd_literals_are_canonical_addresses():
    assert parse_url("http://0x7f.1:8080/x?y=1").host == "127.0.0.1"
    assert parse_url("http://2130706433/").literal == ipaddress.ip_address("127.0.0.1")
    assert parse_url("http://[::ffff:127.0.0.1]/").host == "127.0.0.1"
    assert parse_url("http://0/").host == "0.0.0.0"
    with pytest.raises(WebhookRefused, match="invalid IPv4"):
        check_syntax("http://256.1.1.1/")


def test_global_addresses_accepted():
    assert _resolve("http://93.184.216.34/") == [ipaddress.ip_address("93.184.216.34")]
    assert _resolve("https://[2606:4700:4700::1111]:8443/x") == [ipaddress.ip_address("2606:4700:4700::1111")]


def test_allowlisted_networks():
    allow = Allowlist.parse(["10.0.0.0/8", "127.0.0.1", "::1", "[fd00::/8]"])
    assert _resolve("http://10.200.0.1/", allow) == [ipaddress.ip_address("10.200.0.1")]
    assert _resolve("http://127.0.0.1:9000/", allow) == [ipaddress.ip_address("127.0.0.1")]
    assert _resolve("http://[::1]/", allow) == [ipaddress.ip_address("::1")]
    assert _resolve("http://[::ffff:127.0.0.1]/", allow) == [ipaddress.ip_address("127.0.0.1")]
    assert _resolve("http://[fd00::5]/", allow) == [ipaddress.ip_address("fd00::5")]
    for url in ["http://127.0.0.2/", "http://192.168.0.1/", "http://169.254.169.254/"]:
        with pytest.raises(WebhookRefused):
            _resolve(url, allow)


def _fake_dns(monkeypatch, table: dict[str, list[str]]) -> list[str]:
    asked: list[str] = []

    async def getaddrinfo(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    monkeypatch.setattr(wh, "_getaddrinfo", getaddrinfo)
    return asked


def test_allowlisted_names(monkeypatch):
    _fake_dns(monkeypatch, {"hooks.internal": ["10.0.0.5"], "a.corp.example": ["10.0.0.6"],
                            "corp.example": ["10.0.0.7"], "other.internal": ["10.0.0.8"],
                            "localhost": ["127.0.0.1", "::1"]})
    allow = Allowlist.parse(["Hooks.Internal", "*.corp.example"])
    assert _resolve("http://hooks.internal/", allow) == [ipaddress.ip_address("10.0.0.5")]
    assert _resolve("http://HOOKS.internal./x", allow) == [ipaddress.ip_address("10.0.0.5")]
    assert _resolve("https://a.corp.example/", allow) == [ipaddress.ip_address("10.0.0.6")]
    for url in ["http://corp.example/", "http://other.internal/"]:
        with pytest.raises(WebhookRefused, match="private"):
            _resolve(url, allow)
    assert _resolve("http://localhost/", Allowlist.parse(["localhost"]))  # a listed name is trusted


def test_any_bad_answer_refuses_and_resolution_failure_refuses(monkeypatch):
    _fake_dns(monkeypatch, {"mixed.example": ["93.184.216.34", "::ffff:169.254.169.254"],
                            "public.example": ["93.184.216.34", "2606:4700::1"]})
    with pytest.raises(WebhookRefused, match="169.254.169.254: link-local"):
        _resolve("http://mixed.example/")
    with pytest.raises(WebhookRefused, match="cannot resolve"):
        _resolve("http://nowhere.example/")
    assert len(_resolve("http://public.example/")) == 2


def test_allowlist_rejects_nonsense():
    for bad in ["not a host!", "10.0.0.0/33", "127.1", "*."]:
        with pytest.raises(ValueError):
            Allowlist.parse([bad])


@pytest.mark.parametrize("url, reason", [
    ("ftp://example.com/hook", "http or https"),
    ("file:///etc/passwd", "http or https"),
    ("gopher://127.0.0.1:6379/_", "http or https"),
    ("javascript:alert(1)", "http or https"),
    ("//example.com/hook", "http or https"),
    ("", "empty"),
    ("http://", "no host"),
    ("http:///hook", "no host"),
    ("http://:80/hook", "no host"),
    ("http://user:pass@example.com/", "credentials"),
    ("http://user@example.com/", "credentials"),
    ("http://example.com\\@127.0.0.1/", "credentials"),
    ("http://example.com/" + "a" * 2100, "longer than 2048"),
    ("http://example.com:0/", "port"),
    ("http://example.com:65536/", "Port out of range"),
    ("http://example.com:http/", "invalid webhook URL"),
    ("http://exa mple.com/", "whitespace"),
    ("http://example.com/\r\nX-Injected: 1", "whitespace"),
    ("http://[::1/", "invalid webhook URL"),
    ("http://exa$mple.com/", "invalid host name"),
])
def test_syntax_refused(url, reason):
    with pytest.raises(WebhookRefused, match=reason):
        check_syntax(url)


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/a?b=1", "http://example.com", "http://example.com:8080", "http://[::1]:9000/x",
    "https://xn--bcher-kva.example/", "https://bücher.example/", "http://example.com:65535/" + "a" * 2000,
])
def test_syntax_accepted(url):
    assert check_syntax(url) is None


# --- delivery against a real receiver -----------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 in a thread; `respond(path, n)` picks the status of the n-th (0-based)
    request on a path; `hang` makes it wait (up to 5 s, or until stopped) before answering."""

    def __init__(self) -> None:
        self.respond: Callable[[str, int], int] = lambda path, n: 200
        self.hang = False
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook(SECRET).verify(body, headers)
                    verified: bool | str = True
                except Exception as e:
                    verified = repr(e)
                with receiver.lock:
                    n = sum(r["path"] == self.path for r in receiver.requests)
                    receiver.requests.append({"path": self.path, "headers": headers, "body": body,
                                              "verified": verified, "at": time.monotonic()})
                if receiver.hang:
                    receiver.release.wait(5)
                status = receiver.respond(self.path, n)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", receiver.url("/elsewhere"))
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def ids(self, path: str | None = None) -> list[str]:
        return [r["headers"]["webhook-id"] for r in self.requests if path in (None, r["path"])]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def test_retries_until_success_and_signature_verifies(receiver):
    receiver.respond = lambda path, n: 500 if n < 2 else 200
    calls: list[tuple] = []

    async def main() -> bool:
        d = Deliverer(SECRET, LOCAL, timeout_s=2, backoff_s=0.05, on_attempt=lambda *a: calls.append(a))
        sent = d.send("job-1", receiver.url("/hook?k=v"), "completed", {"id": "job-1", "status": "succeeded"}, 7)
        await d.close(10)
        return sent

    assert asyncio.run(main())
    assert calls == [("job-1", "completed", 1, False, False, "HTTP 500"),
                     ("job-1", "completed", 2, False, False, "HTTP 500"),
                     ("job-1", "completed", 3, True, True, "HTTP 200")]
    assert [r["verified"] for r in receiver.requests] == [True, True, True]
    assert receiver.ids() == ["job-1.completed.7"] * 3  # stable across retries: receivers deduplicate
    first = receiver.requests[0]
    assert first["path"] == "/hook?k=v"
    assert first["headers"]["host"] == f"127.0.0.1:{receiver.server.server_address[1]}"
    assert first["headers"]["content-type"] == "application/json"
    assert json.loads(first["body"])["data"] == {"id": "job-1", "status": "succeeded"}


def test_without_secret_no_signature_header(receiver):
    calls: list[tuple] = []

    async def main() -> None:
        d = Deliverer(None, LOCAL, timeout_s=2, on_attempt=lambda *a: calls.append(a))
        d.send("j", receiver.url("/"), "start", {"id": "j"}, 0)
        await d.close(10)

    asyncio.run(main())
    assert calls == [("j", "start", 1, True, True, "HTTP 200")]
    headers = receiver.requests[0]["headers"]
    assert "webhook-signature" not in headers and headers["webhook-id"] == "j.start.0"
    assert int(headers["webhook-timestamp"]) == pytest.approx(time.time(), abs=60)


def test_redirect_not_followed(receiver):
    receiver.respond = lambda path, n: 302
    calls: list[tuple] = []

    async def main() -> None:
        d = Deliverer(SECRET, LOCAL, timeout_s=2, attempts=3, backoff_s=0.02, on_attempt=lambda *a: calls.append(a))
        d.send("j", receiver.url("/hook"), "completed", {}, 1)
        await d.close(10)

    asyncio.run(main())
    assert [(c[2], c[3], c[4], c[5]) for c in calls] == [(1, False, False, "HTTP 302"), (2, False, False, "HTTP 302"),
                                                         (3, False, True, "HTTP 302")]
    assert [r["path"] for r in receiver.requests] == ["/hook"] * 3  # never /elsewhere


def test_hanging_receiver_times_out_without_blocking_the_loop(receiver):
    receiver.hang = True
    calls: list[tuple] = []

    async def main() -> tuple[float, int]:
        d = Deliverer(SECRET, LOCAL, timeout_s=0.3, attempts=1, on_attempt=lambda *a: calls.append(a))
        ticks = 0
        t0 = time.monotonic()
        assert d.send("j", receiver.url("/slow"), "progress", {"step": 1}, 1)
        took = time.monotonic() - t0
        while not calls and time.monotonic() - t0 < 3:
            await asyncio.sleep(0.01)  # the loop keeps running other coroutines meanwhile
            ticks += 1
        await d.close(1)
        return took, ticks

    took, ticks = asyncio.run(main())
    assert took < 0.05
    assert ticks >= 10
    assert calls == [("j", "progress", 1, False, True, "timed out after 0.3s")]


def test_order_kept_per_job_and_jobs_independent(receiver):
    receiver.respond = lambda path, n: 500 if path == "/a" and n == 0 else 200
    calls: list[tuple] = []

    async def main() -> None:
        d = Deliverer(SECRET, LOCAL, timeout_s=2, backoff_s=0.4, on_attempt=lambda *a: calls.append(a))
        assert d.send("a", receiver.url("/a"), "start", {}, 1)
        assert d.send("a", receiver.url("/a"), "progress", {"step": 5}, 2)
        assert d.send("a", receiver.url("/a"), "completed", {}, 3)
        assert d.send("b", receiver.url("/b"), "start", {}, 1)
        assert d.pending == 4
        await d.close(10)
        assert d.pending == 0

    asyncio.run(main())
    assert receiver.ids("/a") == ["a.start.1", "a.start.1", "a.progress.2", "a.completed.3"]
    assert receiver.ids("/b") == ["b.start.1"]
    retry_of_a = [r for r in receiver.requests if r["path"] == "/a"][1]["at"]
    b_at = [r for r in receiver.requests if r["path"] == "/b"][0]["at"]
    assert b_at < retry_of_a  # job b does not wait for job a's retries
    assert [(c[1], c[3]) for c in calls if c[0] == "a" and c[4]] == [("start", True), ("progress", True),
                                                                    ("completed", True)]


def test_max_pending_overflow_and_close_cancels(receiver):
    receiver.hang = True
    calls: list[tuple] = []

    async def main() -> list[bool]:
        d = Deliverer(SECRET, LOCAL, timeout_s=5, max_pending=2, on_attempt=lambda *a: calls.append(a))
        sent = [d.send(f"j{i}", receiver.url("/"), "start", {}, 0) for i in range(3)]
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await d.close(0.1)
        assert time.monotonic() - t0 < 1
        assert not d.send("j9", receiver.url("/"), "start", {}, 0)  # closed
        return sent

    assert asyncio.run(main()) == [True, True, False]
    assert ("j2", "start", 0, False, True, "more than 2 webhook deliveries pending") in calls
    assert sorted(c for c in calls if c[0] in ("j0", "j1")) == [("j0", "start", 1, False, True, "cancelled"),
                                                                ("j1", "start", 1, False, True, "cancelled")]
    assert calls[-1] == ("j9", "start", 0, False, True, "the webhook deliverer is closed")


def test_close_cancels_deliveries_that_never_started():
    calls: list[tuple] = []

    async def main() -> None:
        d = Deliverer(SECRET, LOCAL, on_attempt=lambda *a: calls.append(a))
        d.send("j", "http://127.0.0.1:9/", "start", {}, 0)
        d.send("j", "http://127.0.0.1:9/", "completed", {}, 1)
        await d.close(0)

    asyncio.run(main())
    assert sorted(c[1] for c in calls) == ["completed", "start"]
    assert all(c[3] is False and c[4] is True for c in calls)


def test_send_never_raises():
    calls: list[tuple] = []
    d = Deliverer(SECRET, LOCAL, on_attempt=lambda *a: calls.append(a))
    assert not d.send("j", "http://127.0.0.1/", "start", {}, 0)  # no running loop
    assert calls[-1][:5] == ("j", "start", 0, False, True) and "not scheduled" in calls[-1][5]

    async def main() -> None:
        assert not d.send("j", "ftp://example.com/", "start", {}, 0)
        assert not d.send("j", "http://127.0.0.1/", "finished", {}, 0)
        await d.close(1)

    asyncio.run(main())
    assert "refused: webhook URL scheme" in calls[-2][5]
    assert "unknown webhook event" in calls[-1][5]


# --- pinning and rebinding, with a mock transport -----------------------------------------------------


def test_connection_pinned_to_checked_address_and_rebinding_refused(monkeypatch):
    dns = {"hooks.example.com": ["93.184.216.34"]}
    asked = _fake_dns(monkeypatch, dns)
    seen: list[httpx.Request] = []
    calls: list[tuple] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        dns["hooks.example.com"] = ["127.0.0.1"]  # the name now rebinds to loopback
        return httpx.Response(503)

    def raising(*args) -> None:
        calls.append(args)
        raise RuntimeError("a broken on_attempt must not break delivery")

    async def main() -> None:
        d = Deliverer(SECRET, Allowlist(), attempts=5, backoff_s=0.01, transport=httpx.MockTransport(handler),
                      on_attempt=raising)
        d.send("j", "https://Hooks.Example.com:8443/cb?x=1", "start", {"id": "j"}, 0)
        await d.close(5)

    asyncio.run(main())
    assert len(seen) == 1  # the second attempt re-resolved, saw loopback, and was refused without retrying
    request = seen[0]
    assert str(request.url) == "https://93.184.216.34:8443/cb?x=1"
    assert request.headers["host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert Webhook(SECRET).verify(request.content, dict(request.headers))["type"] == "job.started"
    assert [(c[2], c[3], c[4]) for c in calls] == [(1, False, False), (2, False, True)]
    assert calls[0][5] == "HTTP 503" and "refused" in calls[1][5] and "loopback" in calls[1][5]
    assert asked.count("hooks.example.com") == 2


def test_http_pins_without_sni(monkeypatch):
    _fake_dns(monkeypatch, {"hooks.example.com": ["2606:4700::6810:84e5", "93.184.216.34"]})
    seen: list[httpx.Request] = []

    async def main() -> None:
        d = Deliverer(None, Allowlist(), transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(204)))
        d.send("j", "http://hooks.example.com/", "completed", {}, 2)
        await d.close(5)

    asyncio.run(main())
    assert str(seen[0].url) == "http://[2606:4700::6810:84e5]/"
    assert seen[0].headers["host"] == "hooks.example.com"
    assert "sni_hostname" not in seen[0].extensions


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for a test certificate")
def test_https_pinned_to_address_still_verifies_the_name(tmp_path, monkeypatch):
    """Connecting to the checked IP keeps TLS honest: SNI carries the name and the certificate is checked
    against it, so a certificate for hooks.test passes and the same server called as other.test fails."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=hooks.test", "-addext", "subjectAltName=DNS:hooks.test"],
                   check=True, capture_output=True)
    _fake_dns(monkeypatch, {"hooks.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    receiver = Receiver()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    names: list[str] = []
    server_tls.sni_callback = lambda sock, name, ctx: names.append(name)
    receiver.server.socket = server_tls.wrap_socket(receiver.server.socket, server_side=True)
    port = receiver.server.server_address[1]
    calls: list[tuple] = []

    async def main() -> None:
        transport = httpx.AsyncHTTPTransport(verify=ssl.create_default_context(cafile=str(cert)))
        d = Deliverer(SECRET, LOCAL, attempts=1, timeout_s=5, transport=transport,
                      on_attempt=lambda *a: calls.append(a))
        d.send("good", f"https://hooks.test:{port}/hook", "start", {}, 0)
        d.send("bad", f"https://other.test:{port}/hook", "start", {}, 0)
        await d.close(10)

    try:
        asyncio.run(main())
    finally:
        receiver.stop()
    result = {c[0]: c for c in calls}
    assert result["good"][3:] == (True, True, "HTTP 200")
    assert result["bad"][3] is False and "certificate" in result["bad"][5]
    assert sorted(names) == ["hooks.test", "other.test"]
    assert [r["headers"]["host"] for r in receiver.requests] == [f"hooks.test:{port}"]
    assert receiver.requests[0]["verified"] is True


def test_progress_is_best_effort_and_never_crowds_out_completed(receiver):
    """A hanging receiver: one progress delivery per job waits (newer ones are dropped, unreported), and
    however many jobs report progress, another job's completed is still scheduled."""
    receiver.hang = True
    calls: list[tuple] = []

    async def main():
        d = Deliverer(SECRET, LOCAL, timeout_s=0.3, max_pending=8, on_attempt=lambda *a: calls.append(a))
        first = d.send("slow", receiver.url("/p"), "progress", {"done": 1}, 1)
        dropped = [d.send("slow", receiver.url("/p"), "progress", {"done": k}, k) for k in range(2, 10)]
        others = [d.send(f"job-{k}", receiver.url("/p"), "progress", {"done": 1}, 1) for k in range(10)]
        completed = d.send("other", receiver.url("/c"), "completed", {"status": "succeeded"}, 1)
        pending = d.pending
        await d.close(5)
        return first, dropped, others, completed, pending

    first, dropped, others, completed, pending = asyncio.run(main())
    assert first and not any(dropped) and completed
    assert sum(others) == 3 and pending == 5  # progress only while the deliverer is at most half full
    progress = [c for c in calls if c[1] == "progress"]
    assert all(c[2] == 1 and c[4] for c in progress)  # one attempt each, final
