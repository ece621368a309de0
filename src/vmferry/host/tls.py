"""Mutual TLS between the hosts of a cluster (and the CLI that drives them).

One certificate authority per cluster; one certificate per host, valid for both ends of a
connection (server and client).  ``vmferry host certs --out DIR --hosts A,B`` writes::

    DIR/ca.pem  DIR/ca.key            the cluster's CA (keep ca.key offline)
    DIR/A/ca.pem  DIR/A/cert.pem  DIR/A/key.pem
    DIR/B/...

``vmferry host serve --tls-dir DIR/A`` serves its control API (https) and its migration
listener with A's certificate and requires a client certificate signed by the same CA on
both; as a client (calling a destination's control API, opening a migration connection)
it presents A's certificate and accepts only peers the CA signed.  Membership of the
cluster is the credential -- like the bearer token -- so peer names are not checked
against addresses (hosts are often reached by an IP the certificate cannot know).  The
one-time migration token still guards each migration connection.

Keys are ECDSA P-256; the contexts require TLS 1.3.  Files under a TLS directory must be
readable by their owner only when they hold a key.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmferry.errors import ConfigError

CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "cert.pem", "key.pem"
VALID_DAYS = 825
TLS_DIR_ENV = "VMFERRY_TLS_DIR"
log = logging.getLogger("vmferry.host.tls")


# --- making certificates -----------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))  # fmt: skip


def make_certs(out: Path, hosts: list[str], days: int = VALID_DAYS) -> list[Path]:
    """A new CA in ``out`` and a certificate per host in ``out/HOST``; returns the host
    directories.  ConfigError for a bad host name or an ``out`` that already holds a CA."""
    for name in hosts:
        if not name or "/" in name or name.startswith(".") or len(name) > 64:
            raise ConfigError(f"host name {name!r} cannot name a certificate directory")
    if len(set(hosts)) != len(hosts) or not hosts:
        raise ConfigError(f"--hosts needs distinct names, got {hosts}")
    if (out / "ca.key").exists():
        raise ConfigError(f"{out} already holds a CA; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vmferry cluster CA {out.name}")])
    ca = (_builder(ca_name, ca_name, ca_key.public_key(), days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    _write_key(out / "ca.key", ca_key)
    _write_cert(out / CA_FILE, ca)
    dirs = []
    for name in hosts:
        d = out / name
        d.mkdir(exist_ok=True)
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        san = x509.SubjectAlternativeName([
            x509.DNSName(name), x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ])  # fmt: skip
        cert = (_builder(subject, ca_name, key.public_key(), days)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(san, critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))  # fmt: skip
        _write_key(d / KEY_FILE, key)
        _write_cert(d / CERT_FILE, cert)
        _write_cert(d / CA_FILE, ca)
        dirs.append(d)
    return dirs


# --- using them --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsConfig:
    """A host's TLS directory: its certificate, key and the cluster's CA."""

    directory: Path

    @classmethod
    def load(cls, directory: Path) -> TlsConfig:
        """ConfigError naming the missing file or a key others can read."""
        for name in (CA_FILE, CERT_FILE, KEY_FILE):
            if not (directory / name).is_file():
                raise ConfigError(f"TLS directory {directory} has no {name} "
                                  "(make one with 'vmferry host certs')")  # fmt: skip
        if (directory / KEY_FILE).stat().st_mode & 0o077:
            raise ConfigError(f"{directory / KEY_FILE} can be read by others; chmod 600 it")
        config = cls(directory)
        config.server_context()  # fail now, not at the first connection
        return config

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.create_default_context(purpose, cafile=str(self.directory / CA_FILE))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(self.directory / CERT_FILE, self.directory / KEY_FILE)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"TLS directory {self.directory}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Serves with this host's certificate; requires a client certificate of the CA.
        Sends no session tickets: a ticket arriving after the handshake would make an
        idle connection look readable to a peer that polls it for an error report."""
        ctx = self._context(ssl.Purpose.CLIENT_AUTH)
        ctx.num_tickets = 0
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Presents this host's certificate; accepts a server certificate of the CA."""
        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = False  # cluster membership is the credential (module doc)
        return ctx


def client_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """The client context of a host that serves TLS; None for a plaintext host."""
    return tls.client_context() if tls is not None else None


class _LoggingSSLObject(ssl.SSLObject):
    """An SSLObject that reports a failed server handshake (asyncio keeps those quiet)."""

    purpose = "TLS server"

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            log.warning("%s refused a connection: %s", self.purpose,
                        explain(exc, "the client", server=True))
            raise


def logging_server_context(config: TlsConfig, purpose: str) -> ssl.SSLContext:
    """:meth:`TlsConfig.server_context` whose failed handshakes are logged as warnings
    naming the reason (plaintext client, certificate of another CA, none at all)."""
    ctx = config.server_context()
    cls = type("LoggingSSLObject", (_LoggingSSLObject,), {"purpose": purpose})
    ctx.sslobject_class = cls
    return ctx


def explain(exc: BaseException, peer: str, *, server: bool) -> str:
    """One line for an operator about a failed TLS handshake with ``peer``."""
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return (f"TLS: {peer}'s certificate is not signed by this cluster's CA "
                f"({getattr(exc, 'verify_message', '') or text})")  # fmt: skip
    if "UNKNOWN_CA" in text.upper() or "unknown ca" in text:
        return f"TLS: {peer} does not trust this host's certificate (another cluster's CA?)"
    if "CERTIFICATE_REQUIRED" in text.upper() or "PEER_DID_NOT_RETURN" in text.upper():
        return (f"TLS: {peer} presented no certificate" if server else
                f"TLS: {peer} requires a client certificate of its CA")  # fmt: skip
    if "WRONG_VERSION_NUMBER" in text.upper() or "HTTP_REQUEST" in text.upper():
        return (f"TLS: {peer} does not speak TLS (a plaintext peer)" if server else
                f"TLS: {peer} does not speak TLS (serve it with --tls-dir too)")  # fmt: skip
    return f"TLS handshake with {peer} failed: {text}"


