"""Keys and wallets: mnemonic files (0600), refusals, deterministic addresses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from overlay.errors import KeyFileError
from ton.keys import KeyPair, keypair_from_mnemonic, load_mnemonic, new_mnemonic, save_mnemonic, verify
from ton.wallets import TESTNET_GLOBAL_ID, Wallet, WalletVersion, wallet_from_data_dir


def test_wallet_mnemonic_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    w1 = wallet_from_data_dir(tmp_path)
    path = tmp_path / "wallet.mnemonic"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    w2 = wallet_from_data_dir(tmp_path)
    assert w1.address() == w2.address()
    assert len(load_mnemonic(path)) == 24


def test_unsafe_or_corrupt_mnemonic_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "wallet.mnemonic"
    save_mnemonic(path, new_mnemonic())
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_mnemonic(path)
    path.write_text("twelve words are not enough")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="24-word"):
        load_mnemonic(path)
    with pytest.raises(KeyFileError):
        load_mnemonic(tmp_path / "missing")
    with pytest.raises(KeyFileError):
        keypair_from_mnemonic(["abandon"] * 24)


def test_addresses_are_deterministic_and_versions_differ() -> None:
    k = KeyPair.from_seed(b"z" * 32)
    v4, v5 = Wallet(k, WalletVersion.V4R2), Wallet(k, WalletVersion.V5R1)
    assert v4.address() != v5.address()
    assert v5.address() == Wallet(k, WalletVersion.V5R1).address()
    assert v5.address() != Wallet(k, WalletVersion.V5R1, TESTNET_GLOBAL_ID).address()
    assert v4.friendly_address(testnet=True).startswith("0Q")
    assert v4.friendly_address().startswith("UQ")


def test_signatures() -> None:
    k = KeyPair.from_seed(b"s" * 32)
    sig = k.sign(b"payload")
    assert verify(k.public, b"payload", sig)
    assert not verify(k.public, b"payloaD", sig)
    assert not verify(k.public, b"payload", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify(b"\x00" * 31, b"payload", sig)
    with pytest.raises(ValueError):
        KeyPair.from_seed(b"short")
    assert "public=" in repr(k)
    assert k.seed.hex() not in repr(k)
