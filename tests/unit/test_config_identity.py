"""Config loading, the data dir, identity keys, bootstrap.toml, the error tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import stat
from pathlib import Path

import pytest

from node.config import NodeConfig, default_data_dir, load_config, parse_override
from node.networks import devnet_bootstrap_identity, load_networks
from overlay.errors import ConfigError, KeyFileError, NodeError
from overlay.identity import (
    IDENTITY_FILE,
    Identity,
    load_or_create_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)


def test_defaults_and_file_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(tmp_path)
    assert cfg == NodeConfig(data_dir=tmp_path)
    (tmp_path / "config.toml").write_text(
        '[overlay]\nlisten_port = 4800\nbootstrap = ["/ip4/1.2.3.4/tcp/1/p2p/x"]\n'
    )
    cfg = load_config(tmp_path)
    assert cfg.overlay.listen_port == 4800
    assert cfg.overlay.bootstrap == ("/ip4/1.2.3.4/tcp/1/p2p/x",)
    cfg = load_config(tmp_path, overrides={"overlay": {"listen_port": "4900"}, "worker": {"threads": "2"}})
    assert cfg.overlay.listen_port == 4900
    assert cfg.worker.threads == 2
    with pytest.raises(AttributeError):
        cfg.overlay.listen_port = 1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[overlay]\nlisten_prot = 1\n", "unknown key"),
        ("[nosuch]\nx = 1\n", "unknown config section"),
        ("[overlay]\nlisten_port = 'abc'\n", "expected int"),
        ("[overlay\n", "not valid TOML"),
        ("x = 1\n", "must be a \\[section\\]"),
    ],
)
def test_bad_config_files_name_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as ei:
        load_config(tmp_path)
    assert str(path) in str(ei.value)


def test_override_syntax() -> None:
    assert parse_override("overlay.listen_port=1") == ("overlay", "listen_port", "1")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("listen_port=1")
    with pytest.raises(ConfigError):
        load_config(Path("/nonexistent-cocoon"), Path("/nonexistent-cocoon/x.toml"))


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COCOON_HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home"
    monkeypatch.delenv("COCOON_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "cocoon-node"


def test_identity_created_0600_and_reused(tmp_path: Path) -> None:
    ident, created = load_or_create_identity(tmp_path / "d")
    assert created
    path = tmp_path / "d" / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created2 = load_or_create_identity(tmp_path / "d")
    assert not created2
    assert again.peer_id == ident.peer_id
    assert not list((tmp_path / "d").glob("*.tmp"))


def test_identity_with_loose_permissions_is_tightened(tmp_path: Path) -> None:
    ident, _ = load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE
    path.chmod(0o644)
    assert load_or_create_identity(tmp_path)[0].peer_id == ident.peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_corrupt_key_file_is_never_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=str(path)):
        load_or_create_identity(tmp_path)
    assert path.read_bytes() == content  # untouched


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / IDENTITY_FILE).write_bytes(pem)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_or_create_identity(tmp_path)


def test_key_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).mkdir()
    with pytest.raises(KeyFileError, match="cannot read"):
        load_or_create_identity(tmp_path)


def test_peer_ids_and_signatures() -> None:
    ident = Identity.from_seed(bytes(32))
    assert peer_id_from_public_key(ident.public_key) == ident.peer_id
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key
    assert public_key_from_peer_id("not-a-peer-id") is None
    sig = ident.sign(b"data")
    assert verify_signature(ident.public_key, sig, b"data")
    assert not verify_signature(ident.public_key, sig, b"other")
    assert not verify_signature(ident.public_key, sig[:10], b"data")
    assert not verify_signature(b"\x00" * 31, sig, b"data")
    with pytest.raises(ValueError, match="32 bytes"):
        peer_id_from_public_key(b"short")


def test_bootstrap_networks(tmp_path: Path) -> None:
    nets = load_networks()
    dev = nets["devnet"]
    assert dev.bootstrap
    assert all("/p2p/" in b for b in dev.bootstrap)
    assert dev.bootstrap[0].endswith(devnet_bootstrap_identity(dev).peer_id)
    with pytest.raises(ConfigError, match="private"):
        devnet_bootstrap_identity(nets["testnet"])
    bad = tmp_path / "b.toml"
    bad.write_text('[networks.x]\nbootstrap = ["/ip4/1.2.3.4/tcp/1"]\n')
    with pytest.raises(ConfigError, match="/p2p/"):
        load_networks(bad)
    bad.write_text("[networks\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_networks(bad)


def test_every_exception_class_is_in_the_one_tree() -> None:
    offenders = []
    for name in ("overlay", "market", "inference", "ton", "node"):
        pkg = importlib.import_module(name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}."):
            mod = importlib.import_module(info.name)
            for obj_name, obj in inspect.getmembers(mod, inspect.isclass):
                if obj.__module__ != mod.__name__ or not issubclass(obj, BaseException):
                    continue
                if not issubclass(obj, NodeError):
                    offenders.append(f"{mod.__name__}.{obj_name}")
    assert offenders == []
