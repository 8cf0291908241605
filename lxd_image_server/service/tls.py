"""The server's self-signed TLS certificate, for nginx (`nginx.crt` + `nginx.key`).

LXD and Incus only talk to simplestreams remotes over HTTPS with a certificate their host
trusts, so the certificate is made usable as its own CA: copy `nginx.crt` to
/usr/local/share/ca-certificates/ on each client, run update-ca-certificates, done.

The key is ECDSA P-256: as strong as RSA 3072 (128-bit security), generated instantly, with
small handshakes, and accepted by every client that matters (Go's crypto/tls in LXD/Incus,
OpenSSL, GnuTLS, browsers). An existing pair is never replaced unless asked to, so an admin
can drop in a certificate from a real CA.

Only the x509 builder API of `cryptography` is used, in the form that exists in Debian 12's
python3-cryptography 38 and is not deprecated in current releases.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lxd_image_server.config import ServiceError
from lxd_image_server.fsutil import fsync_dir, write_atomic

log = logging.getLogger(__name__)

CERT_NAME = "nginx.crt"
KEY_NAME = "nginx.key"
VALIDITY = dt.timedelta(days=3650)
#: Backdating of notBefore, so a client whose clock is a little behind accepts a new certificate.
BACKDATE = dt.timedelta(minutes=5)
ORGANIZATION = "lxd-image-server (self-signed)"
LOOPBACK = ("127.0.0.1", "::1")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TLSError(ServiceError):
    """The certificate or key cannot be used or created as asked."""


@dataclass(frozen=True)
class CertResult:
    cert_path: str
    key_path: str
    created: bool  # False when an existing pair was kept
    sans: list[str]  # subjectAltName entries: DNS names and IP addresses, as text


def ensure_certificate(ssl_dir: str, hostnames: Sequence[str], force: bool = False) -> CertResult:
    """Makes sure `ssl_dir` holds a certificate and key for nginx; creates them if needed.

    An existing pair is kept (and checked to belong together) unless `force`; a lone
    certificate or a lone key is an error unless `force`. The new certificate names every one
    of `hostnames` (IP addresses become IP entries), the machine's host name and FQDN,
    `localhost`, the loopback addresses and the machine's own addresses.
    """
    if isinstance(hostnames, str):
        raise TypeError("hostnames must be a sequence of names, not one string")
    for name in hostnames:  # bad names are an error even when the pair is kept
        _parse_name(name)
    cert_path = os.path.join(ssl_dir, CERT_NAME)
    key_path = os.path.join(ssl_dir, KEY_NAME)

    if not force:
        have_cert, have_key = os.path.lexists(cert_path), os.path.lexists(key_path)
        if have_cert and have_key:
            cert = _check_pair(cert_path, key_path)
            log.info("keeping the existing certificate %s", cert_path)
            return CertResult(cert_path, key_path, False, _sans_of(cert))
        if have_cert or have_key:
            present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
            raise TLSError(
                f"{present} exists but {missing} does not: put the missing file in place, "
                "or remove the other one (or force) to have a new self-signed pair made"
            )

    if not os.path.isdir(ssl_dir):
        os.makedirs(ssl_dir, exist_ok=True)
        os.chmod(ssl_dir, 0o755)

    entries = _san_entries(hostnames)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build(key, _common_name(hostnames), entries)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: a crash between the two renames leaves a new key with the old
    # certificate, which the next run reports (the pair is checked) instead of using.
    write_atomic(key_path, key_pem, 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    fsync_dir(ssl_dir)
    sans = _sans_of(cert)
    log.info("created the self-signed certificate %s for %s", cert_path, ", ".join(sans))
    return CertResult(cert_path, key_path, True, sans)


def describe(cert_path: str) -> str:
    """A few lines about the certificate, for a person: subject, names, fingerprint, expiry."""
    cert = _load_cert(cert_path)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    not_after = _not_after(cert).strftime("%Y-%m-%d %H:%M:%S UTC")
    sans = _sans_of(cert)
    issuer = "self-signed" if cert.issuer == cert.subject else cert.issuer.rfc4514_string()
    return "\n".join(
        [
            f"certificate: {cert_path}",
            f"subject:     {cert.subject.rfc4514_string()}",
            f"issuer:      {issuer}",
            f"names:       {', '.join(sans) if sans else '(none)'}",
            f"sha256:      {fingerprint}",
            f"not after:   {not_after}",
        ]
    )


# ---- names -------------------------------------------------------------------------------


def _parse_name(name: str) -> x509.GeneralName:
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):  # [2001:db8::1]
        text = text[1:-1]
    if not text:
        raise ValueError(f"invalid host name {name!r}: empty")
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    text = text.rstrip(".").lower()
    try:
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise ValueError(f"invalid host name {name!r}: {e}") from None
    labels = ascii_name.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 2:
            continue
        if not label or len(label) > 63 or not all(c.isalnum() or c in "-_" for c in label):
            raise ValueError(f"invalid host name {name!r}")
        if label.startswith("-") or label.endswith("-"):
            raise ValueError(f"invalid host name {name!r}: a label starts or ends with '-'")
    if len(ascii_name) > 253:
        raise ValueError(f"invalid host name {name!r}: longer than 253 characters")
    return x509.DNSName(ascii_name)


def _machine_names() -> list[str]:
    names: list[str] = []
    host = socket.gethostname()
    if host:
        names.append(host)
    with contextlib.suppress(OSError, UnicodeError):
        fqdn = socket.getfqdn()
        if fqdn and fqdn != host and not fqdn.startswith(("localhost", "ip6-")):
            names.append(fqdn)
    names.append("localhost")
    return names


def _usable(addr: IPAddress) -> bool:
    """A machine address worth naming: not loopback, link-local, multicast or unspecified."""
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified)


def _ipv4_of_fib(path: str = "/proc/net/fib_trie") -> list[IPAddress]:
    """Every local IPv4 address (secondary ones too), from the kernel's routing trie: a leaf
    line `|-- 192.0.2.2` with a `/32 host LOCAL` line under it."""
    found: list[IPAddress] = []
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    leaf = ""
    for line in lines:
        text = line.strip()
        if text.startswith(("|-- ", "+-- ")):
            leaf = text[4:] if text.startswith("|") else ""
        elif leaf and text == "/32 host LOCAL":
            with contextlib.suppress(ValueError):
                found.append(ipaddress.IPv4Address(leaf))
    return found


def _ipv4_of_interfaces() -> list[IPAddress]:
    """Each interface's (primary) IPv4 address, via the SIOCGIFADDR ioctl."""
    siocgifaddr = 0x8915
    found: list[IPAddress] = []
    try:
        interfaces = socket.if_nameindex()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return found
    with sock:
        for _index, name in interfaces:
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), siocgifaddr, request)
            except OSError:  # no IPv4 address on this interface
                continue
            found.append(ipaddress.IPv4Address(reply[20:24]))
    return found


def _ipv6_of_interfaces(path: str = "/proc/net/if_inet6") -> list[IPAddress]:
    """Every IPv6 address of the machine, from /proc/net/if_inet6 (32 hex digits first)."""
    found: list[IPAddress] = []
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if fields and len(fields[0]) == 32:
                    with contextlib.suppress(ValueError):
                        found.append(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    except OSError:
        pass
    return found


def _ips_of_name(host: str) -> list[IPAddress]:
    found: list[IPAddress] = []
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return found
    for _family, _type, _proto, _canon, sockaddr in infos:
        with contextlib.suppress(ValueError):
            found.append(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
    return found


def machine_addresses() -> list[IPAddress]:
    """The machine's own addresses (not loopback, not link-local); never fails, may be empty."""
    seen: dict[IPAddress, None] = {}
    for addr in (
        *_ipv4_of_fib(),
        *_ipv4_of_interfaces(),
        *_ipv6_of_interfaces(),
        *_ips_of_name(socket.gethostname()),
    ):
        if _usable(addr):
            seen.setdefault(addr, None)
    return list(seen)


def _san_entries(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    entries: dict[x509.GeneralName, None] = {}
    for name in hostnames:
        entries.setdefault(_parse_name(name), None)
    for name in _machine_names():
        try:
            entries.setdefault(_parse_name(name), None)
        except ValueError:
            log.warning("leaving the host name %r out of the certificate: not a DNS name", name)
    for text in LOOPBACK:
        entries.setdefault(x509.IPAddress(ipaddress.ip_address(text)), None)
    for addr in machine_addresses():
        entries.setdefault(x509.IPAddress(addr), None)
    return list(entries)


def _san_text(entry: x509.GeneralName) -> str:
    if isinstance(entry, x509.DNSName | x509.IPAddress):
        return str(entry.value)
    return f"{type(entry).__name__}:{entry.value}"  # URIs, e-mail addresses... in other certs


def _common_name(hostnames: Sequence[str]) -> str:
    """The first name given (as written in the certificate), else the host name; <= 64 chars."""
    candidates = [*hostnames, socket.gethostname(), "lxd-image-server"]
    for name in candidates:
        try:
            entry = _parse_name(name)
        except ValueError:
            continue
        text = _san_text(entry)
        if len(text) <= 64:
            return text
    return "lxd-image-server"


# ---- building and reading ----------------------------------------------------------------


def _build(
    key: ec.EllipticCurvePrivateKey, common_name: str, entries: list[x509.GeneralName]
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    public = key.public_key()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    key_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,  # ECDSA keys sign; they do not encipher
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now - BACKDATE + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .add_extension(x509.SubjectAlternativeName(entries), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _load_cert(cert_path: str) -> x509.Certificate:
    try:
        with open(cert_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSError(f"cannot read the certificate {cert_path}: {e.strerror}") from e
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise TLSError(f"{cert_path} is not a PEM certificate: {e}") from e


def _check_pair(cert_path: str, key_path: str) -> x509.Certificate:
    """The certificate, after checking that the key (when readable here) belongs to it."""
    cert = _load_cert(cert_path)
    try:
        with open(key_path, "rb") as f:
            key_data = f.read()
    except OSError as e:
        raise TLSError(f"cannot read the key {key_path}: {e.strerror}") from e
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:  # encrypted: nginx needs ssl_password_file; not ours to check
        return cert
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSError(f"{key_path} is not a usable PEM private key: {e}") from e
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise TLSError(
            f"{key_path} is not the key of {cert_path}: replace one of them, "
            "or force a new self-signed pair"
        )
    return cert


def _sans_of(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [_san_text(entry) for entry in ext.value]


def _not_after(cert: x509.Certificate) -> dt.datetime:
    """notAfter as an aware datetime: `not_valid_after_utc` where it exists (cryptography 42+),
    else the naive UTC `not_valid_after` of older releases (deprecated since 42)."""
    aware = getattr(cert, "not_valid_after_utc", None)
    if isinstance(aware, dt.datetime):
        return aware
    naive: dt.datetime = getattr(cert, "not_valid_after")  # noqa: B009 - not on new releases
    return naive.replace(tzinfo=dt.UTC)


# ---- files -------------------------------------------------------------------------------
