"""TLS policy and SSL contexts for the SMTP client.

Smarthost (C dma's directives):

=================  =========  ===================  ==========================================
SECURETRANSFER     STARTTLS   OPPORTUNISTIC_TLS    Result
=================  =========  ===================  ==========================================
off                any        any                  plaintext
on                 off        any                  implicit TLS at connect (SMTPS)
on                 on         off                  STARTTLS required; refused -> deferred
on                 on         on                   STARTTLS; refused -> plaintext (no AUTH)
=================  =========  ===================  ==========================================

A smarthost's certificate (chain and name) is verified by default, against CAFILE or the
system CAs; TLS_NOVERIFY turns that off.  (C dma does no checks unless VERIFYCERT.)

MX hosts follow MX_TLS: ``none`` (plaintext), ``may`` (STARTTLS when offered, unverified,
plaintext when refused or when the handshake fails), ``encrypt`` (TLS required, unverified),
``verify`` (TLS required and verified).  SECURETRANSFER+STARTTLS without OPPORTUNISTIC_TLS
raises ``none``/``may`` to ``encrypt`` (C dma's policy is global).  VERIFYCERT makes every TLS
session verified; a verification failure then defers, it never falls back to plaintext.

FINGERPRINT pins the SHA-256 of the leaf certificate of every TLS peer; a mismatch defers.
CERTFILE is one PEM file with the client certificate chain and its key.  SNI is sent unless
the name is an IP literal.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl

from .config import Config
from .record import Frozen

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds of start-up
if TYPE_CHECKING:
    from typing import Literal

    Mode = Literal["none", "implicit", "starttls"]
_MX_LEVELS = ("none", "may", "encrypt", "verify")


class TlsError(Exception):
    """TLS could not be set up as the policy demands; the delivery is deferred."""

    def __init__(self, reason: str, dsn: str = "4.7.5",
                 kind: Literal["handshake", "fingerprint", "config"] = "handshake") -> None:
        super().__init__(reason)
        self.reason = reason
        self.dsn = dsn
        self.kind = kind


class TlsPolicy(Frozen):
    __slots__ = ("mode", "required", "verify", "fallback_plaintext", "fingerprint",
                 "certfile", "cafile")

    mode: Mode
    required: bool
    """STARTTLS refused or not offered: True -> defer, False -> carry on in plaintext."""
    verify: bool
    """Verify the chain and the host name."""
    fallback_plaintext: bool
    """A failed STARTTLS handshake: reconnect and go on in plaintext (MX_TLS may)."""
    fingerprint: bytes | None
    certfile: str | None
    cafile: str | None

    def __init__(self, mode: Mode = "none", required: bool = False, verify: bool = False,
                 fallback_plaintext: bool = False, fingerprint: bytes | None = None,
                 certfile: str | None = None, cafile: str | None = None) -> None:
        _set = object.__setattr__
        _set(self, "mode", mode)
        _set(self, "required", required)
        _set(self, "verify", verify)
        _set(self, "fallback_plaintext", fallback_plaintext)
        _set(self, "fingerprint", fingerprint)
        _set(self, "certfile", certfile)
        _set(self, "cafile", cafile)


def policy_for(config: Config, kind: str) -> TlsPolicy:
    """The TLS policy for a destination of ``kind`` ("smarthost" or "mx")."""
    base = TlsPolicy(fingerprint=config.fingerprint, certfile=config.certfile,
                     cafile=config.cafile)
    if kind == "smarthost":
        if not config.securetransfer:
            return base
        verify = config.verifycert or not config.tls_noverify
        if not config.starttls:
            return base.replace(mode="implicit", required=True, verify=verify)
        return base.replace(mode="starttls", required=not config.opportunistic_tls,
                       verify=verify)
    level = config.mx_tls if config.mx_tls in _MX_LEVELS else "may"
    if (config.securetransfer and config.starttls and not config.opportunistic_tls
            and _MX_LEVELS.index(level) < _MX_LEVELS.index("encrypt")):
        level = "encrypt"
    if level == "none":
        return base
    verify = level == "verify" or config.verifycert
    return base.replace(mode="starttls", required=level != "may", verify=verify,
                   fallback_plaintext=level == "may" and not verify)


@functools.lru_cache(maxsize=16)
def _context(verify: bool, certfile: str | None, cafile: str | None,
             _stamp: tuple[float, float] = (0.0, 0.0)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            if cafile:
                ctx.load_verify_locations(cafile=cafile)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ValueError) as e:
            raise TlsError(f"cannot load CAFILE {cafile}: {_load_error(e)}", "4.7.0",
                           "config") from e
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certfile:
        try:
            ctx.load_cert_chain(certfile)
        except (OSError, ValueError) as e:
            raise TlsError(f"cannot load client certificate CERTFILE {certfile}: "
                           f"{_load_error(e)}", "4.7.0", "config") from e
    return ctx


def _load_error(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        if e.reason == "PEM_LIB" or "PEM lib" in str(e):
            return "no PEM certificate and private key in it"
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def client_context(policy: TlsPolicy) -> ssl.SSLContext:
    """The SSL context for ``policy`` (cached).  Raises TlsError when CERTFILE or CAFILE
    cannot be loaded."""
    cafile = policy.cafile if policy.verify else None
    # The files' mtimes are part of the cache key: a renewed certificate is picked up.
    return _context(policy.verify, policy.certfile, cafile,
                    (_mtime(policy.certfile), _mtime(cafile)))


def _mtime(path: str | None) -> float:
    if not path:
        return 0.0
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def peer_name(name: str) -> str:
    """The name to send as SNI and check the certificate against (brackets removed)."""
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
        if name.lower().startswith("ipv6:"):
            name = name[5:]
    return name.rstrip(".")


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(peer_name(name))
    except ValueError:
        return False
    return True


def wrap(sock: socket.socket, policy: TlsPolicy, name: str, relay: str) -> ssl.SSLSocket:
    """Runs the TLS handshake on ``sock`` (its timeout applies) and checks the pin.

    ``name`` is the host name the policy verifies (SNI too, unless an IP literal); ``relay``
    is ``host[ip]:port`` for messages.  Raises TlsError; the socket is closed on failure.
    """
    ctx = client_context(policy)
    server_name = peer_name(name)
    # An IP literal gets no SNI; Python's ssl then checks it against the IP SANs.
    try:
        ssock = ctx.wrap_socket(sock, server_hostname=server_name)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise TlsError(f"TLS handshake with {relay} failed: certificate verification "
                       f"failed: {e.verify_message}") from e
    except (ssl.SSLError, OSError) as e:
        sock.close()
        raise TlsError(f"TLS handshake with {relay} failed: {_describe(e)}") from e
    if policy.fingerprint is not None:
        try:
            check_fingerprint(ssock, policy.fingerprint, relay)
        except TlsError:
            ssock.close()
            raise
    return ssock


def check_fingerprint(ssock: ssl.SSLSocket, expected: bytes, relay: str) -> None:
    cert = ssock.getpeercert(binary_form=True)
    if not cert:
        raise TlsError(f"no peer certificate from {relay} to check the fingerprint against",
                       kind="fingerprint")
    got = hashlib.sha256(cert).digest()
    if not hmac.compare_digest(got, expected):
        raise TlsError(f"certificate fingerprint mismatch for host {relay}: "
                       f"got SHA256:{got.hex()}, expected SHA256:{expected.hex()}",
                       kind="fingerprint")


def version(sock: socket.socket | None) -> str:
    """The negotiated TLS version (``TLSv1.3``) or ``no TLS``."""
    if isinstance(sock, ssl.SSLSocket):
        return sock.version() or "TLS"
    return "no TLS"


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
