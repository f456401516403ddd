"""Signed bundles: the manifest, which holds the sha256 of every file, signed by a key
the server holds.

Without a signature a bundle is only checked against itself: whoever can replace a
model file can replace its sha256 in ``manifest.json`` too. ``edgekd deploy build
--sign-key KEY`` writes ``manifest.sig`` next to the manifest; ``edgekd deploy check
--verify-key PUB`` and ``edgekd client start --bundle DIR --verify-key PUB`` refuse a
bundle whose manifest is not signed by that key (the same provisioning pattern as
NVIDIA FLARE's signed startup kits).

Keys: an EC private key (ECDSA with SHA-384; e.g. a node key from ``edgekd server
certs``, or a dedicated one) or an Ed25519 key, PEM or OpenSSH; the public key PEM or
OpenSSH (``.pub``). ``cryptography`` comes with flwr, so a device has it too.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from edgekd.core.errors import EdgeKDError

__all__ = ["SIGNATURE", "SignatureError", "sign_manifest", "verify_manifest"]

SIGNATURE = "manifest.sig"


class SignatureError(EdgeKDError, ValueError):
    """A bundle's signature is missing, malformed, or not made by the expected key."""


def _read_key(path: Path, private: bool) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    what = "private" if private else "public"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{what} key {path}: {exc.strerror or exc}") from None
    loaders = (
        (serialization.load_ssh_private_key, serialization.load_pem_private_key)
        if private
        else (serialization.load_ssh_public_key, serialization.load_pem_public_key)
    )
    for load in loaders:
        try:
            return load(data, None) if private else load(data)  # type: ignore[call-arg]
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    raise SignatureError(f"{path} is not a {what} key (PEM or OpenSSH)")


def _fingerprint(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def sign_manifest(folder: Path, private_key: Path) -> dict[str, str]:
    """Write ``folder/manifest.sig`` for ``folder/manifest.json``; return its content."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = _read_key(private_key, private=True)
    manifest = (folder / "manifest.json").read_bytes()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm, signature = "ecdsa-sha384", key.sign(manifest, ec.ECDSA(hashes.SHA384()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm, signature = "ed25519", key.sign(manifest)
    else:
        raise SignatureError(f"{private_key}: use an EC or Ed25519 key to sign bundles")
    content = {
        "algorithm": algorithm,
        "public_key_sha256": _fingerprint(key.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }
    (folder / SIGNATURE).write_text(json.dumps(content, indent=2) + "\n")
    return content


def verify_manifest(folder: Path, public_key: Path) -> str:
    """Check that ``folder/manifest.json`` is signed by ``public_key``; return the key's
    fingerprint.

    Raises:
        SignatureError: no or malformed ``manifest.sig``, another key, or a signature
            that does not match the manifest (it changed after signing).
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = _read_key(public_key, private=False)
    path = folder / SIGNATURE
    if not path.is_file():
        raise SignatureError(f"bundle {folder} is not signed ({SIGNATURE} missing)")
    try:
        content = json.loads(path.read_text())
        signature = base64.b64decode(content["signature"], validate=True)
        algorithm, fingerprint = str(content["algorithm"]), str(content["public_key_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{path}: malformed ({type(exc).__name__})") from None
    if fingerprint != _fingerprint(key):
        raise SignatureError(
            f"bundle {folder} was signed by key {fingerprint[:16]}..., not by {public_key}"
        )
    manifest = (folder / "manifest.json").read_bytes()
    try:
        if algorithm == "ecdsa-sha384" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, manifest, ec.ECDSA(hashes.SHA384()))
        elif algorithm == "ed25519" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, manifest)
        else:
            raise SignatureError(f"{path}: algorithm {algorithm!r} does not fit {public_key}")
    except InvalidSignature:
        raise SignatureError(
            f"bundle {folder}: manifest.json does not match its signature (changed after signing)"
        ) from None
    return fingerprint
