"""Certificates and keys for a trial deployment: a local CA, the SuperLink's TLS certificate, one authentication key
pair per merchant. Production swaps in certificates from a real CA and keys each merchant generates itself; the
file names below are all the aggregator and merchant configs refer to.

Layout written by ``write_certificates(out, merchants, hosts)``:
- ``ca.crt`` (the root certificate every merchant gets) and ``ca.key`` (kept by the operator, 0600);
- ``server.crt`` / ``server.key`` (the SuperLink's TLS pair, SANs: localhost, 127.0.0.1, ::1 and ``hosts``);
- ``merchant-<i>.key`` / ``merchant-<i>.pub``: EC P-384 in OpenSSH format, as Flower's SuperNode authentication
  expects (the private key goes to merchant i, the public key is registered at the SuperLink).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedaug.common.atomic import staged_directory
from fedaug.common.errors import ConfigError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


def merchant_key_names(i: int) -> tuple[str, str]:
    """(private, public) file names of merchant ``i``'s authentication key pair."""
    return f"merchant-{i}.key", f"merchant-{i}.pub"


def write_certificates(out: Path, merchants: int, hosts: tuple[str, ...] = ()) -> list[Path]:
    """Write the layout above into ``out`` (which must not exist or be empty). All files appear at once: they are
    written to a sibling temporary directory that is renamed into place."""
    out = Path(out)
    if merchants < 0:
        raise ConfigError(f"--merchants: must be 0 or more, got {merchants}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not an empty directory (certificates are never overwritten)")
    san = _subject_alt_names(DEFAULT_HOSTS + tuple(hosts))
    with staged_directory(out) as tmp:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = _certificate("fedaug trial CA", ca_key.public_key(), ca_key, None, is_ca=True)
        server_key = ec.generate_private_key(ec.SECP384R1())
        server_cert = _certificate("fedaug superlink", server_key.public_key(), ca_key, ca_cert, san=san)
        _write(tmp / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(tmp / CA_KEY, _pem_private(ca_key), 0o600)
        _write(tmp / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(tmp / SERVER_KEY, _pem_private(server_key), 0o600)
        for i in range(1, merchants + 1):
            private_name, public_name = merchant_key_names(i)
            key = ec.generate_private_key(ec.SECP384R1())
            private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption())
            _write(tmp / private_name, private, 0o600)
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            _write(tmp / public_name, public + f" merchant-{i}\n".encode(), 0o644)
        os.chmod(tmp, 0o700)
    return sorted(out.iterdir())


def _subject_alt_names(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts if h.strip()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in host):
                raise ConfigError(f"--host: {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(common_name, public_key, signing_key, issuer: x509.Certificate | None, *, is_ca=False, san=None):
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedaug"),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(san, critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                                  critical=False))
    return builder.sign(signing_key, hashes.SHA384())


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # created with its final mode: never readable
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # umask may have narrowed a public file
