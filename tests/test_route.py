"""dma.route against a real DNS server (dnsmasq on loopback, see tests/dnsd.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from dma.config import Config
from dma.errors import DmaError
from dma.route import Destination, Host, Plan, RouteError, plan, resolve
from dnsd import DNSMASQ_PACKAGE, DnsServer, SilentDns, find_dnsmasq

needs_dnsmasq = pytest.mark.skipif(
    find_dnsmasq() is None, reason=f"dnsmasq not installed (Debian: {DNSMASQ_PACKAGE})"
)

MX = {
    "example.test": [(20, "mx3.example.test"), (10, "mx1.example.test"), (10, "mx2.example.test")],
    "single.test": [(5, "dual.single.test")],
    "partial.test": [
        (10, "ghost.partial.test"),
        (20, "noaddr.partial.test"),
        (30, "ok.partial.test"),
    ],
    "ghosts.test": [(10, "ghost1.ghosts.test"), (20, "ghost2.ghosts.test")],
    "deadmx.test": [(10, "mx.broken.test")],
    "xn--bcher-kva.test": [(10, "mx1.example.test")],
}
HOSTS = {
    "mx1.example.test": ["127.0.0.11"],
    "mx2.example.test": ["127.0.0.12"],
    "mx3.example.test": ["127.0.0.13"],
    "dual.single.test": ["127.0.0.2", "::1"],
    "ok.partial.test": ["127.0.0.30"],
    "implicit.test": ["127.0.0.3", "::1"],
    "implicit4.test": ["127.0.0.4"],
    "noaddr.partial.test": [],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    if find_dnsmasq() is None:
        pytest.skip(f"dnsmasq not installed (Debian: {DNSMASQ_PACKAGE})")
    # "noaddr.partial.test" exists (it has a TXT record) but has no A/AAAA.
    hosts = {name: addrs for name, addrs in HOSTS.items() if addrs}
    extra = ["txt-record=noaddr.partial.test,exists", "txt-record=empty.test,exists"]
    with DnsServer(
        mx=MX,
        hosts=hosts,
        null_mx=["nullmx.test"],
        servfail=["broken.test"],
        cname={"alias.test": "example.test"},
        extra=extra,
    ) as server:
        yield server


@pytest.fixture
def config(dns_server: DnsServer) -> Config:
    return Config(resolver=dns_server.resolver, connect_timeout=5.0)


def mx(domain: str, config: Config) -> list[Host]:
    return resolve(Destination("mx", domain), config)


def route_error(domain: str, config: Config) -> RouteError:
    with pytest.raises(RouteError) as info:
        mx(domain, config)
    return info.value


# -- MX resolution ----------------------------------------------------------------------


@needs_dnsmasq
def test_mx_sorted_by_preference_with_addresses(config: Config) -> None:
    hosts = mx("example.test", config)
    assert [h.preference for h in hosts] == [10, 10, 20]
    assert {h.name for h in hosts[:2]} == {"mx1.example.test", "mx2.example.test"}
    assert hosts[2] == Host("mx3.example.test", 25, ("127.0.0.13",), 20)
    assert all(h.port == 25 for h in hosts)


@needs_dnsmasq
def test_equal_preferences_are_shuffled(config: Config) -> None:
    orders = set()
    for _ in range(40):
        hosts = mx("example.test", config)
        assert hosts[2].name == "mx3.example.test"
        orders.add((hosts[0].name, hosts[1].name))
    # Each run picks an order with probability 1/2: missing one has odds 2**-39.
    assert orders == {
        ("mx1.example.test", "mx2.example.test"),
        ("mx2.example.test", "mx1.example.test"),
    }


@needs_dnsmasq
def test_ipv6_and_ipv4_addresses_ipv6_first(config: Config) -> None:
    assert mx("single.test", config) == [Host("dual.single.test", 25, ("::1", "127.0.0.2"), 5)]


@needs_dnsmasq
def test_domain_is_case_insensitive_and_cname_followed(config: Config) -> None:
    assert [h.name for h in mx("SINGLE.Test", config)] == ["dual.single.test"]
    assert len(mx("alias.test", config)) == 3


@needs_dnsmasq
def test_implicit_mx(config: Config) -> None:
    assert mx("implicit.test", config) == [Host("implicit.test", 25, ("::1", "127.0.0.3"), 0)]
    assert mx("implicit4.test", config) == [Host("implicit4.test", 25, ("127.0.0.4",), 0)]


@needs_dnsmasq
def test_no_mx_and_no_address_is_permanent(config: Config) -> None:
    err = route_error("empty.test", config)
    assert err.permanent and err.dsn == "5.4.4"
    assert "empty.test" in err.reason


@needs_dnsmasq
def test_null_mx_is_permanent(config: Config) -> None:
    err = route_error("nullmx.test", config)
    assert (err.permanent, err.dsn) == (True, "5.1.10")
    assert err.reason == "domain nullmx.test does not accept mail (null MX)"
    assert str(err) == err.reason
    assert isinstance(err, DmaError)


@needs_dnsmasq
def test_nxdomain_is_permanent(config: Config) -> None:
    err = route_error("nowhere.test", config)
    assert (err.permanent, err.dsn) == (True, "5.1.2")
    assert err.reason == "domain nowhere.test does not exist"


@needs_dnsmasq
def test_servfail_is_temporary(config: Config) -> None:
    err = route_error("broken.test", config)
    assert (err.permanent, err.dsn) == (False, "4.4.3")
    assert "broken.test" in err.reason and "server failure" in err.reason


@needs_dnsmasq
def test_mx_hosts_without_addresses_are_skipped(config: Config) -> None:
    assert mx("partial.test", config) == [Host("ok.partial.test", 25, ("127.0.0.30",), 30)]


@needs_dnsmasq
def test_no_mx_host_with_an_address_is_temporary(config: Config) -> None:
    # The MX targets are NXDOMAIN: still deferred, the domain may fix its records.
    err = route_error("ghosts.test", config)
    assert (err.permanent, err.dsn) == (False, "4.4.3")
    assert err.reason.startswith("no MX host of ghosts.test has an address")


@needs_dnsmasq
def test_mx_host_lookup_failure_is_temporary(config: Config) -> None:
    err = route_error("deadmx.test", config)
    assert (err.permanent, err.dsn) == (False, "4.4.3")
    assert "no MX host of deadmx.test has an address" in err.reason
    assert "server failure" in err.reason


def test_timeout_is_temporary_and_bounded() -> None:
    with SilentDns() as silent:
        config = Config(resolver=silent.resolver, connect_timeout=1.0)
        start = time.monotonic()
        with pytest.raises(RouteError) as info:
            mx("example.test", config)
        elapsed = time.monotonic() - start
    assert (info.value.permanent, info.value.dsn) == (False, "4.4.3")
    assert "timed out" in info.value.reason
    assert 0.5 < elapsed < 4


def test_unreachable_resolver_is_temporary() -> None:
    with SilentDns() as silent:
        port = silent.port
    # Nothing listens there any more: ICMP port unreachable or a timeout, never a bounce.
    config = Config(resolver=("127.0.0.1", port), connect_timeout=1.0)
    start = time.monotonic()
    err = route_error("example.test", config)
    assert (err.permanent, err.dsn) == (False, "4.4.3")
    assert time.monotonic() - start < 4


def test_address_literals() -> None:
    config = Config()
    assert mx("[192.0.2.7]", config) == [Host("192.0.2.7", 25, ("192.0.2.7",), 0)]
    assert mx("[ipv6:2001:DB8::1]", config) == [Host("2001:db8::1", 25, ("2001:db8::1",), 0)]
    for bad in ("[999.0.0.1]", "[IPv6:1.2.3.4]", "[example.org]", "[192.0.2.7"):
        err = route_error(bad, config)
        assert err.permanent and err.dsn == "5.1.2"


# -- smarthost --------------------------------------------------------------------------


def smarthost(name: str, port: int = 25) -> list[Host]:
    config = Config(smarthost=name, port=port)
    return resolve(Destination("smarthost", name), config)


def test_smarthost_by_name() -> None:
    (host,) = smarthost("localhost", 2525)
    assert (host.name, host.port, host.preference) == ("localhost", 2525, 0)
    assert set(host.addresses) <= {"127.0.0.1", "::1"} and host.addresses
    if len(host.addresses) == 2:
        assert host.addresses == ("::1", "127.0.0.1")


def test_smarthost_literals() -> None:
    assert smarthost("192.0.2.1", 587) == [Host("192.0.2.1", 587, ("192.0.2.1",), 0)]
    assert smarthost("2001:db8::25") == [Host("2001:db8::25", 25, ("2001:db8::25",), 0)]
    assert smarthost("[192.0.2.1]") == [Host("192.0.2.1", 25, ("192.0.2.1",), 0)]
    assert smarthost("[IPv6:::1]") == [Host("::1", 25, ("::1",), 0)]
    (host,) = smarthost("[localhost]")
    assert host.name == "localhost" and "127.0.0.1" in host.addresses


def test_smarthost_unresolvable_is_temporary() -> None:
    for name in ("no-such-host.invalid", "bad..name"):
        with pytest.raises(RouteError) as info:
            smarthost(name)
        assert (info.value.permanent, info.value.dsn) == (False, "4.4.3")
        assert f"smarthost {name}" in info.value.reason


def test_smarthost_does_not_use_the_mx_resolver() -> None:
    with SilentDns() as silent:  # would time out if asked
        config = Config(smarthost="localhost", resolver=silent.resolver, connect_timeout=5.0)
        start = time.monotonic()
        assert resolve(Destination("smarthost", "localhost"), config)[0].name == "localhost"
        assert time.monotonic() - start < 1


# -- plan -------------------------------------------------------------------------------


def test_plan_groups_by_domain_in_first_appearance_order() -> None:
    rcpts = ["bob@B.example", "root", "ann@a.example", "carl@b.EXAMPLE", "mail", "d@b.example."]
    assert plan(rcpts, Config()) == Plan(
        local=("root", "mail"),
        remote=(
            Destination("mx", "b.example", ("bob@B.example", "carl@b.EXAMPLE", "d@b.example.")),
            Destination("mx", "a.example", ("ann@a.example",)),
        ),
    )


def test_plan_idna_domains_group_together() -> None:
    rcpts = ["a@bücher.test", "b@BÜCHER.test", "c@xn--bcher-kva.test", "d@XN--BCHER-KVA.TEST"]
    (dest,) = plan(rcpts, Config()).remote
    assert dest == Destination("mx", "xn--bcher-kva.test", tuple(rcpts))


@needs_dnsmasq
def test_idna_domain_resolves(config: Config) -> None:
    (dest,) = plan(["user@Bücher.test"], config).remote
    assert [h.name for h in resolve(dest, config)] == ["mx1.example.test"]


def test_plan_uses_last_at_and_address_literals() -> None:
    rcpts = ['"a@b"@c.example', "x@[192.0.2.1]", "y@[IPv6:2001:DB8::1]", "z@[192.0.2.1]"]
    assert plan(rcpts, Config()).remote == (
        Destination("mx", "c.example", ('"a@b"@c.example',)),
        Destination("mx", "[192.0.2.1]", ("x@[192.0.2.1]", "z@[192.0.2.1]")),
        Destination("mx", "[ipv6:2001:db8::1]", ("y@[IPv6:2001:DB8::1]",)),
    )


def test_plan_smarthost_takes_every_remote_recipient() -> None:
    config = Config(smarthost="relay.example", port=587)
    rcpts = ["a@x.example", "root", "b@y.example", "c@x.example"]
    assert plan(rcpts, config) == Plan(
        local=("root",),
        remote=(
            Destination(
                "smarthost", "relay.example", ("a@x.example", "b@y.example", "c@x.example")
            ),
        ),
    )


def test_plan_nullclient_sends_everything_to_the_smarthost() -> None:
    config = Config(smarthost="relay.example", nullclient=True)
    assert plan(["root", "a@x.example"], config) == Plan(
        local=(),
        remote=(Destination("smarthost", "relay.example", ("root", "a@x.example")),),
    )
    with pytest.raises(DmaError):
        plan(["root"], Config(nullclient=True))


def test_plan_empty_and_local_only() -> None:
    assert plan([], Config()) == Plan((), ())
    assert plan(["root"], Config(smarthost="relay.example")) == Plan(("root",), ())


def test_import_is_cheap() -> None:
    python = os.path.join(os.path.dirname(__file__), "..", "python")
    code = (
        "import sys, dma.route; print(sorted(m for m in sys.modules if m.split('.')[0] == 'dns'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": os.path.abspath(python)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "[]"
