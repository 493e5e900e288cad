"""Keys: TON mnemonics, Ed25519 key pairs, and mnemonic files in the data dir.

Signing and verifying use libsodium through PyNaCl (verify is ~3x faster than OpenSSL's here).

A wallet is identified by a 24-word TON mnemonic (the same words Tonkeeper and the TON CLI use);
its Ed25519 key signs both wallet transfers and channel states. Mnemonic files are written
atomically with mode 0600; a file with wider permissions or garbage inside raises
:class:`~overlay.errors.KeyFileError` and is never silently replaced.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs
import nacl.bindings
import nacl.exceptions
from pytoniq_core.crypto.keys import mnemonic_is_valid, mnemonic_new, mnemonic_to_private_key

from overlay.errors import KeyFileError

__all__ = [
    "KeyPair",
    "keypair_from_mnemonic",
    "load_mnemonic",
    "load_or_create_mnemonic",
    "new_mnemonic",
    "save_mnemonic",
    "verify",
]


@attrs.frozen(repr=False)
class KeyPair:
    """An Ed25519 key pair; ``seed`` is the 32-byte private seed, ``public`` the raw public key."""

    seed: bytes
    public: bytes
    _sk: bytes = attrs.field(eq=False)  # libsodium's 64-byte secret key

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        public, sk = nacl.bindings.crypto_sign_seed_keypair(seed)
        return cls(seed, bytes(public), bytes(sk))

    @property
    def private64(self) -> bytes:
        """The 64-byte NaCl-style secret key (seed || public) that pytoniq expects."""
        return self.seed + self.public

    def sign(self, data: bytes) -> bytes:
        signed: bytes = nacl.bindings.crypto_sign(data, self._sk)
        return signed[:64]

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def verify(public: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``public``."""
    if len(public) != 32 or len(signature) != 64:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + data, public)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def new_mnemonic() -> list[str]:
    """Fresh 24 TON mnemonic words from the OS random source."""
    words: list[str] = mnemonic_new(24)
    return words


def keypair_from_mnemonic(words: list[str]) -> KeyPair:
    if not mnemonic_is_valid(words):
        raise KeyFileError("not a valid TON mnemonic")
    _public, secret = mnemonic_to_private_key(words)
    return KeyPair.from_seed(bytes(secret[:32]))


def save_mnemonic(path: Path, words: list[str]) -> None:
    """Write the words to ``path`` with mode 0600, atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (" ".join(words) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_mnemonic(path: Path) -> list[str]:
    """Read a mnemonic file; refuses group/other-readable files and invalid words."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as e:
        raise KeyFileError(f"{path}: {e}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: mode {oct(mode & 0o777)} lets others read it; chmod 600 {path}")
    words = text.split()
    if len(words) != 24 or not mnemonic_is_valid(words):
        raise KeyFileError(f"{path}: not a valid 24-word TON mnemonic")
    return words


def load_or_create_mnemonic(path: Path) -> list[str]:
    """The mnemonic in ``path``, created (0600) when the file does not exist."""
    if path.exists():
        return load_mnemonic(path)
    words = new_mnemonic()
    save_mnemonic(path, words)
    return words
