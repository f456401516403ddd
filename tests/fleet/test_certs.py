"""TLS certificates and SuperNode keys (edgekd.fleet.certs) in the formats Flower loads."""

from __future__ import annotations

import ipaddress
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from edgekd.fleet import certs
from edgekd.fleet.processes import write_connection


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.CertPaths:
    return certs.make_certificates(
        tmp_path_factory.mktemp("pki"), hosts=("127.0.0.1", "localhost", "edge.example")
    )


def test_make_certificates_writes_the_four_files(pki: certs.CertPaths):
    assert [p.name for p in (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key)] == [
        "ca.crt",
        "ca.key",
        "server.pem",
        "server.key",
    ]
    assert _mode(pki.ca_key) == 0o600
    assert _mode(pki.server_key) == 0o600
    for key_path in (pki.ca_key, pki.server_key):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)


def test_server_certificate_verifies_against_the_ca(pki: certs.CertPaths):
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # The key in server.key is the one certified in server.pem.
    server_key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert server_key.public_key() == server.public_key()


def test_server_certificate_passes_a_full_chain_verification(pki: certs.CertPaths):
    """What a TLS client does: chain to the trusted CA and match the host name."""
    from cryptography.x509.verification import PolicyBuilder, Store

    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    builder = PolicyBuilder().store(Store([ca]))
    for host in ("localhost", "edge.example"):
        builder.build_server_verifier(x509.DNSName(host)).verify(server, [])
    builder.build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(
        server, []
    )


def test_server_certificate_san_holds_the_hosts(pki: certs.CertPaths):
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "edge.example"]


def test_loopback_is_always_in_the_san(tmp_path: Path):
    """The SuperLink's own SuperExec dials 127.0.0.1 with the same certificate."""
    paths = certs.make_certificates(tmp_path, hosts=("10.1.2.3",))
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress)[:2] == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert "localhost" in san.get_values_for_type(x509.DNSName)


def test_make_certificates_refuses_to_overwrite(tmp_path: Path):
    first = certs.make_certificates(tmp_path)
    before = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match="ca.crt"):
        certs.make_certificates(tmp_path)
    assert first.ca_cert.read_bytes() == before

    # Any one existing file is enough to refuse, and nothing is written then.
    other = tmp_path / "other"
    other.mkdir()
    (other / "server.key").write_text("keep me")
    with pytest.raises(FileExistsError, match="server.key"):
        certs.make_certificates(other)
    assert sorted(p.name for p in other.iterdir()) == ["server.key"]

    again = certs.make_certificates(tmp_path, overwrite=True)
    assert again.ca_cert.read_bytes() != before
    assert _mode(again.ca_key) == 0o600


def test_make_certificates_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="hosts"):
        certs.make_certificates(tmp_path, hosts=())
    with pytest.raises(ValueError, match="days"):
        certs.make_certificates(tmp_path, days=0)
    with pytest.raises(TypeError, match="sequence"):
        certs.make_certificates(tmp_path, hosts="127.0.0.1")


def test_node_keys_load_with_the_loaders_flower_uses(tmp_path: Path):
    keys = certs.make_node_keys(tmp_path, "node-1")
    assert keys.private_key == tmp_path / "node-1"
    assert keys.public_key == tmp_path / "node-1.pub"
    assert _mode(keys.private_key) == 0o600

    # flower-supernode --auth-supernode-private-key: load_ssh_private_key, EC key.
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    # flwr supernode register KEY.pub: load_ssh_public_key, EC key on a NIST curve.
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public == private.public_key()
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_node_keys_match_flowers_own_checks(tmp_path: Path):
    """Flower's register command and the SuperNode accept the files (flwr imported here
    only, certs.py itself does not depend on it)."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, uses_nist_ec_curve

    keys = certs.make_node_keys(tmp_path, "n")
    registered = try_load_public_key(keys.public_key)  # PEM bytes sent to the SuperLink
    assert uses_nist_ec_curve(bytes_to_public_key(registered))


def test_read_public_key_returns_the_openssh_line(tmp_path: Path):
    keys = certs.make_node_keys(tmp_path, "edge7")
    line = certs.read_public_key(keys.public_key)
    assert line == keys.public_key.read_text().strip()
    assert line.endswith(" edge7")


def test_make_node_keys_refuses_to_overwrite_and_checks_the_name(tmp_path: Path):
    keys = certs.make_node_keys(tmp_path, "a")
    with pytest.raises(FileExistsError, match="a"):
        certs.make_node_keys(tmp_path, "a")
    keys.private_key.unlink()  # only the .pub left: still refused
    with pytest.raises(FileExistsError, match=r"a\.pub"):
        certs.make_node_keys(tmp_path, "a")
    assert certs.make_node_keys(tmp_path, "a", overwrite=True).private_key.exists()
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65):
        with pytest.raises(ValueError, match="node name"):
            certs.make_node_keys(tmp_path, bad)


@pytest.mark.parametrize(
    "content, reason",
    [
        ("this is not a key\n", "not an OpenSSH public key"),
        ("", "exactly one"),
        ("ssh-ed25519 AAAA\nssh-ed25519 BBBB\n", "exactly one"),
        ("ecdsa-sha2-nistp384 !!!notbase64\n", "not an OpenSSH public key"),
    ],
)
def test_read_public_key_rejects_garbage_naming_the_file(tmp_path: Path, content, reason):
    path = tmp_path / "bad.pub"
    path.write_text(content)
    with pytest.raises(ValueError, match=reason) as err:
        certs.read_public_key(path)
    assert str(path) in str(err.value)


def test_read_public_key_rejects_other_key_kinds(tmp_path: Path):
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    ed_path = tmp_path / "ed.pub"
    ed_path.write_bytes(
        ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ValueError, match="elliptic-curve") as err:
        certs.read_public_key(ed_path)
    assert str(ed_path) in str(err.value)

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    rsa_path = tmp_path / "rsa.pub"
    rsa_path.write_bytes(
        rsa_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ValueError, match="elliptic-curve") as err:
        certs.read_public_key(rsa_path)
    assert str(rsa_path) in str(err.value)

    # A PEM public key is what Flower stores, but `flwr supernode register` wants OpenSSH.
    pem_path = tmp_path / "key.pem"
    pem_path.write_bytes(
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="key.pem"):
        certs.read_public_key(pem_path)

    keys = certs.make_node_keys(tmp_path, "priv")
    with pytest.raises(ValueError, match="private key") as err:
        certs.read_public_key(keys.private_key)
    assert str(keys.private_key) in str(err.value)

    with pytest.raises(ValueError, match="missing.pub"):
        certs.read_public_key(tmp_path / "missing.pub")


def test_connection_is_written_as_flower_reads_it(tmp_path: Path, monkeypatch):
    # Prepare: an existing config with another connection, which must survive.
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink.other]\naddress = "10.0.0.1:1"\n')
    ca = tmp_path / "pki" / "ca.crt"

    # Execute
    write_connection(home, "edgekd", "127.0.0.1:9093", root_cert=ca)
    write_connection(home, "plain", "127.0.0.1:1", root_cert=None)
    write_connection(home, "edgekd", "127.0.0.1:9093", root_cert=ca)  # again: replaced

    # Assert
    parsed = tomllib.loads((home / "config.toml").read_text())
    assert parsed["superlink"]["default"] == "edgekd"
    assert parsed["superlink"]["edgekd"] == {
        "address": "127.0.0.1:9093",
        "root-certificates": str(ca.resolve()),
    }
    assert parsed["superlink"]["plain"] == {"address": "127.0.0.1:1", "insecure": True}
    assert parsed["superlink"]["other"] == {"address": "10.0.0.1:1"}
    # Flower's own reader accepts it.
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection("edgekd")
    assert conn.address == "127.0.0.1:9093"
    assert conn.root_certificates == str(ca.resolve())
    assert conn.insecure is False
