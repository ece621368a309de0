"""``vmferry host certs`` and the TLS directory checks."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from vmferry.cli.main import cli
from vmferry.errors import ConfigError
from vmferry.host.serve import plaintext_warnings
from vmferry.host.tls import TlsConfig, explain, make_certs


def test_host_certs_makes_a_ca_and_one_certificate_per_host(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    result = CliRunner().invoke(cli, ["host", "certs", "--out", str(out), "--hosts", "A,B"])
    assert result.exit_code == 0, result.output
    assert "--tls-dir" in result.output
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    for name in ("A", "B"):
        cert = x509.load_pem_x509_certificate((out / name / "cert.pem").read_bytes())
        assert cert.issuer == ca.subject
        assert cert.subject.rfc4514_string() == f"CN={name}"
        assert (out / name / "key.pem").stat().st_mode & 0o777 == 0o600
        config = TlsConfig.load(out / name)
        assert config.server_context().verify_mode is ssl.CERT_REQUIRED
        assert config.client_context().verify_mode is ssl.CERT_REQUIRED
    assert (out / "ca.key").stat().st_mode & 0o777 == 0o600


def test_bad_inputs_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distinct"):
        make_certs(tmp_path / "x", ["A", "A"])
    with pytest.raises(ConfigError, match="cannot name"):
        make_certs(tmp_path / "y", ["../evil"])
    make_certs(tmp_path / "z", ["A"])
    with pytest.raises(ConfigError, match="already holds a CA"):
        make_certs(tmp_path / "z", ["B"])
    with pytest.raises(ConfigError, match=r"has no ca\.pem"):
        TlsConfig.load(tmp_path)
    (tmp_path / "z" / "A" / "key.pem").chmod(0o644)
    with pytest.raises(ConfigError, match="read by others"):
        TlsConfig.load(tmp_path / "z" / "A")


def test_explain_names_the_cause() -> None:
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    assert "plaintext peer" in explain(plain, "x", server=True)
    unknown = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    assert "another cluster's CA" in explain(unknown, "x", server=True)


def test_issue14_item3_plaintext_beyond_loopback_is_warned_of(tmp_path: Path) -> None:
    lo, wide = ("127.0.0.1", 7001), ("192.0.2.7", 7002)
    assert plaintext_warnings(None, lo, ("::1", 7002)) == []
    warned = plaintext_warnings(None, ("0.0.0.0", 7001), wide)
    assert [w.split(" listens")[0] for w in warned] == ["control API", "migration listener"]
    assert all("without TLS" in w and "--tls-dir" in w for w in warned)
    assert plaintext_warnings(None, lo, wide) == [
        "migration listener listens on 192.0.2.7 without TLS: guest memory and tokens cross "
        "the network in clear (serve with --tls-dir)"]
    make_certs(tmp_path, ["A"])
    assert plaintext_warnings(TlsConfig.load(tmp_path / "A"), ("0.0.0.0", 7001), wide) == []
