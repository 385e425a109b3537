"""Key files: permissions, no silent overwrite, strict parsing, signing keys, and the ``keys`` CLI."""

from __future__ import annotations

import json
import os
import stat

import pytest
import zmq
import zmq.auth
from cryptography.exceptions import InvalidSignature
from typer.testing import CliRunner

from guardedp2p.cli.keys import keys_app
from guardedp2p.crypto.keys import (
    KeyExistsError,
    KeyFileError,
    fingerprint,
    generate_keypair,
    key_paths,
    load_allow_list,
    load_keypair,
    load_public_key,
    load_signing_key,
    load_verify_key,
)
from guardedp2p.errors import ConfigError


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_generate_writes_four_files_with_safe_modes(tmp_path):
    pub_path, sec_path = generate_keypair(tmp_path / "k", "alice")
    paths = key_paths(tmp_path / "k", "alice")
    assert (pub_path, sec_path) == (paths.public, paths.secret)
    assert pub_path.name == "alice.key" and sec_path.name == "alice.key_secret"
    assert mode(sec_path) == 0o600
    assert mode(paths.sign_secret) == 0o600
    assert mode(pub_path) == 0o644 and mode(paths.sign_public) == 0o644
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.endswith(".tmp")]

    public, secret = load_keypair(sec_path)
    assert zmq.curve_public(secret.encode()).decode() == public
    assert load_public_key(pub_path) == public
    assert load_keypair(tmp_path / "k", "alice") == (public, secret)
    assert load_keypair(tmp_path / "k") == (public, secret)  # the only secret in the directory
    # the public file holds the public key only, on its own line
    text = pub_path.read_text()
    assert public in text.splitlines() and secret not in text
    assert fingerprint(public).startswith("sha256:") and fingerprint(public) in text


def test_secret_mode_is_0600_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        _, sec = generate_keypair(tmp_path, "u")
    finally:
        os.umask(old)
    assert mode(sec) == 0o600
    assert mode(key_paths(tmp_path, "u").sign_secret) == 0o600


def test_refuses_to_overwrite_without_force(tmp_path):
    pub, sec = generate_keypair(tmp_path, "p")
    before = load_keypair(sec)
    with pytest.raises(KeyExistsError) as ei:
        generate_keypair(tmp_path, "p")
    assert isinstance(ei.value, ConfigError)
    assert "--force" in str(ei.value) and str(sec) in str(ei.value)
    assert load_keypair(sec) == before
    # a single leftover file is enough to refuse
    os.unlink(pub)
    with pytest.raises(KeyExistsError):
        generate_keypair(tmp_path, "p")
    generate_keypair(tmp_path, "p", force=True)
    after = load_keypair(sec)
    assert after != before
    assert mode(sec) == 0o600


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65, "foo.sign"])
def test_bad_names_rejected(tmp_path, name):
    with pytest.raises(KeyFileError, match="Invalid key name"):
        generate_keypair(tmp_path, name)


def test_public_key_accepts_z85_string_and_validates(tmp_path):
    pub, _ = zmq.curve_keypair()
    assert load_public_key(pub.decode()) == pub.decode()
    with pytest.raises(KeyFileError, match="neither a 40-character z85 public key nor an existing key file"):
        load_public_key(pub.decode()[:39])


@pytest.mark.parametrize(
    "content, match",
    [
        ("# only a comment\n", "contains no key"),
        ("", "contains no key"),
        ("abc\n", "not a key line"),
        ("x" * 39 + "\n", "not a key line"),
        ('public-key = "' + "x" * 39 + '"\n', "has 39 characters"),
        ('public-key = "' + "x" * 39 + '~"\n', "not z85"),
        ("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n", "PEM file"),
    ],
)
def test_bad_public_key_files(tmp_path, content, match):
    f = tmp_path / "bad.key"
    f.write_text(content)
    with pytest.raises(KeyFileError, match=match):
        load_public_key(f)


def test_binary_and_two_keys_and_missing(tmp_path):
    f = tmp_path / "bin.key"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(KeyFileError, match="not a text file"):
        load_public_key(f)
    a, _ = zmq.curve_keypair()
    b, _ = zmq.curve_keypair()
    f2 = tmp_path / "two.key"
    f2.write_text(f"{a.decode()}\n{b.decode()}\n")
    with pytest.raises(KeyFileError, match="more than one public key"):
        load_public_key(f2)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_public_key(tmp_path / "nope.key")
    with pytest.raises(KeyFileError, match="is a directory"):
        load_public_key(tmp_path)


def test_secret_file_where_public_expected_is_refused(tmp_path):
    pub, sec = generate_keypair(tmp_path, "c")
    with pytest.raises(KeyFileError, match="SECRET key file") as ei:
        load_public_key(sec)
    assert str(pub) in str(ei.value)  # points at the right file
    with pytest.raises(KeyFileError, match="SECRET key file"):
        load_allow_list([sec], [])


def test_public_file_where_secret_expected_and_inconsistent_secret(tmp_path):
    pub, sec = generate_keypair(tmp_path, "c")
    with pytest.raises(KeyFileError, match="only a public key"):
        load_keypair(pub)
    other_pub, _ = zmq.curve_keypair()
    lines = sec.read_text().splitlines()
    lines = [f'public-key = "{other_pub.decode()}"' if ln.startswith("public-key") else ln for ln in lines]
    sec.write_text("\n".join(lines) + "\n")
    with pytest.raises(KeyFileError, match="inconsistent"):
        load_keypair(sec)


def test_secret_never_in_error_messages(tmp_path):
    _, sec = generate_keypair(tmp_path, "c")
    _, secret = load_keypair(sec)
    for call in (lambda: load_public_key(sec), lambda: load_allow_list([sec], [])):
        with pytest.raises(KeyFileError) as ei:
            call()
        assert secret not in str(ei.value)


def test_directory_with_several_secrets_needs_a_name(tmp_path):
    generate_keypair(tmp_path, "a")
    generate_keypair(tmp_path, "b")
    with pytest.raises(KeyFileError, match="several secret keys"):
        load_keypair(tmp_path)
    assert load_keypair(tmp_path, "b") == load_keypair(tmp_path / "b.key_secret")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError, match="No \\*.key_secret"):
        load_keypair(tmp_path / "empty")


def test_allow_list_from_files_and_dirs(tmp_path):
    clients = tmp_path / "clients"
    a_pub, _ = generate_keypair(clients, "a")  # also drops a.sign.key (PEM secret) in the dir: must be skipped
    b_pub, _ = generate_keypair(clients, "b")
    c_pub, _ = generate_keypair(tmp_path / "elsewhere", "c")
    raw, _ = zmq.curve_keypair()
    allowed = load_allow_list([c_pub, raw.decode()], [clients])
    assert allowed == {load_public_key(p) for p in (a_pub, b_pub, c_pub)} | {raw.decode()}
    with pytest.raises(KeyFileError, match="does not exist"):
        load_allow_list([], [tmp_path / "missing"])
    (clients / "junk.key").write_text("not a key\n")
    with pytest.raises(KeyFileError, match="junk.key"):
        load_allow_list([], [clients])


def test_reads_pyzmq_certificates(tmp_path):
    pub_file, sec_file = zmq.auth.create_certificates(str(tmp_path), "legacy")
    pub, sec = zmq.auth.load_certificate(sec_file)
    assert load_public_key(pub_file) == pub.decode()
    assert load_keypair(sec_file) == (pub.decode(), sec.decode())


def test_signing_keys_sign_and_verify(tmp_path):
    generate_keypair(tmp_path, "prov")
    paths = key_paths(tmp_path, "prov")
    sk = load_signing_key(paths.sign_secret)
    assert load_signing_key(tmp_path, "prov").private_bytes_raw() == sk.private_bytes_raw()
    vk = load_verify_key(paths.sign_public)
    sig = sk.sign(b"digest")
    vk.verify(sig, b"digest")
    with pytest.raises(InvalidSignature):
        vk.verify(sig, b"other")
    with pytest.raises(KeyFileError, match="PRIVATE signing key"):
        load_verify_key(paths.sign_secret)
    with pytest.raises(KeyFileError, match="public verify key"):
        load_signing_key(paths.sign_public)
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_verify_key(paths.public)
    generate_keypair(tmp_path, "other")
    with pytest.raises(InvalidSignature):
        load_verify_key(key_paths(tmp_path, "other").sign_public).verify(sig, b"digest")


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_generate_json_shows_public_only(tmp_path):
    res = runner.invoke(keys_app, ["generate", "--out", str(tmp_path), "--name", "alice", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])
    public, secret = load_keypair(tmp_path / "alice.key_secret")
    assert info["public_key"] == public
    assert info["public_key_file"] == str(tmp_path / "alice.key")
    assert info["sign_public_key_file"] == str(tmp_path / "alice.sign.pub")
    assert secret not in res.output
    sign_secret_pem = (tmp_path / "alice.sign.key").read_text()
    assert "PRIVATE" not in res.output and sign_secret_pem.splitlines()[1] not in res.output


def test_cli_generate_text_and_refusal(tmp_path):
    res = runner.invoke(keys_app, ["generate", "--out", str(tmp_path), "--name", "bob"])
    assert res.exit_code == 0
    _, secret = load_keypair(tmp_path / "bob.key_secret")
    assert "Public key" in res.stdout and secret not in res.output
    res = runner.invoke(keys_app, ["generate", "--out", str(tmp_path), "--name", "bob"])
    assert res.exit_code == ConfigError.exit_code
    assert load_keypair(tmp_path / "bob.key_secret")[1] == secret


def test_cli_show(tmp_path):
    generate_keypair(tmp_path, "carol")
    public, secret = load_keypair(tmp_path / "carol.key_secret")
    res = runner.invoke(keys_app, ["show", str(tmp_path / "carol.key"), "--json"])
    assert res.exit_code == 0
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {
        "file": str(tmp_path / "carol.key"),
        "type": "curve",
        "public_key": public,
        "fingerprint": fingerprint(public),
    }
    res = runner.invoke(keys_app, ["show", str(tmp_path / "carol.sign.pub")])
    assert res.exit_code == 0 and "Ed25519" in res.stdout
    res = runner.invoke(keys_app, ["show", str(tmp_path / "carol.key_secret")])
    assert res.exit_code == ConfigError.exit_code and secret not in res.output
    res = runner.invoke(keys_app, ["--help"])
    assert res.exit_code == 0 and "--allow" in res.stdout


def test_one_fingerprint_for_curve_and_signing_keys(tmp_path):
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from guardedp2p.crypto import manifest
    from guardedp2p.crypto.keys import verify_key_fingerprint

    generate_keypair(tmp_path, "p")
    vk = load_verify_key(key_paths(tmp_path, "p").sign_public)
    raw = vk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert fingerprint(vk) == "sha256:" + hashlib.sha256(raw).hexdigest()[:16]  # what manifests already record
    public = load_public_key(key_paths(tmp_path, "p").public)
    assert fingerprint(public) == fingerprint(public.encode("ascii")) != fingerprint(vk)
    with pytest.deprecated_call():
        assert verify_key_fingerprint(vk) == fingerprint(vk)
    with pytest.deprecated_call():
        assert manifest.key_fingerprint(vk) == fingerprint(vk)


def test_own_keypair_checks_given_values_and_falls_back_to_the_file(tmp_path):
    from guardedp2p.crypto.keys import own_keypair
    from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel
    from guardedp2p.transport.zmq_server import ServerConfig, ZmqServerChannel

    a_pub, a_sec = (k.decode("ascii") for k in zmq.curve_keypair())
    b_pub, _ = (k.decode("ascii") for k in zmq.curve_keypair())
    assert own_keypair((a_pub, a_sec), None, None, who="client", missing="-") == (a_pub, a_sec)
    with pytest.raises(KeyFileError, match="client public key does not belong"):
        own_keypair((b_pub, a_sec), None, None, who="client", missing="-")
    with pytest.raises(ConfigError, match="pass --keys"):
        own_keypair(None, None, None, who="server", missing="pass --keys")
    generate_keypair(tmp_path, "p")
    assert own_keypair(None, tmp_path, "p", who="server", missing="-") == load_keypair(tmp_path, "p")
    # both channel ends use it
    with pytest.raises(KeyFileError, match="server public key does not belong"):
        ZmqServerChannel._load_server_keys(ServerConfig(bind="tcp://127.0.0.1:*", keys=(b_pub, a_sec)))
    with pytest.raises(KeyFileError, match="client public key does not belong"):
        ZmqClientChannel._load_client_keys(ClientConfig(connect="tcp://127.0.0.1:5555", keys=(b_pub, a_sec)))
