"""TLS material for the ext_proc server: load ``tls.crt``/``tls.key`` or make a self-signed pair.

Like the Go reference, a missing ``--cert-path`` means a fresh self-signed certificate
at start (proxies are expected to skip verification, as Envoy AI Gateway does).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from epp.errors import ConfigError


def self_signed(common_name: str = "epp", days: int = 3650) -> tuple[bytes, bytes]:
    """Return ``(key_pem, cert_pem)`` for a new self-signed server certificate.

    ECDSA P-256 rather than the reference's RSA-4096: generated in milliseconds
    instead of seconds, and accepted by Envoy/BoringSSL alike.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Inference Ext"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(common_name), x509.DNSName("localhost")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def load_cert_dir(path: str) -> tuple[bytes, bytes]:
    """Read ``tls.key`` and ``tls.crt`` from a directory (a Kubernetes TLS Secret mount)."""
    d = Path(path)
    try:
        return (d / "tls.key").read_bytes(), (d / "tls.crt").read_bytes()
    except OSError as exc:
        raise ConfigError(f"--cert-path {path}: {exc.strerror}: {exc.filename}") from None
