"""TLS on the wire (issue 14): the contexts every daemon and client builds from its
`--cert/--key/--client-ca/--cacert` files, and one-line reasons for TLS failures.

Who speaks TLS where:

- the supernode serves its API and download ports over TLS when given `--cert/--key`;
- a peer server serves pieces over TLS when given `--cert/--key` (dfget passes its own);
- every source a supernode hands out carries its scheme (`Source.tls`, from the peer's
  registration or the supernode's own settings), so a swarm may mix both and a client
  never guesses;
- `--client-ca` on a server requires a client certificate signed by that CA (mutual
  TLS); clients present theirs with `--cert/--key`.

Clients trust the system CAs plus `--cacert`. Contexts are built once per set of files
(building one reads the system trust store: milliseconds a small download should not pay
twice, nor at all when nothing speaks TLS).
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass

from common.errors import Error


class TlsConfigError(Error, ValueError):
    """A certificate, key or CA file that cannot be used."""


def _load(what: str, fn: object, *args: str | None) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except FileNotFoundError as exc:
        raise TlsConfigError(f"{what}: no such file {exc.filename or args[0]!r}") from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise TlsConfigError(f"{what}: cannot load {', '.join(a for a in args if a)} ({reason})") from None


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key (PEM), and the CA its clients' certificates must
    chain to when mutual TLS is on."""

    cert: str
    key: str
    client_ca: str | None = None

    def context(self) -> ssl.SSLContext:
        return _server_context(self.cert, self.key, self.client_ca)


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (system CAs plus `cacert`) and the certificate it presents
    (mutual TLS), if any."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        return _client_context(self.cacert, self.cert, self.key)


def check_pair(cert: str | None, key: str | None, flags: str = "--cert/--key") -> None:
    if bool(cert) != bool(key):
        raise TlsConfigError(f"{flags}: give both the certificate and its key, or neither")


@functools.lru_cache(maxsize=8)
def _server_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load("--cert/--key", ctx.load_cert_chain, cert, key)
    if client_ca:
        _load("--client-ca", ctx.load_verify_locations, client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@functools.lru_cache(maxsize=8)
def _client_context(cacert: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if cacert:
        _load("--cacert", ctx.load_verify_locations, cacert)
    if cert:
        _load("--cert/--key", ctx.load_cert_chain, cert, key)
    return ctx


# OpenSSL's reasons when one side speaks TLS and the other plain HTTP.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
            "UNKNOWN_PROTOCOL")
_CLIENT_CERT = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN",
                "HANDSHAKE_FAILURE", "CERTIFICATE_EXPIRED")


def is_tls_error(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError)


UNTRUSTED, NOT_TLS, CLIENT_CERT, OTHER = "untrusted", "not_tls", "client_cert", "other"


def classify(exc: BaseException) -> str:
    """Which TLS failure this is: UNTRUSTED (the server's certificate), NOT_TLS (the other
    side speaks plain HTTP), CLIENT_CERT (ours was refused or missing), OTHER."""
    err = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    if isinstance(err, ssl.SSLCertVerificationError):
        return UNTRUSTED
    upper = str(getattr(err, "reason", None) or err or exc).upper()
    if any(r in upper for r in _NOT_TLS):
        return NOT_TLS
    if any(r in upper for r in _CLIENT_CERT):
        return CLIENT_CERT
    return OTHER


def describe(exc: BaseException, where: str) -> str:
    """One line for a TLS failure talking to `where` (host:port), saying which flag helps."""
    err = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    kind = classify(exc)
    if isinstance(err, ssl.SSLCertVerificationError):
        why = err.verify_message or err.reason or "verification failed"
        return f"TLS certificate of {where} not trusted ({why}); pass --cacert with the CA that signed it"
    reason = str(getattr(err, "reason", None) or err or exc)
    if kind == NOT_TLS:
        return f"{where} does not speak TLS ({reason.lower()}); check the address's scheme (http or https)"
    if kind == CLIENT_CERT:
        return (f"{where} refused our TLS client certificate ({reason.lower()}); pass --cert/--key "
                f"with a certificate its --client-ca trusts")
    return f"TLS with {where} failed ({reason})"

