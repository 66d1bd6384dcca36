"""The outbound-URL guard (SPEC §6): which URLs Parley may call, checked at registration and at connect time.

`check_url` vets a URL when it is registered (webhook endpoints, webhook tools). `guarded_client` returns
an `httpx2.AsyncClient` whose every TCP connection goes through `GuardedBackend`: the host is resolved
once, *every* address it resolves to is vetted, and the socket is opened to a vetted IP literal, so a
DNS answer that changes between registration and delivery (DNS rebinding) cannot reach a private
address. Redirects are never followed and proxies from the environment are ignored (a proxy would make
the connect-time check vet the proxy instead of the target).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import urlsplit

import anyio
import httpcore2
import httpx2

from app.domain.errors import ValidationFailed
from app.hostnames import is_host_name

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
DEFAULT_MAX_CONNECTIONS = 100
# A registration's DNS look-ups are given this long; one that takes longer counts as a name that does not resolve now.
RESOLVE_SECONDS = 3.0
MAX_PENDING_LOOKUPS = 16
_pending_lookups = threading.BoundedSemaphore(MAX_PENDING_LOOKUPS)

# Dotted-quad with no leading zeros is the only IPv4 spelling we accept; anything else that libc would
# still read as an address (2130706433, 0x7f000001, 0177.0.0.1, 127.1) is ambiguous across parsers.
_CANONICAL_IPV4 = re.compile(r"^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$")
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|\d+)(\.(0x[0-9a-f]*|\d+)){0,3}\.?$", re.IGNORECASE)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 8215 local-use translation: where the IPv4 address sits depends on the operator's prefix length
# (/48 to /96), so the address it reaches cannot be told; never public.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
# IETF protocol assignments (RFC 6890): not global, though older Python tables call some of it global.
_IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")


class GuardSettings(Protocol):
    allow_private_urls: bool
    allow_http_urls: bool


class BlockedAddress(httpcore2.ConnectError):
    """A connection refused by the guard because the host resolves to a non-public address."""


def _fail(message: str) -> ValidationFailed:
    return ValidationFailed.field("url", message)


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (the pure decision behind the guard)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return False  # ::ffff:a.b.c.d reaches an IPv4 host through the v6 stack; never allowed
        if ip.sixtofour is not None or ip.teredo is not None:
            return False
        if ip in _NAT64_LOCAL:
            return False
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.is_site_local:
            return False
    else:
        if ip in _CGNAT or ip in _IETF_PROTOCOL:
            return False
    if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return False
    return ip.is_global


def _literal_ip(host: str) -> IPAddress | None:
    """The address a host names literally, or None for a DNS name. Raises for non-canonical IPv4 spellings."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare:
        try:
            return ipaddress.IPv6Address(bare.split("%", 1)[0])
        except ValueError:
            raise _fail("is not a valid IPv6 address") from None
    if _CANONICAL_IPV4.fullmatch(bare):
        return ipaddress.IPv4Address(bare)
    if _NUMERIC_HOST.match(bare) or bare.rstrip(".").split(".")[-1].isdigit():
        # 2130706433, 0x7f.1, 0177.0.0.1, 127.1, 10.0.0.010 ...: libc reads these as addresses.
        raise _fail("uses a non-canonical IPv4 address spelling")
    return None


def _system_resolver(host: str, port: int) -> list[str]:
    return _look_up(host, port, time.monotonic() + RESOLVE_SECONDS)


def resolver_within(seconds: float | None = None) -> Resolver:
    """A resolver whose look-ups end, all of them together, within `seconds` (`RESOLVE_SECONDS` by default): for a
    check of several URLs in one request (an agent's tools), which then waits no longer than a check of one."""
    deadline = time.monotonic() + (RESOLVE_SECONDS if seconds is None else seconds)
    return lambda host, port: _look_up(host, port, deadline)


def _look_up(host: str, port: int, deadline: float) -> list[str]:
    """The OS resolver's addresses for `host`, waited for until `deadline` (then TimeoutError, an OSError).

    `getaddrinfo` cannot be cancelled: a look-up still running then is left to end on a daemon thread of its own,
    which never holds up an exit. At most `MAX_PENDING_LOOKUPS` run at once; one waits for a place until the same
    deadline, so a resolver that never answers cannot pile up threads."""
    left = deadline - time.monotonic()
    if left <= 0 or not _pending_lookups.acquire(timeout=left):
        raise TimeoutError(f"no time left to look up {host!r}")
    outcome: list[list[str] | Exception] = []

    def look_up() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome.append([str(info[4][0]) for info in infos])
        except Exception as exc:  # handed to the caller, who decides
            outcome.append(exc)
        finally:
            _pending_lookups.release()

    worker = threading.Thread(target=look_up, name="parley-dns", daemon=True)
    try:
        worker.start()
    except RuntimeError:  # no thread to be had: give its place back; the name is one that cannot be looked up now
        _pending_lookups.release()
        raise OSError(f"no thread could be started to look up {host!r}") from None
    worker.join(max(0.0, deadline - time.monotonic()))
    if not outcome:
        raise TimeoutError(f"the DNS look-up of {host!r} did not end in time")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def _split(url: str, settings: GuardSettings) -> tuple[str, str, int]:
    """Parse and check the parts of a URL that need no DNS: (scheme, host, port)."""
    if not isinstance(url, str) or not url.strip():
        raise _fail("is required")
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise _fail(f"must be at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise _fail("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _fail("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _fail("must be an https URL" if not settings.allow_http_urls else "must be an http or https URL")
    if scheme == "http" and not settings.allow_http_urls:
        raise _fail("must use https")
    if parts.username is not None or parts.password is not None:
        raise _fail("must not contain credentials")
    if not parts.hostname:
        raise _fail("must have a host")
    try:
        # The host exactly as the HTTP client will call it (IDNA 2008, no compatibility mapping), not as Python's
        # IDNA 2003 codec spells it (`faß.de` is `xn--fa-hia.de`, not `fass.de`; `☃.net` cannot be called).
        host = httpx2.URL(url).raw_host.decode("ascii").lower()
    except (httpx2.InvalidURL, UnicodeError):
        raise _fail("has an invalid host name") from None
    if ":" not in host and not is_host_name(host):
        raise _fail("has an invalid host name")
    return scheme, host, port or (443 if scheme == "https" else 80)


def check_url(url: str, settings: GuardSettings, *, resolve: Resolver | None = None) -> str:
    """Vet an outbound URL at registration; return it (stripped) or raise ValidationFailed(field "url").

    Refuses non-https URLs unless `settings.allow_http_urls`, and unless `settings.allow_private_urls`:
    loopback, private, link-local, CGNAT, ULA, IPv4-mapped, multicast, reserved and unspecified addresses,
    non-canonical IPv4 spellings, and names that resolve to any such address. A name that does not resolve
    now, or whose look-up takes over `RESOLVE_SECONDS`, is accepted: the connect-time check in `guarded_client` is
    the one that cannot be bypassed.
    Blocking (DNS); call it from a thread in async code (`check_url_async`).
    """
    _, host, port = _split(url, settings)
    literal = _literal_ip(host)
    if settings.allow_private_urls:
        return url.strip()
    if literal is not None:
        if not is_public_address(literal):
            raise _fail("must not point to a private, loopback or otherwise non-public address")
        return url.strip()
    if (name := host.rstrip(".")) == "localhost" or name.endswith(".localhost"):
        raise _fail("must not point to a private, loopback or otherwise non-public address")
    try:
        addresses = (resolve or _system_resolver)(host, port)
    except (OSError, UnicodeError):
        return url.strip()
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            raise _fail("resolves to an unusable address") from None
        if not is_public_address(ip):
            raise _fail("resolves to a private, loopback or otherwise non-public address")
    return url.strip()


async def check_url_async(url: str, settings: GuardSettings, *, resolve: Resolver | None = None) -> str:
    """`check_url` on a worker thread, so the DNS lookup never blocks the event loop."""
    return await anyio.to_thread.run_sync(lambda: check_url(url, settings, resolve=resolve))


class GuardedBackend(httpcore2.AsyncNetworkBackend):
    """A network backend that resolves the host itself, vets every address, and connects to a vetted IP."""

    def __init__(self, allow_private: bool, resolve: Resolver | None = None) -> None:
        self._inner = httpcore2.AnyIOBackend()
        self._allow_private = allow_private
        self._resolve = resolve

    async def _addresses(self, host: str, port: int) -> list[str]:
        bare = host[1:-1] if host.startswith("[") else host
        try:
            literal = ipaddress.ip_address(bare.split("%", 1)[0])
        except ValueError:
            literal = None
        if literal is not None:
            return [str(literal)]
        if _NUMERIC_HOST.match(bare):
            raise BlockedAddress(f"refused non-canonical address spelling {host!r}")
        try:
            if self._resolve is not None:
                resolved = await anyio.to_thread.run_sync(self._resolve, bare, port)
            else:
                infos = await anyio.getaddrinfo(bare, port, type=socket.SOCK_STREAM)
                resolved = [str(info[4][0]) for info in infos]
        except (OSError, UnicodeError) as exc:
            raise httpcore2.ConnectError(f"could not resolve {host!r}: {exc}") from exc
        if not resolved:
            raise httpcore2.ConnectError(f"could not resolve {host!r}")
        return list(dict.fromkeys(resolved))

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's backend interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self._addresses(host, port)
                if not self._allow_private:
                    for address in addresses:
                        if not is_public_address(ipaddress.ip_address(address.split("%", 1)[0])):
                            # Any private answer refuses the whole name: a rebinding resolver mixes them.
                            raise BlockedAddress(f"refused connection to non-public address of {host!r}")
                last_error: Exception | None = None
                for address in addresses:
                    try:
                        return await self._inner.connect_tcp(
                            address,
                            port,
                            timeout=timeout,
                            local_address=local_address,
                            socket_options=socket_options,
                        )
                    except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                        last_error = exc
                raise last_error or httpcore2.ConnectError(f"could not connect to {host!r}")
        except TimeoutError as exc:
            raise httpcore2.ConnectTimeout(f"timed out connecting to {host!r}") from exc

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's backend interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are not allowed for outbound URLs")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying context for every guarded client: building one loads the CA bundle (~20-35 ms on the event
    loop), and a webhook tool's call builds a client each time."""
    return httpx2.create_ssl_context(trust_env=False)


class GuardedTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport over a connection pool that connects only through `GuardedBackend`."""

    def __init__(
        self,
        settings: GuardSettings,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        resolve: Resolver | None = None,
    ) -> None:
        context = _ssl_context()
        super().__init__(verify=context, trust_env=False)
        self._settings = settings
        # httpx2's transport takes no network backend, so its pool is replaced by one that has ours.
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=context,
            max_connections=max_connections,
            max_keepalive_connections=min(20, max_connections),
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(settings.allow_private_urls, resolve),
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        scheme = request.url.scheme
        if scheme not in ("http", "https") or (scheme == "http" and not self._settings.allow_http_urls):
            raise httpx2.ConnectError(f"refused {scheme!r} URL: https is required", request=request)
        return await super().handle_async_request(request)


def guarded_client(
    settings: GuardSettings,
    timeout: float,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    resolve: Resolver | None = None,
) -> httpx2.AsyncClient:
    """An HTTP client for user-supplied URLs: guarded connects, no redirects, no environment proxies."""
    return httpx2.AsyncClient(
        transport=GuardedTransport(settings, max_connections=max_connections, resolve=resolve),
        timeout=httpx2.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
    )
