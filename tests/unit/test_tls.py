import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lxd_image_server.service import tls
from lxd_image_server.service.tls import CertResult, TLSError, describe, ensure_certificate

# Every warning is an error here, CryptographyDeprecationWarning (a UserWarning) included.
pytestmark = pytest.mark.filterwarnings("error")

E = TypeVar("E", bound=x509.ExtensionType)

NAMES = ["images.example.org", "10.1.2.3", "[2001:db8::5]", "mirror.example.org."]


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is required for this test (Debian: apt-get install {tool})"
    return path


def load(result: CertResult) -> x509.Certificate:
    with open(result.cert_path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def ext(cert: x509.Certificate, cls: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(cls)


def validity(cert: x509.Certificate) -> tuple[dt.datetime, dt.datetime]:
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    return (
        cert.not_valid_before.replace(tzinfo=dt.UTC),
        cert.not_valid_after.replace(tzinfo=dt.UTC),
    )


def leftovers(directory: str | os.PathLike[str]) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    ssl_dir = tmp_path_factory.mktemp("tls") / "etc" / "ssl"
    return ensure_certificate(str(ssl_dir), NAMES)


def test_creates_pair_with_modes(made):
    ssl_dir = os.path.dirname(made.cert_path)
    assert made.created
    assert made.cert_path == os.path.join(ssl_dir, "nginx.crt")
    assert made.key_path == os.path.join(ssl_dir, "nginx.key")
    assert stat.S_IMODE(os.stat(made.key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(made.cert_path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(ssl_dir).st_mode) == 0o755
    assert leftovers(ssl_dir) == []


def test_modes_do_not_depend_on_umask(tmp_path):
    for umask in (0o000, 0o077):
        old = os.umask(umask)
        try:
            result = ensure_certificate(str(tmp_path / f"u{umask:o}"), ["a.example"])
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(result.key_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(result.cert_path).st_mode) == 0o644
        assert stat.S_IMODE(os.stat(tmp_path / f"u{umask:o}").st_mode) == 0o755


def test_is_its_own_ca_for_server_auth(made):
    cert = load(made)
    assert cert.issuer == cert.subject
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and ku.value.key_cert_sign
    assert not ku.value.key_encipherment  # an EC key
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    public, algorithm = cert.public_key(), cert.signature_hash_algorithm
    assert isinstance(public, ec.EllipticCurvePublicKey) and algorithm is not None
    public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))


def test_key_is_p256_and_matches(made):
    with open(made.key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    public = load(made).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert key.public_key().public_numbers() == public.public_numbers()


def test_subject_alt_names(made):
    cert = load(made)
    san = ext(cert, x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert "images.example.org" in dns
    assert "mirror.example.org" in dns  # trailing dot dropped
    assert {"10.1.2.3", "2001:db8::5", "127.0.0.1", "::1"} <= ips
    assert "10.1.2.3" not in dns
    assert socket.gethostname().lower() in dns
    assert "localhost" in dns
    for addr in tls.machine_addresses():
        assert str(addr) in ips
    assert made.sans == [str(v.value) for v in san]
    assert made.sans[:4] == ["images.example.org", "10.1.2.3", "2001:db8::5", "mirror.example.org"]
    assert len(made.sans) == len(set(made.sans))


def test_discovers_the_addresses_hostname_reports(made):
    # `hostname -I` (getifaddrs) lists every address but loopback and IPv6 link-local.
    out = subprocess.run(
        [need("hostname"), "-I"], capture_output=True, text=True, check=True
    ).stdout
    reported = {ipaddress.ip_address(a) for a in out.split()}
    reported = {a for a in reported if not a.is_link_local}
    assert reported <= set(tls.machine_addresses())
    assert {str(a) for a in reported} <= set(made.sans)


def test_machine_addresses_exclude_loopback_and_link_local():
    for addr in tls.machine_addresses():
        assert not addr.is_loopback and not addr.is_link_local and not addr.is_unspecified


def test_proc_parsers(tmp_path):
    inet6 = tmp_path / "if_inet6"
    inet6.write_text(
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "20010db8000000000000000000000042 02 40 00 00     eth0\n"
        "garbage\n"
    )
    assert tls._ipv6_of_interfaces(str(inet6)) == [
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("2001:db8::42"),
    ]
    fib = tmp_path / "fib_trie"
    fib.write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n"
        "     +-- 10.0.0.0/24 2 0 2\n        |-- 10.0.0.0\n           /24 link UNICAST\n"
        "        |-- 10.0.0.7\n           /32 host LOCAL\n"
        "        |-- 10.0.0.8\n           /24 link UNICAST\n           /32 host LOCAL\n"
        "        |-- 10.0.0.255\n           /32 link BROADCAST\n"
    )
    assert tls._ipv4_of_fib(str(fib)) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("10.0.0.8"),
    ]
    assert tls._ipv4_of_fib(str(tmp_path / "missing")) == []
    assert tls._ipv6_of_interfaces(str(tmp_path / "missing")) == []


def test_common_name_and_validity(made):
    cert = load(made)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "images.example.org"
    start, end = validity(cert)
    now = dt.datetime.now(dt.UTC)
    assert start <= now < end
    assert end - start == dt.timedelta(days=3650)


def test_common_name_defaults_to_host_name(tmp_path):
    result = ensure_certificate(str(tmp_path / "ssl"), [])
    cert = load(result)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == socket.gethostname().lower()
    assert {"127.0.0.1", "::1", "localhost"} <= set(result.sans)


def test_ip_as_first_name_is_the_common_name(tmp_path):
    cert = load(ensure_certificate(str(tmp_path), ["192.0.2.9"]))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "192.0.2.9"


def test_unicode_names_are_idna_encoded(tmp_path):
    result = ensure_certificate(str(tmp_path), ["Bücher.example"])
    assert result.sans[0] == "xn--bcher-kva.example"


def test_serial_is_random(tmp_path):
    a = load(ensure_certificate(str(tmp_path / "a"), ["x.example"]))
    b = load(ensure_certificate(str(tmp_path / "b"), ["x.example"]))
    assert a.serial_number != b.serial_number
    assert a.serial_number > 2**64


def test_existing_pair_is_kept(tmp_path):
    first = ensure_certificate(str(tmp_path), ["one.example"])
    before = (tmp_path / "nginx.crt").read_bytes(), (tmp_path / "nginx.key").read_bytes()
    again = ensure_certificate(str(tmp_path), ["two.example"])
    assert not again.created
    assert again.sans == first.sans
    assert "two.example" not in again.sans
    assert ((tmp_path / "nginx.crt").read_bytes(), (tmp_path / "nginx.key").read_bytes()) == before


def test_force_replaces_the_pair(tmp_path):
    ensure_certificate(str(tmp_path), ["one.example"])
    before = (tmp_path / "nginx.crt").read_bytes(), (tmp_path / "nginx.key").read_bytes()
    forced = ensure_certificate(str(tmp_path), ["two.example"], force=True)
    assert forced.created
    assert "two.example" in forced.sans and "one.example" not in forced.sans
    after = (tmp_path / "nginx.crt").read_bytes(), (tmp_path / "nginx.key").read_bytes()
    assert after[0] != before[0] and after[1] != before[1]
    assert stat.S_IMODE(os.stat(tmp_path / "nginx.key").st_mode) == 0o600
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("lone", ["nginx.crt", "nginx.key"])
def test_half_a_pair_is_an_error_unless_forced(tmp_path, lone):
    ensure_certificate(str(tmp_path), ["one.example"])
    other = "nginx.key" if lone == "nginx.crt" else "nginx.crt"
    (tmp_path / other).unlink()
    kept = (tmp_path / lone).read_bytes()
    with pytest.raises(TLSError, match=other):
        ensure_certificate(str(tmp_path), ["one.example"])
    assert (tmp_path / lone).read_bytes() == kept
    assert not (tmp_path / other).exists()
    assert ensure_certificate(str(tmp_path), ["one.example"], force=True).created
    assert (tmp_path / other).exists()


def admin_pair(directory: Path, cn: str = "real.example") -> rsa.RSAPrivateKey:
    """A certificate 'from a real CA' with an RSA key, as an admin would drop in."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "nginx.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "nginx.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return key


def test_admin_certificate_is_kept_and_described(tmp_path):
    admin_pair(tmp_path)
    result = ensure_certificate(str(tmp_path), ["images.example.org"])
    assert not result.created
    assert result.sans == ["real.example"]
    text = describe(result.cert_path)
    assert "CN=real.example" in text
    assert "CN=Some CA" in text


def test_mismatched_pair_is_an_error(tmp_path):
    admin_pair(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    admin_pair(other)
    os.replace(other / "nginx.key", tmp_path / "nginx.key")
    with pytest.raises(TLSError, match="not the key of"):
        ensure_certificate(str(tmp_path), [])
    assert ensure_certificate(str(tmp_path), [], force=True).created


def test_garbage_certificate_is_an_error(tmp_path):
    (tmp_path / "nginx.crt").write_text("not a certificate\n")
    (tmp_path / "nginx.key").write_text("not a key\n")
    with pytest.raises(TLSError, match="not a PEM certificate"):
        ensure_certificate(str(tmp_path), [])


@pytest.mark.parametrize("bad", ["", " ", "bad name.example", "-x.example", "a..b", "x" * 64])
def test_bad_hostnames_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="invalid host name"):
        ensure_certificate(str(tmp_path), ["good.example", bad])
    assert not os.listdir(tmp_path)


def test_a_single_string_is_not_a_list_of_names(tmp_path):
    with pytest.raises(TypeError):
        ensure_certificate(str(tmp_path), "images.example.org")


def test_describe(made):
    text = describe(made.cert_path)
    with open(made.cert_path, encoding="ascii") as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    fingerprint = hashlib.sha256(der).hexdigest().upper()
    assert f"sha256:      {':'.join(fingerprint[i : i + 2] for i in range(0, 64, 2))}" in text
    assert "CN=images.example.org" in text
    assert "self-signed" in text
    assert "images.example.org, 10.1.2.3, 2001:db8::5" in text
    assert validity(load(made))[1].strftime("%Y-%m-%d %H:%M:%S") in text


def test_describe_missing_file(tmp_path):
    with pytest.raises(TLSError, match="cannot read"):
        describe(str(tmp_path / "nope.crt"))


def handshake(result: CertResult, server_hostname: str) -> str:
    """A real TLS handshake over a socket pair; the client trusts only our certificate."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(result.cert_path, result.key_path)
    client_ctx = ssl.create_default_context(cafile=result.cert_path)
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    a, b = socket.socketpair()
    errors = []

    def serve():
        try:
            with server_ctx.wrap_socket(b, server_side=True) as s:
                s.sendall(b"hello")
        except (OSError, ssl.SSLError) as e:
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client_ctx.wrap_socket(a, server_hostname=server_hostname) as c:
            c.settimeout(30)
            data = c.recv(5)
    finally:
        thread.join(30)
    assert data == b"hello", errors
    return data.decode()


@pytest.mark.parametrize(
    "name", ["images.example.org", "10.1.2.3", "127.0.0.1", "::1", "localhost"]
)
def test_tls_handshake_succeeds_for_its_names(made, name):
    assert handshake(made, name) == "hello"


def test_tls_handshake_fails_for_other_names(made):
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(made, "elsewhere.example")
