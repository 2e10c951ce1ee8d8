"""Outbound HTTP that cannot be turned against our own network (SSRF guard).

Every URL a user gives us (`imageUrl`, `webhookUrl`) goes through here. The rules:

- only `https` (plus `http` where the caller allows it: development mode);
- every address the host resolves to (A and AAAA) must be public: loopback, private, link-local
  (cloud metadata at 169.254.169.254), CGNAT, IPv6 unique-local, unspecified, multicast, reserved,
  documentation and the IPv4-in-IPv6 forms of all of these are refused;
- the TCP connection goes to the address that was checked: the resolution happens inside the
  transport, once per connection, so DNS rebinding between check and connect is impossible;
  TLS still verifies the certificate for the URL's host name (SNI and `Host` are preserved);
- redirects are followed by hand, each hop checked again, at most `MAX_REDIRECTS`;
- bodies are streamed with a byte limit and the whole exchange with a deadline.

Every user URL is read by one parser, `parse_url`: a URL that is not well formed, or whose host
no resolver would accept (an empty label as in `a..example.com`, a label over 63 characters,
`xn--` labels that are not valid IDNA, characters outside letters, digits, `-` and `_`), is refused
with `InvalidUrl` (422 `invalid_url`) before anything is resolved; what is well formed but not
allowed gets `UnsafeUrl` (422 `unsafe_url`).

Public API: `parse_url`, `check_public_url`, `fetch_public`, `guarded_client`, `UrlPolicy`,
`Resolver`, `UnsafeUrl` and `InvalidUrl` (`serving.errors`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

from serving.errors import FetchFailed, InvalidUrl, PayloadTooLarge, UnsafeUrl

if TYPE_CHECKING:
    from serving.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Resolves a host name to its addresses (A and AAAA). Tests inject one to make a name resolve
# to whatever they need without touching /etc/hosts or real DNS.
Resolver = Callable[[str], Awaitable[Sequence[str]]]

MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# A DNS name (RFC 1035, as resolvers take it): at most 253 characters without the final dot,
# labels of 1 to 63 letters, digits, hyphens (not at either end) and underscores (SRV-style
# names that resolvers accept).
MAX_HOST_NAME = 253
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")

# Ranges refused on top of what `ipaddress` already calls non-global: spelled out so that the
# policy does not depend on the Python patch release (3.11.x changed `is_private` twice).
_BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches localhost on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # CGNAT (carrier-grade NAT, also used inside some clusters)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata at 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments (incl. 192.0.0.192 Oracle metadata)
        "192.0.2.0/24",
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. 255.255.255.255
        "::/128",
        "::1/128",
        "::ffff:0:0/96",  # IPv4-mapped: checked again as IPv4 below, and refused as a form
        "64:ff9b::/96",  # NAT64 (well-known prefix)
        "64:ff9b:1::/48",  # NAT64 (local use)
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments (incl. Teredo 2001::/32)
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4: embeds an IPv4 address
        "fc00::/7",  # unique local (fd00::/8 in practice)
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
    )
)


@dataclass(frozen=True)
class UrlPolicy:
    """What an outbound request may reach. The defaults are the production rules."""

    allow_http: bool = False
    allow_private: bool = False  # tests and local development against loopback servers
    # Networks an operator trusts explicitly (an in-cluster webhook receiver, say).
    allowed_networks: tuple[IPNetwork, ...] = ()
    resolver: Resolver | None = field(default=None, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, resolver: Resolver | None = None) -> UrlPolicy:
        allow_http = settings.allow_http_urls
        if allow_http is None:
            allow_http = settings.environment == "development"
        return cls(
            allow_http=allow_http,
            allow_private=settings.allow_private_urls,
            allowed_networks=tuple(ipaddress.ip_network(n, strict=False) for n in settings.outbound_allowed_networks),
            resolver=resolver,
        )


def _policy(
    policy: UrlPolicy | None, allow_http: bool | None, allow_private: bool | None, resolver: Resolver | None
) -> UrlPolicy:
    base = policy or UrlPolicy()
    return UrlPolicy(
        allow_http=base.allow_http if allow_http is None else allow_http,
        allow_private=base.allow_private if allow_private is None else allow_private,
        allowed_networks=base.allowed_networks,
        resolver=resolver or base.resolver,
    )


# Address checks ------------------------------------------------------------------------------


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in an IPv4-mapped, IPv4-compatible, 6to4 or NAT64 IPv6 address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    packed = address.packed
    if packed[:12] == bytes(12) and packed[12:] != bytes(4) and int(address) > 1:
        return ipaddress.IPv4Address(packed[12:])  # deprecated IPv4-compatible ::a.b.c.d
    if address in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(packed[12:])
    return None


def blocked_reason(address: IPAddress, policy: UrlPolicy = UrlPolicy()) -> str | None:
    """Why `address` may not be reached under `policy`, or None when it may."""
    if any(address in net for net in policy.allowed_networks if net.version == address.version):
        return None
    if policy.allow_private:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "a scoped (link-local) IPv6 address"
        inner = _embedded_ipv4(address)
        if inner is not None:
            return f"an IPv6 form of {inner}" if blocked_reason(inner, policy) else "an IPv4-in-IPv6 address"
    for net in _BLOCKED_NETWORKS:
        if net.version == address.version and address in net:
            return f"a non-public address ({net})"
    if not address.is_global or address.is_multicast or address.is_reserved:
        return "a non-public address"
    return None


def _literal_address(host: str) -> IPAddress | None:
    """The address a host string denotes by itself, including legacy numeric IPv4 forms
    (2130706433, 0x7f.1, 0177.0.0.1) that C resolvers accept and would happily connect to."""
    candidate = host.strip("[]")
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        pass
    if candidate and all(c in "0123456789abcdefxABCDEFX." for c in candidate) and any(c.isdigit() for c in candidate):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(candidate))
        except OSError:
            return None
    return None


async def system_resolver(host: str) -> Sequence[str]:
    """A and AAAA records through the system resolver (getaddrinfo, off the event loop)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchFailed(f"The host {host!r} could not be resolved.", code="unresolvable_host") from exc
    except UnicodeError as exc:  # the socket module's IDNA codec; `check_host_name` refuses these first
        raise InvalidUrl(f"The host {host!r} is not a valid host name.") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def resolve_checked(host: str, policy: UrlPolicy) -> list[IPAddress]:
    """Every address `host` resolves to, all of them allowed by `policy`; else `UnsafeUrl`.

    One refused address refuses the host: a name with a public and a private record could
    otherwise steer the connection to whichever the attacker likes."""
    literal = _literal_address(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        check_host_name(host)
        if host.rstrip(".").lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
            if not policy.allow_private:
                raise UnsafeUrl(f"The host {host!r} is local; only public addresses may be fetched.")
        raw = await (policy.resolver or system_resolver)(host)
        addresses = []
        for item in raw:
            try:
                addresses.append(ipaddress.ip_address(item))
            except ValueError as exc:
                raise UnsafeUrl(f"The host {host!r} resolved to something that is not an address.") from exc
        if not addresses:
            raise FetchFailed(f"The host {host!r} has no addresses.", code="unresolvable_host")
    for address in addresses:
        reason = blocked_reason(address, policy)
        if reason:
            where = f"The URL points at {reason}" if literal is not None else f"The host {host!r} resolves to {reason}"
            raise UnsafeUrl(f"{where}; only public addresses may be fetched.")
    return addresses


# URL checks ----------------------------------------------------------------------------------


def check_host_name(host: str) -> str:
    """`host` (ASCII form) if it is an IP address or a host name a resolver accepts; else
    `InvalidUrl` saying what is wrong with it."""
    if _literal_address(host) is not None:
        return host
    name = host[:-1] if host.endswith(".") else host
    if not name:
        raise InvalidUrl("The URL has no host.")
    shown = name if len(name) <= 80 else name[:77] + "..."
    if len(name) > MAX_HOST_NAME:
        raise InvalidUrl(f"The host {shown!r} is longer than {MAX_HOST_NAME} characters.")
    for label in name.split("."):
        if not label:
            raise InvalidUrl(f"The host {shown!r} has an empty label (two dots in a row, or a leading dot).")
        if len(label) > 63:
            raise InvalidUrl(f"The host {shown!r} has a label longer than 63 characters.")
        if not _HOST_LABEL.fullmatch(label):
            raise InvalidUrl(
                f"The host {shown!r} is not a valid host name: labels hold letters, digits, '-' and '_', "
                "and do not start or end with '-'."
            )
    return host


def parse_url(url: str | httpx.URL) -> httpx.URL:
    """The one parser of user-supplied URLs: an `httpx.URL` whose host (if any) is a valid IP
    address or host name and whose port is in range; anything else raises `InvalidUrl`. The
    scheme is not judged here (`check_url_syntax` does, under a policy)."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        raw_host = parsed.raw_host.decode("ascii")  # IDNA-encoded by httpx: xn-- labels
        port = parsed.port
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
        raise InvalidUrl("The URL is not a valid absolute URL.") from exc
    if raw_host:
        check_host_name(raw_host)
        try:
            _ = parsed.host  # decodes the xn-- labels: refuses punycode that is not valid IDNA
        except (UnicodeError, ValueError) as exc:
            raise InvalidUrl(f"The host {raw_host[:80]!r} is not a valid internationalized (IDNA) name.") from exc
    if port is not None and not 0 < port < 65536:
        raise InvalidUrl("The URL's port is not valid.")
    return parsed


def host_of(url: httpx.URL) -> str:
    """The host as resolvers take it (ASCII, IDNA-encoded) of a URL from `parse_url`."""
    return url.raw_host.decode("ascii")


def check_url_syntax(url: str | httpx.URL, policy: UrlPolicy) -> httpx.URL:
    """Scheme, host and port checks that need no DNS. Returns the parsed URL."""
    parsed = parse_url(url)
    allowed = ("https", "http") if policy.allow_http else ("https",)
    if parsed.scheme not in allowed:
        wanted = " or ".join(allowed)
        raise UnsafeUrl(f"URLs with scheme {parsed.scheme or 'none'!r} are refused; use {wanted}.")
    if not parsed.raw_host:
        raise InvalidUrl("The URL has no host.")
    return parsed


def _redirect_target(current: httpx.URL, location: str, policy: UrlPolicy) -> httpx.URL:
    try:
        target = current.join(location)
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
        raise InvalidUrl("The server redirected to a URL that is not valid.") from exc
    return check_url_syntax(target, policy)


async def check_public_url(
    url: str,
    *,
    allow_http: bool | None = None,
    allow_private: bool | None = None,
    policy: UrlPolicy | None = None,
    resolver: Resolver | None = None,
) -> None:
    """Raise `UnsafeUrl` unless `url` may be fetched now (scheme, host, every resolved address).

    Use it to refuse a `webhookUrl` at submission; the transport checks again on every
    connection, so a host that changes its DNS later is still refused then."""
    effective = _policy(policy, allow_http, allow_private, resolver)
    parsed = check_url_syntax(url, effective)
    await resolve_checked(host_of(parsed), effective)


# The pinned transport ------------------------------------------------------------------------


class _PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks the host itself, then connects to one of the checked addresses."""

    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve_checked(host, self._policy)
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None  # addresses is never empty
        raise last_error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeUrl("Unix sockets are never reached through user-supplied URLs.")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """An httpx transport whose every connection passes `resolve_checked` (see module doc)."""

    def __init__(self, policy: UrlPolicy, *, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits(max_connections=20, max_keepalive_connections=10)
        # trust_env=False: an HTTP(S)_PROXY variable must not route user URLs around the guard.
        super().__init__(trust_env=False, limits=limits)
        self._policy = policy
        # httpx has no hook for httpcore's network backend, so the pool it built is replaced by
        # one built the same way (verified TLS, same limits) with the pinning backend plugged in.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedNetworkBackend(policy),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        check_url_syntax(request.url, self._policy)
        return await super().handle_async_request(request)


def guarded_client(
    *,
    timeout_s: float,
    allow_http: bool | None = None,
    allow_private: bool | None = None,
    policy: UrlPolicy | None = None,
    resolver: Resolver | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for user-supplied URLs (webhook POSTs): every connection is checked
    and pinned, redirects are never followed, proxies from the environment are ignored.
    Requests to refused URLs raise `UnsafeUrl` before any connection is made."""
    effective = _policy(policy, allow_http, allow_private, resolver)
    return httpx.AsyncClient(
        transport=GuardedTransport(effective),
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers=headers,
    )


async def fetch_public(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_http: bool | None = None,
    allow_private: bool | None = None,
    policy: UrlPolicy | None = None,
    resolver: Resolver | None = None,
    max_redirects: int = MAX_REDIRECTS,
) -> bytes:
    """GET `url` and return its body: at most `max_bytes` (else `PayloadTooLarge`), within
    `timeout_s` in all (else `FetchFailed`), redirects re-checked (at most `max_redirects`).
    Raises `UnsafeUrl` for a URL, or a redirect target, that the policy refuses."""
    effective = _policy(policy, allow_http, allow_private, resolver)
    current = check_url_syntax(url, effective)
    try:
        async with asyncio.timeout(timeout_s), guarded_client(timeout_s=timeout_s, policy=effective) as client:
            for _ in range(max_redirects + 1):
                await resolve_checked(host_of(current), effective)  # a clear refusal before connecting
                # identity: a compressed body could expand far past max_bytes within one chunk
                async with client.stream("GET", current, headers={"Accept-Encoding": "identity"}) as response:
                    if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                        current = _redirect_target(current, response.headers["location"], effective)
                        continue
                    if response.status_code != 200:
                        raise FetchFailed(f"The server answered HTTP {response.status_code}.")
                    return await _read_limited(response, max_bytes)
            raise FetchFailed(f"More than {max_redirects} redirects.", code="too_many_redirects")
    except TimeoutError as exc:
        raise FetchFailed(f"No complete answer within {timeout_s:g} s.", code="fetch_timeout") from exc
    except httpx.TimeoutException as exc:
        raise FetchFailed(f"No complete answer within {timeout_s:g} s.", code="fetch_timeout") from exc
    except httpx.HTTPError as exc:
        raise FetchFailed(f"The request failed ({type(exc).__name__}).") from exc


async def _read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"The body is larger than the {max_bytes}-byte limit.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"The body is larger than the {max_bytes}-byte limit.")
        chunks.append(chunk)
    return b"".join(chunks)
