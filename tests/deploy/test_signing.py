"""Signed bundles: a manifest signed by the server's key, refused when a file and its
sha256 were replaced, when another key signed it, or when it is not signed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgekd.deploy.bundle import BundleError, build_bundle, check_bundle, load_bundle
from edgekd.deploy.signing import SIGNATURE, sign_manifest
from edgekd.fleet.certs import make_node_keys

STUDENT = Path(__file__).resolve().parents[1] / "data" / "student_w16_default.pt"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    server, other = make_node_keys(root, "bundle-signer"), make_node_keys(root, "someone-else")
    edkey = ed25519.Ed25519PrivateKey.generate()
    (root / "ed.pem").write_bytes(
        edkey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (root / "ed.pub.pem").write_bytes(
        edkey.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return {
        "private": server.private_key,
        "public": server.public_key,
        "other": other.public_key,
        "ed": root / "ed.pem",
        "ed_pub": root / "ed.pub.pem",
    }


@pytest.fixture(scope="module")
def signed(keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("signed")
    return build_bundle(STUDENT, "jetson", root / "bundle", sign_key=keys["private"])


def test_a_signed_bundle_verifies_with_the_servers_key(signed: Path, keys: dict) -> None:
    assert (signed / SIGNATURE).is_file()
    assert json.loads((signed / SIGNATURE).read_text())["algorithm"] == "ecdsa-sha384"

    result = check_bundle(signed, threads=1, runs=5, verify_key=keys["public"])

    assert result["ok"] and result["signature"] == "verified"
    load_bundle(signed)  # without a key the signature is not asked for


def test_a_replaced_file_with_its_new_sha256_is_refused(
    signed: Path, keys: dict, tmp_path: Path
) -> None:
    # Prepare: what an attacker with write access but without the key can do.
    bundle = Path(shutil.copytree(signed, tmp_path / "b"))
    noise = np.random.default_rng(0).bytes(1000)
    (bundle / "student_fp32.onnx").write_bytes(noise)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["student_fp32.onnx"]["sha256"] = hashlib.sha256(noise).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    load_bundle(bundle)  # the unsigned check alone passes

    # Execute / Assert
    with pytest.raises(BundleError, match="does not match its signature"):
        load_bundle(bundle, verify_key=keys["public"])


def test_another_key_or_no_signature_is_refused(signed: Path, keys: dict, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="was signed by key .*, not by .*someone-else.pub"):
        load_bundle(signed, verify_key=keys["other"])

    unsigned = Path(shutil.copytree(signed, tmp_path / "u"))
    (unsigned / SIGNATURE).unlink()
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(unsigned, verify_key=keys["public"])

    (unsigned / SIGNATURE).write_text("{not json")
    with pytest.raises(BundleError, match="manifest.sig: malformed"):
        load_bundle(unsigned, verify_key=keys["public"])


def test_ed25519_keys_sign_too(signed: Path, keys: dict, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(signed, tmp_path / "e"))

    content = sign_manifest(bundle, keys["ed"])

    assert content["algorithm"] == "ed25519"
    load_bundle(bundle, verify_key=keys["ed_pub"])
    with pytest.raises(BundleError, match="not by"):
        load_bundle(bundle, verify_key=keys["public"])


def test_a_public_key_as_signing_key_is_named(keys: dict, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not a private key"):
        build_bundle(STUDENT, "jetson", tmp_path / "x", sign_key=keys["public"])
    assert not (tmp_path / "x").exists()
