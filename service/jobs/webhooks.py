"""Job webhooks: Standard Webhooks signing, an SSRF guard, and bounded, ordered, retried delivery.

A webhook URL is chosen by whoever submits a job, so every delivery is a request the service makes on a
stranger's behalf. The guard therefore refuses any URL whose host resolves to an address that is not
globally routable (loopback, private, link-local and cloud metadata, CGNAT, multicast, reserved, and the
IPv6 forms that embed such an IPv4 address) unless an operator listed it, and checks again after DNS
resolution on every attempt. The request then goes to the very address that passed the check (the
original name only travels in the Host header and as TLS SNI), so a DNS answer that changes between the
check and the connection (DNS rebinding) cannot redirect it. Redirects are never followed, proxies from
the environment are ignored, and cookies are never stored.

Signatures follow https://www.standardwebhooks.com/: `webhook-id`, `webhook-timestamp` and
`webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`. The id is stable across the
retries of one delivery so that receivers can deduplicate.

Engine-agnostic: nothing here imports the rest of `service`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import hashlib
import hmac
import http.cookiejar
import ipaddress
import json
import logging
import random
import re
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Union
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
OnAttempt = Callable[[str, str, int, bool, bool, str], None]

EVENTS: dict[str, str] = {"start": "job.started", "progress": "job.progress", "completed": "job.completed"}
MAX_URL_LENGTH = 2048
USER_AGENT = "diffusion-service-webhooks/1"
_SECRET_PREFIX = "whsec_"
_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_NUMERIC_LABEL = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")
# IPv6 prefixes that carry an IPv4 address the packet ends up at: 6to4 and NAT64 (RFC 6052 well-known).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215, local use: never global
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class WebhookRefused(ValueError):
    """A webhook URL that the service will not call (bad syntax, or an address it must not reach)."""


# --- signing ------------------------------------------------------------------------------------------


def secret_bytes(secret: str) -> bytes:
    """The HMAC key: `whsec_<base64>` decodes to its bytes (the Standard Webhooks convention), anything
    else is used as its UTF-8 bytes. Raises ValueError for an empty key or bad base64."""
    if secret.startswith(_SECRET_PREFIX):
        text = secret[len(_SECRET_PREFIX):]
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    else:
        key = secret.encode()
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign(secret_bytes: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256(key, "{msg_id}.{timestamp}.{body}")>`: the id and time are signed with the
    body, so a captured request cannot be replayed under another id or, past the receiver's tolerance, later."""
    mac = hmac.new(secret_bytes, f"{msg_id}.{int(timestamp)}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def payload(event: str, data: dict, when: _dt.datetime | None = None) -> bytes:
    """The JSON body: `{"type": "job.<event>", "timestamp": ISO-8601 UTC, "data": data}`."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    stamp = when.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"type": EVENTS[event], "timestamp": stamp, "data": data},
                      separators=(",", ":"), default=str).encode()


# --- URLs and addresses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A checked URL, split so that the connection can be pinned to an address."""

    scheme: str
    host: str  # lower-case ASCII name, or a canonical IP address (no brackets)
    port: int
    path: str  # path and query; never empty
    literal: IPAddress | None  # the host as an IP address, when it is one

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 80 if self.scheme == "http" else 443
        return host if self.port == default else f"{host}:{self.port}"

    def url_for(self, ip: IPAddress) -> str:
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def _ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host means when its last label is a number, as browsers (WHATWG URL) and
    inet_aton read it: `2130706433`, `0x7f.1`, `0177.0.0.1` and `127.1` are all 127.0.0.1. Without this a
    check could see a name where the resolver sees loopback. None when the host is not of that form;
    WebhookRefused when it is but is not a valid address."""
    parts = host.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if not parts or not _NUMERIC_LABEL.match(parts[-1]):
        return None
    numbers = []
    for part in parts:
        try:
            if part[:2].lower() == "0x":
                numbers.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part, 8))
            else:
                numbers.append(int(part, 10))
        except ValueError:
            raise WebhookRefused(f"invalid IPv4 address {host!r}") from None
    if len(numbers) > 4 or any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise WebhookRefused(f"invalid IPv4 address {host!r}")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _unmapped(ip: IPAddress) -> IPAddress:
    """`::ffff:a.b.c.d` is a.b.c.d on the wire: judge and connect to it as such."""
    return (ip.ipv4_mapped or ip) if ip.version == 6 else ip


def parse_url(url: str) -> Target:
    """Splits and validates a webhook URL (see check_syntax); raises WebhookRefused."""
    if not isinstance(url, str) or not url:
        raise WebhookRefused("the webhook URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    if any(c <= " " or c == "\x7f" for c in url):
        raise WebhookRefused("the webhook URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
        raw_host = parts.hostname
    except ValueError as e:
        raise WebhookRefused(f"invalid webhook URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused(f"webhook URL scheme must be http or https, not {parts.scheme or 'none'!r}")
    if "@" in parts.netloc:
        raise WebhookRefused("webhook URL must not contain credentials (user:password@)")
    if not raw_host:
        raise WebhookRefused("webhook URL has no host")
    if port == 0:
        raise WebhookRefused("webhook URL port must be 1-65535")
    port = port or (80 if parts.scheme == "http" else 443)
    literal: IPAddress | None
    if "[" in parts.netloc:
        try:
            literal = ipaddress.IPv6Address(raw_host)
        except ValueError:
            raise WebhookRefused(f"invalid IPv6 address {raw_host!r}") from None
        literal = _unmapped(literal)
        host = str(literal)
    else:
        try:
            host = raw_host.encode("idna").decode("ascii").lower().rstrip(".")
        except UnicodeError:
            raise WebhookRefused(f"invalid host name {raw_host!r}") from None
        literal = _ipv4_loose(host)
        if literal is not None:
            host = str(literal)
        elif not _NAME.match(host):
            raise WebhookRefused(f"invalid host name {raw_host!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port, path, literal)


def check_syntax(url: str) -> None:
    """Raises WebhookRefused unless `url` is http(s), has a host, has no user:password@, is at most
    2048 characters and has a port in 1-65535. Cheap and offline: call it when a job is submitted."""
    parse_url(url)


def refusal_reason(ip: IPAddress) -> str | None:
    """Why the service must not call `ip` unless an operator allows it (None: globally routable).
    IPv4-mapped IPv6 is judged as the IPv4 address it is; 6to4 and NAT64 by the IPv4 address they embed too,
    since `is_global` alone accepts e.g. multicast and 2002:7f00:1:: (6to4 of loopback)."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return refusal_reason(ip.ipv4_mapped)
        if ip in _NAT64_LOCAL:
            return "reserved (local-use NAT64)"
        embedded = ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None and (inner := refusal_reason(embedded)):
            return f"{inner} (embedded in {ip})"
    checks = (
        ("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast), ("shared address space (CGNAT)", ip.version == 4 and ip in _CGNAT),
        ("site-local", ip.version == 6 and ip.is_site_local), ("reserved", ip.is_reserved),
        ("private", ip.is_private), ("not globally routable", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


@dataclass(frozen=True)
class Allowlist:
    """Operator-approved exceptions to the address check: networks (`10.0.0.0/8`, `127.0.0.1`, `::1`) and
    host names (exact, or `*.example.com` for any name below example.com, not example.com itself).
    A listed name is trusted whatever it resolves to; a listed network covers exactly its addresses."""

    networks: tuple[IPNetwork, ...] = ()
    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".example.com" for "*.example.com"

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        """Raises ValueError naming the first entry that is neither a network nor a host name."""
        networks: list[IPNetwork] = []
        names: set[str] = set()
        suffixes: list[str] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry[2:] if entry.startswith("*.") else entry
            if not _NAME.match(name) or _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
                raise ValueError(f"webhook allowlist entry {raw!r} is neither a network nor a host name")
            if entry.startswith("*."):
                suffixes.append("." + name)
            else:
                names.add(name)
        return cls(tuple(networks), frozenset(names), tuple(suffixes))

    def allows_name(self, host: str) -> bool:
        return host in self.names or any(host.endswith(s) for s in self.suffixes)

    def allows_address(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks)


async def _getaddrinfo(host: str, port: int) -> list[str]:
    """The addresses of `host` by the event loop's resolver (a thread; tests replace this function)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def _resolve_target(target: Target, allow: Allowlist) -> list[IPAddress]:
    if target.literal is not None:
        found: list[IPAddress] = [target.literal]
    else:
        try:
            found = [ipaddress.ip_address(a) for a in await _getaddrinfo(target.host, target.port)]
        except (OSError, UnicodeError, ValueError) as e:
            raise WebhookRefused(f"cannot resolve {target.host!r}: {e}") from None
        found = list(dict.fromkeys(_unmapped(ip) for ip in found))
        if not found:
            raise WebhookRefused(f"cannot resolve {target.host!r}: no addresses")
    if target.literal is None and allow.allows_name(target.host):
        return found
    for ip in found:
        reason = refusal_reason(ip)
        if reason and not allow.allows_address(ip):
            raise WebhookRefused(f"{target.host!r} resolves to {ip}: {reason} addresses are not allowed")
    return found


async def resolve_checked(url: str, allow: Allowlist) -> list[IPAddress]:
    """The addresses `url`'s host resolves to (IPv4-mapped IPv6 as IPv4), all of them allowed; raises
    WebhookRefused for bad syntax, a failed resolution, or ANY address that is not globally routable and
    not in `allow` (refusing on any, not filtering, so a name cannot mix one public and one private answer)."""
    return await _resolve_target(parse_url(url), allow)


# --- delivery -----------------------------------------------------------------------------------------


@dataclass
class _Delivery:
    """One event for one job, across its attempts."""

    job_id: str
    event: str
    url: str
    body: bytes
    msg_id: str  # the webhook-id: the same on every retry, so receivers can deduplicate
    attempt: int = 0
    finished: bool = False  # a final on_attempt has been reported


class Deliverer:
    """Delivers job events to webhooks in background tasks; `send` never blocks nor raises.

    Each job's deliveries run one after another in the order sent (its `completed` never overtakes its
    `start`); different jobs run concurrently. At most `max_pending` deliveries are outstanding (waiting or
    in flight), so a slow receiver costs bounded memory. Progress is best effort: one attempt, at most one
    waiting per job (newer ones are dropped meanwhile, unreported), and only while the deliverer is at
    most half full, so a hanging receiver's progress cannot crowd out anyone's `start` or `completed`. Every attempt resolves and checks the host again and
    connects to the checked address, with `timeout_s` for the whole attempt. A 2xx is success; anything else
    is retried after backoff_s * 2**k (capped at max_backoff_s, with jitter), `attempts` tries in all,
    except a refused address, which is final. `on_attempt(job_id, event, attempt, ok, final, detail)` is
    called after each attempt (attempt 0: never tried, e.g. the queue was full or the URL is invalid).
    `transport` replaces httpx's network transport (tests)."""

    def __init__(self, secret: str | None, allow: Allowlist, *, timeout_s: float = 10.0, attempts: int = 5,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, max_pending: int = 1000,
                 on_attempt: OnAttempt | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if attempts < 1 or max_pending < 1 or timeout_s <= 0:
            raise ValueError("attempts and max_pending must be >= 1 and timeout_s > 0")
        self.key = secret_bytes(secret) if secret else None
        self.allow = allow
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_pending = max_pending
        self.on_attempt = on_attempt
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tails: dict[str, asyncio.Task[None]] = {}  # each job's last delivery
        self._progress: set[str] = set()  # jobs with a progress delivery waiting or in flight
        self._closed = False

    @property
    def pending(self) -> int:
        """Deliveries waiting or in flight."""
        return len(self._tasks)

    def send(self, job_id: str, url: str, event: str, data: dict, seq: int) -> bool:
        """Schedules one delivery (call from the event loop's thread); False, reported through on_attempt
        as a final attempt 0, when it is not scheduled: queue full, closed, unknown event or invalid URL."""
        try:
            if self._closed:
                return self._not_sent(job_id, event, "the webhook deliverer is closed")
            if event not in EVENTS:
                return self._not_sent(job_id, event, f"unknown webhook event {event!r}")
            if event == "progress":  # best effort: one waiting per job, a newer one is dropped meanwhile
                if job_id in self._progress or len(self._tasks) >= self.max_pending // 2:
                    return False
            elif len(self._tasks) >= self.max_pending:
                return self._not_sent(job_id, event, f"more than {self.max_pending} webhook deliveries pending")
            check_syntax(url)
            delivery = _Delivery(job_id, event, url, payload(event, data), f"{job_id}.{event}.{seq}")
            task = asyncio.get_running_loop().create_task(self._deliver(delivery, self._tails.get(job_id)))
        except WebhookRefused as e:
            return self._not_sent(job_id, event, f"refused: {e}")
        except Exception as e:  # e.g. no running loop: never raise into the job's code
            log.exception("webhook delivery not scheduled")
            return self._not_sent(job_id, event, f"not scheduled: {type(e).__name__}: {e}")
        self._tasks.add(task)
        self._tails[job_id] = task
        if event == "progress":
            self._progress.add(job_id)
        task.add_done_callback(lambda t: self._done(delivery, t))
        return True

    async def close(self, timeout_s: float) -> None:
        """Stops accepting deliveries, waits up to `timeout_s` for those outstanding, cancels the rest
        (each reported as a final failure) and closes the HTTP client."""
        self._closed = True
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=max(timeout_s, 0))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # internals

    def _not_sent(self, job_id: str, event: str, detail: str) -> bool:
        self._report(_Delivery(job_id, event, "", b"", ""), False, True, detail)
        return False

    def _done(self, delivery: _Delivery, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if delivery.event == "progress":
            self._progress.discard(delivery.job_id)
        if self._tails.get(delivery.job_id) is task:
            del self._tails[delivery.job_id]
        if task.cancelled():
            detail = "cancelled"
        elif task.exception() is not None:
            log.error("webhook delivery task failed", exc_info=task.exception())
            detail = f"internal error: {task.exception()!r}"
        else:
            return
        if not delivery.finished:  # e.g. cancelled by close() before or between attempts
            self._report(delivery, False, True, detail)

    def _report(self, delivery: _Delivery, ok: bool, final: bool, detail: str) -> None:
        delivery.finished = final
        if not ok and final:
            log.warning({"message": "webhook delivery failed", "job": delivery.job_id, "event": delivery.event,
                         "attempts": delivery.attempt, "detail": detail})
        if self.on_attempt is None:
            return
        try:
            self.on_attempt(delivery.job_id, delivery.event, delivery.attempt, ok, final, detail)
        except Exception:
            log.exception("webhook on_attempt callback failed")

    def _delay(self, failures: int) -> float:
        cap = min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))
        return random.uniform(cap / 2, cap)

    async def _deliver(self, delivery: _Delivery, after: asyncio.Task[None] | None) -> None:
        if after is not None:
            await asyncio.wait({after})  # keeps the job's order; never raises for `after`'s outcome
        attempts = 1 if delivery.event == "progress" else self.attempts  # progress is stale by a retry
        for attempt in range(1, attempts + 1):
            delivery.attempt = attempt
            ok, retry, detail = await self._attempt(delivery.url, delivery.body, delivery.msg_id)
            final = ok or not retry or attempt == attempts
            self._report(delivery, ok, final, detail)
            if final:
                return
            await asyncio.sleep(self._delay(attempt))

    async def _attempt(self, url: str, body: bytes, msg_id: str) -> tuple[bool, bool, str]:
        """(ok, worth retrying, detail) of one attempt, resolution included in its timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                target = parse_url(url)
                ips = await _resolve_target(target, self.allow)
                status = await self._post(target, ips[0], body, msg_id)
        except WebhookRefused as e:
            return False, False, f"refused: {e}"
        except (TimeoutError, httpx.TimeoutException):
            return False, True, f"timed out after {self.timeout_s:g}s"
        except httpx.HTTPError as e:
            return False, True, f"{type(e).__name__}: {e}"
        except Exception as e:
            log.exception("webhook attempt failed unexpectedly")
            return False, True, f"{type(e).__name__}: {e}"
        return (True, False, f"HTTP {status}") if 200 <= status < 300 else (False, True, f"HTTP {status}")

    async def _post(self, target: Target, ip: IPAddress, body: bytes, msg_id: str) -> int:
        """POSTs to `ip` itself (the address that passed the check), the name going only in Host and SNI,
        so TLS still verifies the certificate against the name. The body of the answer is never read."""
        timestamp = int(time.time())
        headers = {"host": target.host_header, "content-type": "application/json", "user-agent": USER_AGENT,
                   "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
        if self.key is not None:
            headers["webhook-signature"] = sign(self.key, msg_id, timestamp, body)
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        client = self._http()
        request = client.build_request("POST", target.url_for(ip), headers=headers, content=body,
                                       extensions=extensions)
        response = await client.send(request, stream=True)
        await response.aclose()
        return response.status_code

    def _http(self) -> httpx.AsyncClient:
        """The shared client: no redirects, no proxies from the environment (they would bypass the pinned
        address), no cookies kept, and no kept-alive connections (a pooled TLS connection is keyed by IP
        and could otherwise carry a request for another name than the one its certificate was checked for)."""
        if self._client is None:
            jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s), follow_redirects=False, trust_env=False, cookies=jar,
                limits=httpx.Limits(max_keepalive_connections=0), transport=self._transport)
        return self._client
