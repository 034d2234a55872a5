"""Where each recipient goes: a local user, the smarthost, or its domain's MX hosts.

``plan()`` groups the (already alias-expanded) recipients of a message; ``resolve()`` turns
one remote :class:`Destination` into the :class:`Host` list to try, in order.

* Smarthost (``SMARTHOST``, also with ``NULLCLIENT``): no MX lookup; the name goes through
  the system resolver (``getaddrinfo``: /etc/hosts names such as ``localhost`` work), on
  ``PORT``.  Any resolution failure defers (C dma issue #30).
* MX: dnspython, asking ``RESOLVER`` when set, else /etc/resolv.conf.  MX records sorted by
  preference with equal preferences shuffled; every MX host's AAAA and A addresses (IPv6
  first), port 25; no MX: the domain itself (implicit MX, preference 0); null MX
  (RFC 7505) and NXDOMAIN fail permanently; DNS failures and timeouts defer; MX hosts
  without addresses are skipped, and if none has one the delivery is deferred.
* ``[1.2.3.4]`` / ``[IPv6:2001:db8::1]`` domains are used as they are.

This module is imported on the delivery path only, and cheaply: dnspython is imported
inside :func:`resolve` (``dns.resolver`` alone costs ~80 ms).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Iterable

from dma.errors import EX_TEMPFAIL, EX_UNAVAILABLE, ConfigError, DmaError
from dma.record import Frozen

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds of start-up
if TYPE_CHECKING:
    import dns.name
    import dns.resolver

    from dma.config import Config

MX_PORT = 25
DEFAULT_DNS_LIFETIME = 30.0


class Host(Frozen):
    """One server to try, with its addresses in the order to try them."""

    __slots__ = ("name", "port", "addresses", "preference")

    name: str
    """The name to present for TLS (SNI, certificate check) and to look up in auth.conf:
    the smarthost or MX host name without a trailing dot, or a bare IP address."""
    port: int
    addresses: tuple[str, ...]
    preference: int

    def __init__(self, name: str, port: int, addresses: tuple[str, ...],
                 preference: int = 0) -> None:
        _set = object.__setattr__
        _set(self, "name", name)
        _set(self, "port", port)
        _set(self, "addresses", addresses)
        _set(self, "preference", preference)


class Destination(Frozen):
    """A group of recipients that share one SMTP transaction."""

    __slots__ = ("kind", "name", "recipients")

    kind: str
    """``smarthost`` or ``mx``."""
    name: str
    """The smarthost name or the recipient domain (ASCII / IDNA form)."""
    recipients: tuple[str, ...]

    def __init__(self, kind: str, name: str, recipients: tuple[str, ...] = ()) -> None:
        _set = object.__setattr__
        _set(self, "kind", kind)
        _set(self, "name", name)
        _set(self, "recipients", recipients)


class Plan(Frozen):
    """The recipients of one message, split by where they go."""

    __slots__ = ("local", "remote")

    local: tuple[str, ...]
    """Local user names, in first-appearance order."""
    remote: tuple[Destination, ...]
    """One Destination per smarthost / recipient domain, in first-appearance order."""

    def __init__(self, local: tuple[str, ...], remote: tuple[Destination, ...]) -> None:
        _set = object.__setattr__
        _set(self, "local", local)
        _set(self, "remote", remote)


class RouteError(DmaError):
    """No host to deliver to: ``permanent`` bounces the recipients, otherwise they wait."""

    def __init__(self, reason: str, permanent: bool, dsn: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.dsn = dsn
        self.exit_code = EX_UNAVAILABLE if permanent else EX_TEMPFAIL

    def __repr__(self) -> str:
        return f"RouteError({self.reason!r}, permanent={self.permanent!r}, dsn={self.dsn!r})"


def _temporary(reason: str) -> RouteError:
    return RouteError(reason, permanent=False, dsn="4.4.3")


# -- planning -------------------------------------------------------------------------


def domain_key(domain: str) -> str:
    """The form a recipient domain is grouped and looked up under: IDNA (ASCII), lower-case,
    without a trailing dot; address literals lower-cased only.  A name the ``idna`` codec
    refuses is kept lower-cased (``resolve`` then reports it)."""
    if domain.startswith("["):
        return domain.lower()
    if domain.endswith(".") and not domain.endswith(".."):
        domain = domain[:-1]
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return domain.lower()


def plan(recipients: Iterable[str], config: Config) -> Plan:
    """Split expanded recipients into local users and remote destinations.

    A recipient without ``@`` is a local user, except with NULLCLIENT, where everything
    goes to the smarthost.  With a smarthost all remote recipients form one Destination;
    otherwise there is one per domain (the part after the last ``@``).
    """
    local: list[str] = []
    groups: dict[str, list[str]] = {}
    smarthost = config.smarthost
    if config.nullclient and not smarthost:
        raise ConfigError("NULLCLIENT needs a SMARTHOST", config.path)
    for rcpt in recipients:
        if "@" not in rcpt and not config.nullclient:
            local.append(rcpt)
        elif smarthost:
            groups.setdefault(smarthost, []).append(rcpt)
        else:
            groups.setdefault(domain_key(rcpt.rpartition("@")[2]), []).append(rcpt)
    kind = "smarthost" if smarthost else "mx"
    return Plan(
        local=tuple(local),
        remote=tuple(Destination(kind, name, tuple(rcpts)) for name, rcpts in groups.items()),
    )


# -- resolving ------------------------------------------------------------------------


def resolve(dest: Destination, config: Config) -> list[Host]:
    """The hosts to try for ``dest``, best first; each host's addresses in order.

    Raises RouteError when there is none (permanent: bounce; otherwise: defer).
    """
    if dest.kind == "smarthost":
        return [_resolve_smarthost(dest.name, config.port)]
    if dest.kind == "mx":
        literal = _address_literal(dest.name)
        if literal is not None:
            return [Host(literal, MX_PORT, (literal,), 0)]
        return _MxResolver(config).resolve(dest.name)
    raise ValueError(f"unknown destination kind {dest.kind!r}")


def _address_literal(domain: str) -> str | None:
    """``[1.2.3.4]`` / ``[IPv6:2001:db8::1]`` -> the address; None for a domain name."""
    if not domain.startswith("["):
        return None
    inner = domain[1:-1] if domain.endswith("]") else ""
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise RouteError(f"invalid address literal {domain}", permanent=True, dsn="5.1.2") from None


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _resolve_smarthost(smarthost: str, port: int) -> Host:
    name = smarthost.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
        if name[:5].lower() == "ipv6:":
            name = name[5:]
    literal = _ip(name)
    if literal is not None:
        return Host(literal, port, (literal,), 0)
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise _temporary(f"cannot resolve smarthost {name}: {exc.strerror}") from None
    except (UnicodeError, OSError) as exc:
        raise _temporary(f"cannot resolve smarthost {name}: {exc}") from None
    v6: list[str] = []
    v4: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family == socket.AF_INET6:
            bucket = v6
        elif family == socket.AF_INET:
            bucket = v4
        else:
            continue
        address = str(sockaddr[0])
        if address not in bucket:
            bucket.append(address)
    if not v6 and not v4:
        raise _temporary(f"smarthost {name} has no address")
    return Host(name.rstrip("."), port, tuple(v6 + v4), 0)


class _LookupFailed(Exception):
    """A temporary DNS failure (timeout, SERVFAIL, network): text says which."""


class _MxResolver:
    """One MX resolution: a configured dnspython resolver and a time budget.

    Each query may take up to the lifetime (CONNECT_TIMEOUT); the whole resolution gets
    twice that, so one MX host whose AAAA query times out still leaves time for its A
    query and for the other hosts, while the total stays bounded.
    """

    def __init__(self, config: Config) -> None:
        import dns.nameserver
        import dns.resolver  # lazily: ~80 ms, not wanted on the submission path

        self.lifetime = config.connect_timeout or DEFAULT_DNS_LIFETIME
        if config.resolver is not None:
            host, port = config.resolver
            self.resolver = dns.resolver.Resolver(configure=False)
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
        else:
            try:
                self.resolver = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                raise _temporary("no DNS resolver configured (/etc/resolv.conf)") from None
        self.resolver.timeout = min(self.resolver.timeout, self.lifetime)
        self.resolver.cache = None
        self.deadline = time.monotonic() + 2 * self.lifetime

    def _query(self, qname: dns.name.Name, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, or None for NODATA. NXDOMAIN raises dns.resolver.NXDOMAIN."""
        import dns.exception
        import dns.resolver

        remaining = self.deadline - time.monotonic()
        what = f"{rdtype} lookup of {qname.to_text(omit_final_dot=True)}"
        if remaining <= 0:
            raise _LookupFailed(f"DNS {what} not tried: out of time")
        try:
            answer = self.resolver.resolve(
                qname,
                rdtype,
                search=False,
                raise_on_no_answer=False,
                lifetime=min(self.lifetime, remaining),
            )
        except dns.resolver.NXDOMAIN:
            raise
        except dns.exception.Timeout:
            raise _LookupFailed(f"DNS {what} timed out") from None
        except dns.resolver.NoNameservers:
            raise _LookupFailed(f"DNS {what} failed: server failure") from None
        except dns.resolver.YXDOMAIN:
            raise _LookupFailed(f"DNS {what} failed: name too long after DNAME") from None
        except dns.exception.DNSException as exc:
            raise _LookupFailed(f"DNS {what} failed: {exc}") from None
        except OSError as exc:
            raise _LookupFailed(f"DNS {what} failed: {exc.strerror or exc}") from None
        return answer if answer.rrset is not None else None

    def _addresses(self, qname: dns.name.Name) -> tuple[tuple[str, ...], str | None]:
        """(AAAA addresses then A addresses, the temporary error if a lookup failed).

        Raises dns.resolver.NXDOMAIN when the name does not exist."""
        found: list[str] = []
        error: str | None = None
        for rdtype in ("AAAA", "A"):
            try:
                answer = self._query(qname, rdtype)
            except _LookupFailed as exc:
                error = str(exc)
                continue
            for rdata in answer or ():
                address = rdata.to_text()
                if address not in found:
                    found.append(address)
        return tuple(found), error

    def resolve(self, domain: str) -> list[Host]:
        import dns.exception
        import dns.name
        import dns.resolver

        try:
            qname = dns.name.from_text(domain)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            raise RouteError(f"invalid domain {domain}", permanent=True, dsn="5.1.2") from None
        try:
            mx = self._query(qname, "MX")
        except dns.resolver.NXDOMAIN:
            raise RouteError(
                f"domain {domain} does not exist", permanent=True, dsn="5.1.2"
            ) from None
        except _LookupFailed as exc:
            raise _temporary(str(exc)) from None

        if mx is None:  # no MX records: the domain is its own mail host (RFC 5321 5.1)
            try:
                addresses, error = self._addresses(qname)
            except dns.resolver.NXDOMAIN:  # deleted since the MX query
                raise RouteError(
                    f"domain {domain} does not exist", permanent=True, dsn="5.1.2"
                ) from None
            if addresses:
                return [Host(domain, MX_PORT, addresses, 0)]
            if error is not None:
                raise _temporary(error)
            raise RouteError(
                f"domain {domain} has no MX and no address records",
                permanent=True,
                dsn="5.4.4",
            )

        records = [(int(r.preference), r.exchange) for r in mx]
        if all(exchange == dns.name.root for _, exchange in records):
            raise RouteError(
                f"domain {domain} does not accept mail (null MX)", permanent=True, dsn="5.1.10"
            )
        random.shuffle(records)
        records.sort(key=lambda record: record[0])  # stable: equal preferences stay shuffled
        hosts: list[Host] = []
        seen: set[dns.name.Name] = set()
        errors: list[str] = []
        for preference, exchange in records:
            if exchange == dns.name.root or exchange in seen:
                continue
            seen.add(exchange)
            try:
                addresses, error = self._addresses(exchange)
            except dns.resolver.NXDOMAIN:
                # A permanent answer, but a broken MX target is the domain's mistake,
                # often corrected soon: defer like Postfix does.
                errors.append(f"MX host {exchange.to_text(omit_final_dot=True)} does not exist")
                continue
            if error is not None:
                errors.append(error)
            if addresses:
                name = exchange.to_text(omit_final_dot=True)
                hosts.append(Host(name, MX_PORT, addresses, preference))
        if not hosts:
            detail = f" ({errors[0]})" if errors else ""
            raise _temporary(f"no MX host of {domain} has an address{detail}")
        return hosts
