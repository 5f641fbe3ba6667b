"""The TLS certificate of the ingress: the organiser's wildcard, or a self-signed one.

With ``CTF_INGRESS_CERT_FILE`` / ``CTF_INGRESS_KEY_FILE`` unset, set-up makes a self-signed
certificate for ``*.<CTF_INSTANCE_DOMAIN>`` (and the domain itself) in the data folder, and
makes it again when the domain changes.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from celery_app.errors import InvalidRequest
from celery_app.settings import Settings

# A self-signed certificate lives this long; set-up makes a new one once it is past half.
SELF_SIGNED_DAYS = 825


def _names(cert_path: Path) -> tuple[set[str], datetime.datetime]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = set()
    return names, cert.not_valid_after_utc


def self_signed(domain: str, cert_path: Path, key_path: Path) -> None:
    """Write a self-signed wildcard certificate for ``domain`` and its key (mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(f"*.{domain}"), x509.DNSName(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_key = key_path.with_name(f".{key_path.name}.tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    tmp_key.replace(key_path)
    tmp_cert = cert_path.with_name(f".{cert_path.name}.tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp_cert.replace(cert_path)


def ensure_certificate(settings: Settings, directory: Path) -> tuple[Path, Path]:
    """Return the certificate and key files the ingress serves.

    Args:
        settings: the settings (``CTF_INGRESS_CERT_FILE`` / ``KEY_FILE``, the domain).
        directory: where a self-signed certificate is kept.

    Returns:
        ``(cert_file, key_file)``.

    Raises:
        InvalidRequest: the given files are missing or do not cover the instance domain.
    """
    domain = settings.instance_domain
    if settings.ingress_cert_file is not None and settings.ingress_key_file is not None:
        cert, key = settings.ingress_cert_file, settings.ingress_key_file
        for path in (cert, key):
            if not path.is_file():
                raise InvalidRequest(f"{path} (CTF_INGRESS_CERT_FILE/KEY_FILE) does not exist")
        try:
            names, _ = _names(cert)
        except ValueError as exc:
            raise InvalidRequest(f"CTF_INGRESS_CERT_FILE {cert} is not a PEM certificate: "
                                 f"{exc}") from None
        if f"*.{domain}" not in names:
            raise InvalidRequest(
                f"CTF_INGRESS_CERT_FILE {cert} does not cover *.{domain} (it names "
                f"{sorted(names) or 'nothing'}); use a wildcard certificate for "
                "CTF_INSTANCE_DOMAIN"
            )
        return cert.resolve(), key.resolve()
    cert, key = directory / "selfsigned.crt", directory / "selfsigned.key"
    fresh = False
    if cert.is_file() and key.is_file():
        names, until = _names(cert)
        remaining = until - datetime.datetime.now(datetime.UTC)
        fresh = f"*.{domain}" in names and remaining > datetime.timedelta(
            days=SELF_SIGNED_DAYS // 2)
    if not fresh:
        self_signed(domain, cert, key)
    return cert.resolve(), key.resolve()
