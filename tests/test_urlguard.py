"""The outbound-URL guard: the SSRF table at registration, and the connect-time check that DNS cannot fool."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from app.config import Settings, load_settings
from app.domain.errors import ValidationFailed
from app.webhooks import guard
from app.webhooks.guard import check_url, guarded_client, is_public_address
from tests.conftest import start_harness
from tests.seed import SEED_CREATE
from tests.webhook_receiver import Receiver, Reply, eventually

STRICT = Settings()  # production defaults: https only, no private addresses
DEV = Settings(allow_private_urls=True, allow_http_urls=True)
HTTP_ONLY = Settings(allow_http_urls=True)


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"no such host {host}")
        return table[host]

    return resolve


REFUSED = [
    ("https://127.0.0.1/hook", "loopback"),
    ("https://127.10.20.30/hook", "loopback range"),
    ("https://localhost/hook", "localhost"),
    ("https://app.localhost/hook", "*.localhost"),
    ("https://LOCALHOST./hook", "localhost with a trailing dot"),
    ("https://app.localhost./hook", "*.localhost with a trailing dot"),
    ("https://[::1]/hook", "IPv6 loopback"),
    ("https://10.1.2.3/hook", "private 10/8"),
    ("https://172.16.0.1/hook", "private 172.16/12"),
    ("https://192.168.1.1/hook", "private 192.168/16"),
    ("https://169.254.169.254/latest/meta-data", "link-local (cloud metadata)"),
    ("https://[fe80::1]/hook", "IPv6 link-local"),
    ("https://100.64.0.1/hook", "CGNAT 100.64/10"),
    ("https://100.127.255.254/hook", "CGNAT upper end"),
    ("https://[fd12:3456::1]/hook", "IPv6 ULA"),
    ("https://[fc00::1]/hook", "IPv6 ULA fc00"),
    ("https://[::ffff:127.0.0.1]/hook", "IPv4-mapped loopback"),
    ("https://[::ffff:10.0.0.1]/hook", "IPv4-mapped private"),
    ("https://[::ffff:8.8.8.8]/hook", "IPv4-mapped even when public"),
    ("https://[64:ff9b::a00:1]/hook", "NAT64 of a private address"),
    ("https://[64:ff9b:1:7f00:0:100:808:808]/hook", "local-use NAT64 (/48 puts 127.0.0.1 in bits 48-87)"),
    ("https://192.0.0.8/hook", "IETF protocol assignments 192.0.0/24"),
    ("https://[2002:a00:1::]/hook", "6to4"),
    ("https://0.0.0.0/hook", "unspecified"),
    ("https://[::]/hook", "IPv6 unspecified"),
    ("https://224.0.0.1/hook", "multicast"),
    ("https://[ff02::1]/hook", "IPv6 multicast"),
    ("https://240.0.0.1/hook", "reserved"),
    ("https://255.255.255.255/hook", "broadcast"),
    ("https://192.0.2.10/hook", "documentation range"),
    ("https://2130706433/hook", "decimal IPv4 spelling"),
    ("https://0x7f000001/hook", "hex IPv4 spelling"),
    ("https://0x7f.0.0.1/hook", "hex octet spelling"),
    ("https://0177.0.0.1/hook", "octal IPv4 spelling"),
    ("https://127.1/hook", "short IPv4 spelling"),
    ("https://010.0.0.1/hook", "leading-zero octet"),
    ("https://167772161/hook", "decimal spelling of 10.0.0.1"),
    ("https://internal.example/hook", "a name resolving to a private address"),
    ("https://mixed.example/hook", "a name with one private address among public ones"),
    ("https://mapped.example/hook", "a name resolving to an IPv4-mapped address"),
]

NAMES = {
    "internal.example": ["10.0.0.7"],
    "mixed.example": ["93.184.216.34", "192.168.0.5"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "public.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
}


@pytest.mark.parametrize(("url", "why"), REFUSED, ids=[why for _, why in REFUSED])
def test_non_public_targets_are_refused_without_the_dev_flag(url: str, why: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_url(url, STRICT, resolve=resolver(NAMES))
    assert [d.field for d in caught.value.details] == ["url"]


@pytest.mark.parametrize(
    "url",
    ["https://127.0.0.1:8443/hook", "http://localhost/x", "https://10.0.0.1/", "https://internal.example/hook"],
)
def test_the_dev_flag_allows_private_targets(url: str) -> None:
    assert check_url(url, DEV, resolve=resolver(NAMES)) == url


@pytest.mark.parametrize(
    "url",
    ["https://93.184.216.34/hook", "https://public.example/hook?x=1", "https://[2606:4700::1111]/hook"],
)
def test_public_https_targets_pass(url: str) -> None:
    assert check_url(url, STRICT, resolve=resolver(NAMES)) == url


def test_a_name_that_does_not_resolve_yet_is_accepted_and_left_to_the_connect_time_check() -> None:
    assert check_url("https://not-yet.example/hook", STRICT, resolve=resolver({})) == "https://not-yet.example/hook"


@pytest.mark.parametrize(
    ("url", "settings", "message"),
    [
        ("http://93.184.216.34/hook", STRICT, "https"),
        ("ftp://93.184.216.34/hook", STRICT, "must be an https URL"),
        ("ftp://93.184.216.34/hook", HTTP_ONLY, "must be an http or https URL"),  # the rule in force is named
        ("notaurl", DEV, "must be an http or https URL"),
        ("file:///etc/passwd", DEV, "must be an http or https URL"),
        ("https://user:pw@93.184.216.34/", STRICT, "credentials"),
        ("https:///nohost", STRICT, "host"),
        ("https://exa mple.com/", STRICT, "whitespace"),
        ("https://93.184.216.34:99999/", STRICT, "valid URL"),
        ("", STRICT, "required"),
        ("https://x.example/" + "a" * 3000, STRICT, "at most"),
        # Names Python's IDNA 2003 codec spells but the HTTP client (IDNA 2008, UTS 46) cannot call.
        ("http://\u2603.net/hook", DEV, "invalid host name"),
        ("https://\uff41.example/hook", DEV, "invalid host name"),
    ],
)
def test_malformed_or_insecure_urls_are_refused(url: str, settings: Settings, message: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_url(url, settings, resolve=resolver({"x.example": ["93.184.216.34"]}))
    assert message in caught.value.message


def test_the_host_vetted_is_the_one_the_client_calls() -> None:
    # IDNA 2003 maps `faß.de` to `fass.de`; the client connects to `xn--fa-hia.de`, whose address is what counts.
    names = resolver({"fass.de": ["93.184.216.34"], "xn--fa-hia.de": ["127.0.0.1"]})
    with pytest.raises(ValidationFailed):
        check_url("https://fa\u00df.de/hook", STRICT, resolve=names)
    names = resolver({"xn--fa-hia.de": ["93.184.216.34"]})
    assert check_url("https://fa\u00df.de/hook", STRICT, resolve=names) == "https://fa\u00df.de/hook"


def test_http_is_allowed_only_with_its_flag() -> None:
    assert check_url("http://93.184.216.34/hook", HTTP_ONLY) == "http://93.184.216.34/hook"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("100.63.255.255", True),
        ("100.128.0.0", True),
        ("100.64.0.0", False),
        ("172.31.255.255", False),
        ("172.32.0.0", True),
        ("198.18.0.1", False),
        ("::ffff:8.8.8.8", False),
        ("64:ff9b::808:808", True),
        ("64:ff9b::7f00:1", False),
        ("64:ff9b:1::808:808", False),
        ("192.0.0.8", False),
        ("192.0.0.170", False),
        ("fec0::1", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


async def test_connect_time_check_refuses_a_name_that_rebinds_to_loopback() -> None:
    """The registration check saw a public address; at connect time the name answers 127.0.0.1."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    with Receiver() as receiver:
        url = f"http://rebind.example:{receiver.port}/hook"
        assert check_url(url, HTTP_ONLY, resolve=rebinding) == url
        async with guarded_client(HTTP_ONLY, 2.0, resolve=rebinding) as client:
            with pytest.raises(httpx2.ConnectError, match="non-public"):
                await client.post(url, content=b"{}")
        assert receiver.snapshot() == []


async def test_connect_time_check_refuses_literal_and_numeric_private_hosts() -> None:
    with Receiver() as receiver:
        async with guarded_client(HTTP_ONLY, 2.0) as client:
            for host in ("127.0.0.1", "[::ffff:127.0.0.1]", "2130706433", "localhost"):
                with pytest.raises(httpx2.ConnectError):
                    await client.post(f"http://{host}:{receiver.port}/hook", content=b"{}")
        assert receiver.snapshot() == []


async def test_connect_time_check_refuses_plain_http_without_its_flag() -> None:
    with Receiver() as receiver:
        async with guarded_client(Settings(allow_private_urls=True), 2.0) as client:
            with pytest.raises(httpx2.ConnectError, match="https"):
                await client.post(receiver.url, content=b"{}")
        assert receiver.snapshot() == []


async def test_guarded_client_connects_to_the_vetted_address_when_allowed() -> None:
    with Receiver() as receiver:
        async with guarded_client(DEV, 2.0, resolve=resolver({"hooks.example": ["127.0.0.1"]})) as client:
            response = await client.post(f"http://hooks.example:{receiver.port}/hook", content=b"{}")
        assert response.status_code == 200
        assert receiver.snapshot()[0].headers["host"] == f"hooks.example:{receiver.port}"


async def test_a_redirect_to_a_private_address_is_not_followed() -> None:
    with Receiver() as target:
        private = f"http://10.0.0.1:{target.port}/internal"
        with Receiver(lambda _: Reply(status=302, headers={"Location": private})) as first:
            async with guarded_client(DEV, 2.0) as client:
                response = await client.post(first.url, content=b"{}")
            assert response.status_code == 302
            assert len(first.snapshot()) == 1
        assert target.snapshot() == []


async def test_registration_through_the_api_applies_the_guard(tmp_path: Path) -> None:
    async with start_harness(tmp_path, allow_private_urls=False, allow_http_urls=False) as h:
        for url in ("https://127.0.0.1/hook", "https://[::ffff:10.0.0.1]/", "https://0x7f000001/", "http://8.8.8.8/"):
            response = await h.post("/v1/webhooks", {"url": url, "events": ["*"]})
            assert response.status_code == 400, url
            assert response.json()["error"]["details"][0]["field"] == "url"


@pytest.fixture
def resolver_that_hangs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The OS resolver, replaced by one that never answers while the test runs (the names asked are listed); the
    look-up time limit shrunk to 0.3 s."""
    asked: list[str] = []
    release = threading.Event()

    def hang(host: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(guard, "RESOLVE_SECONDS", 0.3)
    yield asked
    release.set()


def test_a_look_up_that_does_not_end_in_time_is_a_name_that_does_not_resolve_yet(
    resolver_that_hangs: list[str],
) -> None:
    started = time.monotonic()
    assert check_url("https://slow.example/hook", STRICT) == "https://slow.example/hook"
    assert time.monotonic() - started < 1.0 and resolver_that_hangs == ["slow.example"]


def test_a_look_up_no_thread_can_be_started_for_is_a_name_that_does_not_resolve_yet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process is out of threads (the OS refuses one): the registration goes on as for a name that does not
    resolve now (the connect-time check still applies), not a 500, and the look-up's place is given back."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    for _ in range(guard.MAX_PENDING_LOOKUPS + 1):  # more than there are places: each one was given back
        assert check_url("https://busy.example/hook", STRICT) == "https://busy.example/hook"


async def test_registration_waits_for_a_resolver_that_hangs_only_so_long(
    tmp_path: Path, resolver_that_hangs: list[str]
) -> None:
    """A webhook endpoint, or an agent with webhook tools, on names whose look-up never ends is answered as a name
    that does not resolve yet is (201, left to the connect-time check) within the look-up time limit: once for all
    of an agent's tools, not once each."""
    async with start_harness(tmp_path, allow_private_urls=False, allow_http_urls=False) as h:
        started = time.monotonic()
        created = await h.post("/v1/webhooks", {"url": "https://slow.example/hook", "events": ["*"]})
        assert created.status_code == 201, created.text
        assert time.monotonic() - started < 1.0
        tools = [
            {"type": "webhook", "name": f"tool_{n}", "description": "d", "url": f"https://slow{n}.example/t"}
            for n in range(6)
        ]
        started = time.monotonic()
        agent = await h.post("/v1/agents", {"name": "slow", "openingMessage": "Hi", "tools": tools})
        assert agent.status_code == 201, agent.text
        assert time.monotonic() - started < 1.0  # 0.3 s for all six, not 0.3 s each
        assert resolver_that_hangs[:2] == ["slow.example", "slow0.example"]


def test_production_defaults_allow_neither_private_nor_plain_http_urls() -> None:
    """The tests' switch (`allow_private_urls`/`allow_http_urls`, set by `make_settings` and by the e2e fixtures'
    PARLEY_ALLOW_* variables) is off unless set: in the settings' defaults and in what an empty environment reads."""
    for settings in (Settings(), load_settings({}, env_file=None)):
        assert settings.allow_private_urls is False and settings.allow_http_urls is False


@pytest.fixture
def rebinding_name(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`rebind.example` resolves, through the OS resolver both checks use, to whatever the test sets."""
    answers = {"rebind.example": "93.184.216.34"}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host  # anyio asks with the IDNA-encoded bytes
        if name in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answers[name], int(port or 443)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


async def test_a_registered_name_that_rebinds_to_loopback_gets_no_delivery_with_production_defaults(
    tmp_path: Path, rebinding_name: dict[str, str]
) -> None:
    """Registered while it resolved to a public address, the endpoint's name answers 127.0.0.1 when an event is
    delivered: the app's own webhook client refuses the connection (recorded as the attempt's error), and nothing
    connects to the loopback port."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        async with start_harness(tmp_path, allow_private_urls=False, allow_http_urls=False) as h:
            hook = await h.post("/v1/webhooks", {"url": f"https://rebind.example:{port}/hook", "events": ["*"]})
            assert hook.status_code == 201, hook.text
            rebinding_name["rebind.example"] = "127.0.0.1"
            assert (await h.post("/v1/sms-conversations", SEED_CREATE)).status_code == 201
            attempts = await eventually(lambda: h.rows("SELECT error FROM webhook_attempts"))
            assert "non-public" in attempts[0][0]
        with pytest.raises(BlockingIOError):
            listener.accept()
