"""TLS certificates and SuperNode authentication keys for a Flower deployment.

Flower 1.42 expects (verified against real ``flower-superlink`` / ``flower-supernode``
processes):

* SuperLink TLS: ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key``, PEM files. The same certificate serves every API (Fleet,
  Control, Runtime: one HTTPS port), so its SubjectAltName must name every host the
  SuperNodes and the ``flwr`` CLI dial (hostname verification is on).
* SuperNodes and the CLI trust the SuperLink with ``--root-certificates ca.crt`` and the
  ``root-certificates`` key (an absolute path) of a ``[superlink.NAME]`` connection in
  ``$FLWR_HOME/config.toml``.
* SuperNode authentication (``flower-superlink --enable-supernode-auth``): each SuperNode
  holds an elliptic-curve key on a NIST curve (Flower itself generates SECP384R1); the
  private key is an *OpenSSH* private key file (``-----BEGIN OPENSSH PRIVATE KEY-----``,
  unencrypted), passed as ``--auth-supernode-private-key``; the public key is an
  OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA... comment``) that an operator
  registers with ``flwr supernode register KEY.pub CONNECTION`` before the node
  connects. ``--auth-list-public-keys`` is gone (the SuperLink exits when given it).

This module only writes and checks files; it imports neither flwr nor torch.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "NIST_CURVES",
    "LOOPBACK_HOSTS",
    "CertPaths",
    "NodeKeyPaths",
    "make_certificates",
    "make_node_keys",
    "read_public_key",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
PUBLIC_KEY_SUFFIX = ".pub"
# Always in the server certificate: the SuperLink starts its own SuperExec, which dials the
# Runtime API on loopback (127.0.0.1 also when the SuperLink binds 0.0.0.0, ::1 for ::)
# over the same certificate; without these names it dies on "IP address mismatch".
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# The curves Flower accepts for SuperNode keys (flwr.supercore.primitives.asymmetric).
NIST_CURVES: tuple[type[ec.EllipticCurve], ...] = (
    ec.SECP192R1,
    ec.SECP224R1,
    ec.SECP256R1,
    ec.SECP384R1,
    ec.SECP521R1,
)
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class CertPaths:
    """Where `make_certificates` wrote the CA and the SuperLink's certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPaths:
    """Where `make_node_keys` wrote a SuperNode's key pair."""

    private_key: Path
    public_key: Path


def _refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` created with ``mode`` (a secret never exists wider)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # os.open's mode is filtered by the umask


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class _Validity:
    """The validity window every certificate of one `make_certificates` call shares."""

    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def starting_now(cls, days: int) -> _Validity:
        """From five minutes ago (tolerating small clock skew) to ``days`` from now."""
        now = dt.datetime.now(dt.UTC)
        return cls(now - dt.timedelta(minutes=5), now + dt.timedelta(days=days))


@dataclass(frozen=True)
class _Issued:
    """A signed certificate and its private key."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _certificate_hosts(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Check ``hosts``; return them stripped (empty ones dropped) and the server
    certificate's SubjectAltName hosts (them plus `LOOPBACK_HOSTS`, without repeats)."""
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of host names, not one string")
    names = [h.strip() for h in hosts if h.strip()]
    if not names:
        raise ValueError("hosts must name at least one host name or IP address")
    return names, list(dict.fromkeys([*names, *LOOPBACK_HOSTS]))


def _cert_paths(out_dir: Path) -> CertPaths:
    """Where the CA and server files of ``out_dir`` go."""
    return CertPaths(
        ca_cert=out_dir / CA_CERT,
        ca_key=out_dir / CA_KEY,
        server_cert=out_dir / SERVER_CERT,
        server_key=out_dir / SERVER_KEY,
    )


def _key_usage(*, key_cert_sign: bool, key_agreement: bool) -> x509.KeyUsage:
    """A KeyUsage with digital_signature, plus certificate and CRL signing for a CA
    (``key_cert_sign``) or key agreement for a TLS server (``key_agreement``)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_name() -> x509.Name:
    """The private CA's subject (and every certificate's issuer)."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgekd"),
            x509.NameAttribute(NameOID.COMMON_NAME, "edgekd SuperLink CA"),
        ]
    )


def _make_ca(validity: _Validity) -> _Issued:
    """Generate the CA's EC P-256 key and its self-signed certificate (path length 0:
    it signs only the server certificate)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _ca_name()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, key_agreement=False), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _Issued(ca_key, ca_cert)


def _make_server(
    ca: _Issued, common_name: str, san_hosts: Sequence[str], validity: _Validity
) -> _Issued:
    """Generate the SuperLink's EC P-256 key and its TLS server certificate, signed by
    ``ca``: subject ``common_name``, SubjectAltName ``san_hosts`` (IP addresses as IP
    entries, anything else as DNS names)."""
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgekd"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(_ca_name())
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=False, key_agreement=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_san_entry(h) for h in san_hosts]),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return _Issued(server_key, server_cert)


def _write_certificates(out_dir: Path, paths: CertPaths, ca: _Issued, server: _Issued) -> None:
    """Create ``out_dir``; write the two keys (mode 0600) and the two certificates (0644)
    in it as PEM."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(paths.ca_key, _pem_private(ca.key), 0o600)
    _write(paths.server_key, _pem_private(server.key), 0o600)
    _write(paths.ca_cert, ca.cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.server_cert, server.cert.public_bytes(serialization.Encoding.PEM), 0o644)


def make_certificates(
    out_dir: Path,
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
    overwrite: bool = False,
) -> CertPaths:
    """Create a private CA and a SuperLink server certificate signed by it.

    Writes ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (PEM, EC P-256) in
    ``out_dir``; the keys are mode 0600. ``hosts`` become the certificate's
    SubjectAltName (IP addresses as IP entries, anything else as DNS names) and must
    cover every address SuperNodes and the ``flwr`` CLI use to reach the SuperLink;
    `LOOPBACK_HOSTS` are always added (the SuperLink's own SuperExec needs them).
    Raises `FileExistsError` naming the first file that exists unless ``overwrite``.
    """
    hosts, san_hosts = _certificate_hosts(hosts)
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    out_dir = Path(out_dir)
    paths = _cert_paths(out_dir)
    _refuse_existing((paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key), overwrite)
    validity = _Validity.starting_now(days)
    ca = _make_ca(validity)
    server = _make_server(ca, hosts[0], san_hosts, validity)
    _write_certificates(out_dir, paths, ca, server)
    return paths


def make_node_keys(out_dir: Path, name: str, *, overwrite: bool = False) -> NodeKeyPaths:
    """Create a SuperNode authentication key pair (EC SECP384R1, as Flower generates).

    Writes ``<name>`` (OpenSSH private key, unencrypted, mode 0600; pass it to
    ``flower-supernode --auth-supernode-private-key``) and ``<name>.pub`` (one OpenSSH
    public key line ``ecdsa-sha2-nistp384 AAAA... <name>``; register it with
    ``flwr supernode register``). Raises `FileExistsError` naming the first file that
    exists unless ``overwrite``.
    """
    if not _NODE_NAME.fullmatch(name):
        raise ValueError(
            f"invalid node name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    out_dir = Path(out_dir)
    paths = NodeKeyPaths(
        private_key=out_dir / name, public_key=out_dir / f"{name}{PUBLIC_KEY_SUFFIX}"
    )
    _refuse_existing((paths.private_key, paths.public_key), overwrite)

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(paths.private_key, private, 0o600)
    _write(paths.public_key, public + f" {name}\n".encode(), 0o644)
    return paths


def read_public_key(path: Path) -> str:
    """Return the OpenSSH public key line in ``path`` after checking that Flower accepts
    it (an EC key on a NIST curve, as ``flwr supernode register`` requires).

    Raises `ValueError` naming the file when it is missing, unreadable, not an OpenSSH
    public key (e.g. a PEM key or a private key), or a key of another kind.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read public key file ({err.strerror})") from err
    text = data.decode("utf-8", errors="replace").strip()
    if "PRIVATE KEY" in text:
        raise ValueError(
            f"{path}: holds a private key; give the public key file "
            f"(the one ending in {PUBLIC_KEY_SUFFIX})"
        )
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(
            f"{path}: expected exactly one OpenSSH public key line "
            "('ecdsa-sha2-nistp384 AAAA...'), "
            f"found {len(lines)} non-empty lines"
        )
    line = lines[0].strip()
    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(
            f"{path}: not an OpenSSH public key ('ecdsa-sha2-nistp384 AAAA...'): {err}"
        ) from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(
            f"{path}: Flower SuperNode keys must be elliptic-curve (ECDSA) keys, "
            f"got {type(key).__name__}"
        )
    if not isinstance(key.curve, NIST_CURVES):
        raise ValueError(
            f"{path}: curve {key.curve.name} is not a NIST curve Flower accepts "
            "(secp256r1, secp384r1, secp521r1, ...)"
        )
    return line
