"""The certificate `init` and `run` make, checked by the openssl command-line tool: another
implementation than the one that made it (cryptography) must accept it as a trust anchor for
its names, refuse it for other names, and see the fingerprint `describe` shows."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lxd_image_server.service.tls import CertResult, describe, ensure_certificate

from ..unit.test_tls import NAMES

pytestmark = pytest.mark.filterwarnings("error")


def openssl() -> str:
    path = shutil.which("openssl")
    assert path, "openssl is required for this test (Debian: apt-get install openssl)"
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> CertResult:
    ssl_dir = tmp_path_factory.mktemp("tls") / "etc" / "ssl"
    return ensure_certificate(str(ssl_dir), NAMES)


def test_describe_shows_the_fingerprint_openssl_computes(made: CertResult) -> None:
    out = subprocess.run(
        [openssl(), "x509", "-in", made.cert_path, "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fingerprint = out.strip().split("=", 1)[1]
    assert f"sha256:      {fingerprint}" in describe(made.cert_path)


@pytest.mark.parametrize(
    "check", [["-verify_hostname", "images.example.org"], ["-verify_ip", "10.1.2.3"]]
)
def test_openssl_verifies_it_as_a_trust_anchor(made: CertResult, check: list[str]) -> None:
    result = subprocess.run(
        [
            *(openssl(), "verify", "-x509_strict", "-purpose", "sslserver"),
            *("-CAfile", made.cert_path, *check, made.cert_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_openssl_rejects_a_name_not_in_it(made: CertResult) -> None:
    result = subprocess.run(
        [
            *(openssl(), "verify", "-CAfile", made.cert_path),
            *("-verify_hostname", "elsewhere.example", made.cert_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
