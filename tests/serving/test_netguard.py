"""The SSRF guard on real sockets: every refused URL is refused before any connection reaches a
loopback listener that counts them; allowed hosts are reached at the address that was checked."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.errors import FetchFailed, InvalidUrl, PayloadTooLarge, UnsafeUrl
from serving.netguard import (
    Resolver,
    UrlPolicy,
    blocked_reason,
    check_public_url,
    fetch_public,
    guarded_client,
    parse_url,
    resolve_checked,
    system_resolver,
)


class TrapListener:
    """A TCP listener on 127.0.0.1 and ::1 that must never be connected to; it counts accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self.port_v4 = self._listen(socket.AF_INET, "127.0.0.1")
        self.port_v6 = self._listen(socket.AF_INET6, "::1")
        self._threads = [threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self._sockets]
        for thread in self._threads:
            thread.start()

    def _listen(self, family: int, host: str) -> int:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((host, 0))
        sock.listen(16)
        sock.settimeout(0.05)  # lets the accept loop notice `close()`
        self._sockets.append(sock)
        return int(sock.getsockname()[1])

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def trap() -> Iterator[TrapListener]:
    listener = TrapListener()
    yield listener
    listener.close()


@dataclass
class Route:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    send_length: bool = True
    stall: threading.Event | None = None  # headers sent, then the body waits for this event


class HttpServer:
    """A real HTTP/1.1 server on a loopback address, answering per path; records Host headers."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = {}
        self.hosts_seen: list[str] = []
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                outer.requests += 1
                outer.hosts_seen.append(self.headers.get("Host", ""))
                route = outer.routes.get(self.path.split("?")[0], Route(status=404, body=b"no"))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                if route.stall is not None:
                    self.wfile.flush()
                    route.stall.wait(timeout=30)
                try:
                    self.wfile.write(route.body)
                except OSError:
                    pass  # the client gave up first: what the test wanted
                if not route.send_length:
                    self.close_connection = True

            do_GET = _answer  # noqa: N815
            do_POST = _answer  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        for route in self.routes.values():
            if route.stall is not None:
                route.stall.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    server = HttpServer()
    yield server
    server.close()


@pytest.fixture
def public_server() -> Iterator[HttpServer]:
    """Stands in for a server on the internet: it listens on 127.0.0.2, which the policies below
    trust explicitly, while the rest of loopback stays refused."""
    server = HttpServer("127.0.0.2")
    yield server
    server.close()


def static_resolver(table: dict[str, Sequence[str]]) -> Resolver:
    async def resolve(host: str) -> Sequence[str]:
        return table[host]

    return resolve


PUBLIC_TRUST = (ipaddress.ip_network("127.0.0.2/32"),)


def ssrf_cases(trap: TrapListener, public: HttpServer) -> list[tuple[str, str]]:
    p4, p6 = trap.port_v4, trap.port_v6
    public_base = f"http://images.example.com:{public.port}"
    public.routes["/to-loopback"] = Route(status=302, headers={"Location": f"http://127.0.0.1:{p4}/x.png"})
    public.routes["/to-metadata"] = Route(status=307, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
    public.routes["/to-file"] = Route(status=301, headers={"Location": "file:///etc/passwd"})
    public.routes["/to-private-name"] = Route(status=302, headers={"Location": f"http://internal.example:{p4}/"})
    return [
        ("loopback", f"http://127.0.0.1:{p4}/x.png"),
        ("ipv6 loopback", f"http://[::1]:{p6}/x.png"),
        ("ipv4-mapped loopback", f"http://[::ffff:127.0.0.1]:{p4}/x.png"),
        ("ipv4-compatible loopback", f"http://[::127.0.0.1]:{p4}/x.png"),
        ("nat64 loopback", f"http://[64:ff9b::7f00:1]:{p4}/"),
        ("6to4 loopback", f"http://[2002:7f00:1::]:{p4}/"),
        ("unspecified", f"http://0.0.0.0:{p4}/x.png"),
        ("ipv6 unspecified", f"http://[::]:{p6}/x.png"),
        ("decimal loopback", f"http://2130706433:{p4}/x.png"),
        ("octal loopback", f"http://0177.0.0.1:{p4}/x.png"),
        ("hex loopback", f"http://0x7f.0.0.1:{p4}/x.png"),
        ("hex integer loopback", f"http://0x7f000001:{p4}/x.png"),
        ("short loopback", f"http://127.1:{p4}/x.png"),
        ("10/8", "http://10.0.0.1/x.png"),
        ("172.16/12", "http://172.16.5.4/x.png"),
        ("192.168/16", "http://192.168.1.1/x.png"),
        ("metadata", "http://169.254.169.254/latest/meta-data/"),
        ("ipv4-mapped metadata", "http://[::ffff:169.254.169.254]/latest/"),
        ("cgnat", "http://100.64.0.1/"),
        ("ula fd00::/8", "http://[fd00::1]/x.png"),
        ("ipv6 link-local", "http://[fe80::1]/x.png"),
        ("multicast", "http://224.0.0.1/"),
        ("broadcast", "http://255.255.255.255/"),
        ("localhost name", f"http://localhost:{p4}/x.png"),
        ("name resolving to private", f"http://internal.example:{p4}/x.png"),
        ("name with a public and a private record", f"http://mixed.example:{p4}/x.png"),
        ("redirect to loopback", f"{public_base}/to-loopback"),
        ("redirect to metadata", f"{public_base}/to-metadata"),
        ("redirect to file", f"{public_base}/to-file"),
        ("redirect to a private name", f"{public_base}/to-private-name"),
        ("file scheme", "file:///etc/passwd"),
        ("gopher scheme", f"gopher://127.0.0.1:{p4}/_SET"),
        ("ftp scheme", "ftp://example.com/x.png"),
        ("no host", "http:///x.png"),
    ]


RESOLVER_TABLE = {
    "images.example.com": ["127.0.0.2"],
    "internal.example": ["10.1.2.3", "127.0.0.1"],
    "mixed.example": ["93.184.216.34", "127.0.0.1"],
}


async def test_ssrf_table_is_refused_before_any_connection(trap: TrapListener, public_server: HttpServer) -> None:
    policy = UrlPolicy(allow_http=True, allowed_networks=PUBLIC_TRUST, resolver=static_resolver(RESOLVER_TABLE))
    refused: list[str] = []
    for name, url in ssrf_cases(trap, public_server):
        with pytest.raises(UnsafeUrl) as info:
            await fetch_public(url, max_bytes=1 << 20, timeout_s=5, policy=policy)
        # Malformed rather than forbidden: no host at all, and an octal IPv4 that httpx cannot parse.
        expected = "invalid_url" if name in ("no host", "octal loopback") else "unsafe_url"
        assert info.value.code == expected and info.value.status == 422, name
        refused.append(name)
    assert len(refused) >= 30
    assert trap.accepted == 0
    # The redirecting "public" server was reached (so the refusal really was at the second hop).
    assert public_server.requests == 4


async def test_check_public_url_applies_the_same_table(trap: TrapListener, public_server: HttpServer) -> None:
    resolver = static_resolver(RESOLVER_TABLE)
    for name, url in ssrf_cases(trap, public_server):
        if "redirect" in name:
            continue  # a single URL check cannot see where a server will redirect
        with pytest.raises(UnsafeUrl):
            await check_public_url(url, allow_http=True, resolver=resolver)
    await check_public_url("https://images.example.com/x.png", resolver=static_resolver({"images.example.com": ["93.184.216.34"]}))
    assert trap.accepted == 0


async def test_https_only_unless_http_is_allowed(trap: TrapListener) -> None:
    resolver = static_resolver({"cdn.example": ["93.184.216.34"]})
    with pytest.raises(UnsafeUrl, match="scheme 'http'"):
        await check_public_url("http://cdn.example/x.png", resolver=resolver)
    await check_public_url("https://cdn.example/x.png", resolver=resolver)
    await check_public_url("http://cdn.example/x.png", allow_http=True, resolver=resolver)


def test_address_classification() -> None:
    refused = ["127.0.0.1", "10.9.8.7", "172.31.255.255", "192.168.0.1", "169.254.169.254", "100.127.0.1",
               "0.0.0.0", "224.0.0.251", "240.0.0.1", "::1", "::", "fd12:3456::1", "fe80::1", "ff02::1",
               "::ffff:10.0.0.1", "::ffff:8.8.8.8", "2001:db8::1", "192.0.0.192"]
    allowed = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"]
    for text in refused:
        assert blocked_reason(ipaddress.ip_address(text)) is not None, text
    for text in allowed:
        assert blocked_reason(ipaddress.ip_address(text)) is None, text
    assert blocked_reason(ipaddress.ip_address("127.0.0.1"), UrlPolicy(allow_private=True)) is None


async def test_connection_is_pinned_to_the_checked_address_with_host_preserved(http_server: HttpServer) -> None:
    http_server.routes["/cat.png"] = Route(body=b"\x89PNG fake")
    resolver = static_resolver({"cdn.example": ["127.0.0.1"]})
    body = await fetch_public(
        f"http://cdn.example:{http_server.port}/cat.png", max_bytes=100, timeout_s=5,
        allow_http=True, allow_private=True, resolver=resolver,
    )
    assert body == b"\x89PNG fake"
    assert http_server.hosts_seen == [f"cdn.example:{http_server.port}"]


async def test_dns_rebinding_is_refused_at_connect_time(trap: TrapListener) -> None:
    """The first resolution (the up-front check) sees a public address, the next one (when the
    transport connects) a loopback one: the connection is refused, nothing reaches loopback."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])

    async def rebinding(host: str) -> Sequence[str]:
        return next(answers)

    with pytest.raises(UnsafeUrl):
        await fetch_public(f"http://rebind.example:{trap.port_v4}/x.png", max_bytes=100, timeout_s=5,
                           allow_http=True, resolver=rebinding)
    assert trap.accepted == 0


async def test_redirects_are_followed_at_most_three_times(public_server: HttpServer) -> None:
    base = f"http://images.example.com:{public_server.port}"
    for hop in range(4):
        public_server.routes[f"/r{hop}"] = Route(status=302, headers={"Location": f"/r{hop + 1}"})
    public_server.routes["/r4"] = Route(body=b"done")
    policy = UrlPolicy(allow_http=True, allowed_networks=PUBLIC_TRUST, resolver=static_resolver(RESOLVER_TABLE))
    assert await fetch_public(f"{base}/r1", max_bytes=100, timeout_s=5, policy=policy) == b"done"  # 3 redirects
    with pytest.raises(FetchFailed) as info:
        await fetch_public(f"{base}/r0", max_bytes=100, timeout_s=5, policy=policy)  # 4 redirects
    assert info.value.code == "too_many_redirects"


async def test_size_limit_while_streaming(http_server: HttpServer) -> None:
    http_server.routes["/declared"] = Route(body=b"x" * 5000)
    http_server.routes["/undeclared"] = Route(body=b"x" * 5000, send_length=False)
    for path in ("/declared", "/undeclared"):
        with pytest.raises(PayloadTooLarge):
            await fetch_public(f"http://127.0.0.1:{http_server.port}{path}", max_bytes=4096, timeout_s=5,
                               allow_http=True, allow_private=True)
    ok = await fetch_public(f"http://127.0.0.1:{http_server.port}/declared", max_bytes=5000, timeout_s=5,
                            allow_http=True, allow_private=True)
    assert len(ok) == 5000


async def test_time_limit_covers_a_stalled_body(http_server: HttpServer) -> None:
    http_server.routes["/slow"] = Route(body=b"x" * 10, stall=threading.Event())
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(FetchFailed) as info:
        await fetch_public(f"http://127.0.0.1:{http_server.port}/slow", max_bytes=100, timeout_s=0.5,
                           allow_http=True, allow_private=True)
    assert info.value.code == "fetch_timeout"
    assert loop.time() - started < 5


async def test_http_error_status_is_a_fetch_failure(http_server: HttpServer) -> None:
    with pytest.raises(FetchFailed, match="HTTP 404"):
        await fetch_public(f"http://127.0.0.1:{http_server.port}/missing", max_bytes=100, timeout_s=5,
                           allow_http=True, allow_private=True)


async def test_guarded_client_for_webhook_posts(trap: TrapListener, http_server: HttpServer) -> None:
    http_server.routes["/hook"] = Route(status=204, body=b"")
    http_server.routes["/moved"] = Route(status=302, headers={"Location": f"http://127.0.0.1:{trap.port_v4}/"})
    async with guarded_client(timeout_s=5, allow_http=True) as client:
        with pytest.raises(UnsafeUrl):
            await client.post(f"http://127.0.0.1:{trap.port_v4}/hook", json={"a": 1})
        with pytest.raises(UnsafeUrl):
            await client.post(f"http://[::1]:{trap.port_v6}/hook", json={"a": 1})
    assert trap.accepted == 0
    resolver = static_resolver({"hooks.example": ["127.0.0.1"]})
    async with guarded_client(timeout_s=5, allow_http=True, allow_private=True, resolver=resolver) as client:
        sent = await client.post(f"http://hooks.example:{http_server.port}/hook", json={"a": 1})
        assert sent.status_code == 204
        moved = await client.post(f"http://hooks.example:{http_server.port}/moved", json={"a": 1})
        assert moved.status_code == 302  # never followed
    assert trap.accepted == 0
    assert http_server.hosts_seen == [f"hooks.example:{http_server.port}"] * 2


async def test_proxy_variables_cannot_route_around_the_guard(
    trap: TrapListener, public_server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = f"http://127.0.0.1:{trap.port_v4}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    public_server.routes["/x.png"] = Route(body=b"img")
    policy = UrlPolicy(allow_http=True, allowed_networks=PUBLIC_TRUST, resolver=static_resolver(RESOLVER_TABLE))
    body = await fetch_public(f"http://images.example.com:{public_server.port}/x.png", max_bytes=100, timeout_s=5,
                              policy=policy)
    assert body == b"img" and trap.accepted == 0


async def test_policy_from_settings() -> None:
    from serving.settings import Settings

    dev = UrlPolicy.from_settings(Settings())
    assert dev.allow_http and not dev.allow_private and dev.allowed_networks == ()
    prod = UrlPolicy.from_settings(
        Settings(environment="production", url_signing_secret="s3cret-value", api_keys="a:b",  # type: ignore[arg-type]
                 outbound_allowed_networks=["10.20.0.0/16"])
    )
    assert not prod.allow_http and prod.allowed_networks == (ipaddress.ip_network("10.20.0.0/16"),)
    assert blocked_reason(ipaddress.ip_address("10.20.1.1"), prod) is None
    assert blocked_reason(ipaddress.ip_address("10.21.1.1"), prod) is not None


# Host names that break IDNA or DNS: each used to escape as a UnicodeError (a 500) from httpx's
# host decoding or from the resolver's IDNA codec.
MALFORMED_HOSTS = [
    ("64-character label", "http://" + "a" * 64 + ".example.com/x.png", "longer than 63"),
    ("empty label", "http://a..example.com/", "empty label"),
    ("leading dot", "http://.example.com/", "empty label"),
    ("invalid punycode", "http://xn--a.com/", "IDNA"),
    ("punycode of a disallowed code point", "http://xn--n3h.com/", "IDNA"),  # U+2603 SNOWMAN
    ("name over 253 characters", "http://" + ("a" * 60 + ".") * 5 + "com/", "longer than 253"),
    ("percent in the host", "http://ex%00ample.com/", "not a valid host name"),
    ("space in the host", "http://exa mple.com/", "not a valid host name"),
    ("hyphen at a label's start", "http://-a.example.com/", "not a valid host name"),
    ("port out of range", "http://example.com:99999/", "port"),
    ("unbalanced bracket", "http://[::1/", "not a valid absolute URL"),
    ("NUL in the URL", "http://exa\x00mple.com/", "not a valid absolute URL"),
]


@pytest.mark.parametrize("case,url,reason", MALFORMED_HOSTS, ids=[c[0] for c in MALFORMED_HOSTS])
async def test_malformed_hosts_are_invalid_urls_before_any_lookup(
    case: str, url: str, reason: str, trap: TrapListener
) -> None:
    looked_up: list[str] = []

    async def recording(host: str) -> Sequence[str]:
        looked_up.append(host)
        return ["93.184.216.34"]

    with pytest.raises(InvalidUrl, match=reason) as parsed:
        parse_url(url)
    assert parsed.value.code == "invalid_url" and parsed.value.status == 422
    with pytest.raises(InvalidUrl, match=reason):
        await check_public_url(url, allow_http=True, resolver=recording)  # the webhookUrl path
    with pytest.raises(InvalidUrl, match=reason):
        await fetch_public(url, max_bytes=100, timeout_s=5, allow_http=True, resolver=recording)  # imageUrl
    assert looked_up == [] and trap.accepted == 0


async def test_well_formed_unusual_hosts_still_pass() -> None:
    for url, host in (("https://caf\u00e9.example/x.png", "xn--caf-dma.example"),
                      ("https://xn--caf-dma.example/x.png", "xn--caf-dma.example"),
                      ("https://_srv.example.com./x", "_srv.example.com."),
                      ("https://" + "a" * 63 + ".example/x", "a" * 63 + ".example"),
                      ("http://[2606:4700:4700::1111]:8443/x", "2606:4700:4700::1111")):
        assert parse_url(url).raw_host.decode() == host


async def test_resolvers_never_see_a_malformed_name() -> None:
    """The transport hands resolve_checked the host of each connection; a name that slipped past
    the URL checks is still refused there, and the system resolver's IDNA errors are 422s too."""
    for host in ("a..example.com", "a" * 64 + ".example.com"):
        with pytest.raises(InvalidUrl):
            await resolve_checked(host, UrlPolicy())
        with pytest.raises(InvalidUrl):
            await system_resolver(host)
