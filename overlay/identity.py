"""Node identity: one Ed25519 key, kept in the data dir, that is also the libp2p peer id.

The key file is a PKCS#8 PEM (``identity.key``), created on first run with mode
0600 and reused after.  A file that exists but cannot be read or parsed raises
:class:`~overlay.errors.KeyFileError` naming the file: it is never silently
replaced, because the peer id (and the reputation, offers and channels tied to
it) would be lost.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import KeyFileError

__all__ = [
    "IDENTITY_FILE",
    "Identity",
    "load_or_create_identity",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "verify_signature",
]

log = logging.getLogger(__name__)
IDENTITY_FILE = "identity.key"


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (base58) of a raw 32-byte Ed25519 public key."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey as P2PKey
    from libp2p.peer.id import ID

    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return str(ID.from_pubkey(P2PKey.from_bytes(public_key)).to_base58())


def public_key_from_peer_id(peer_id: str) -> bytes | None:
    """The raw Ed25519 public key inlined in a peer id, or None if it holds none."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey as P2PKey
    from libp2p.peer.id import ID

    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception:
        return None
    if not isinstance(key, P2PKey):
        return None
    return bytes(key.to_bytes())


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 key pair with its libp2p peer id."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._sk = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity (devnet bootstrap keys and tests only)."""
        if len(seed) != 32:
            raise ValueError("seed must be 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        return self._sk.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        return self._sk.sign(data)

    def to_pem(self) -> bytes:
        return self._sk.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def libp2p_keypair(self) -> object:
        """The same key as a py-libp2p ``KeyPair`` (typed loosely to keep libp2p out of signatures)."""
        from libp2p.crypto.ed25519 import Ed25519PrivateKey as P2PPriv
        from libp2p.crypto.keys import KeyPair

        sk = P2PPriv.from_bytes(self.seed())
        return KeyPair(sk, sk.get_public_key())

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"


def _read_identity(path: Path) -> Identity:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(
            f"cannot read identity key {path}: {e.strerror}. Fix its permissions or move it away "
            "(a new key means a new peer id)."
        ) from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(
            f"identity key {path} is corrupt or not a PEM private key. Restore it from a backup, "
            "or move it away to create a new identity (a new key means a new peer id)."
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"identity key {path} is not an Ed25519 key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("identity key %s is readable by others (mode %o); setting it to 0600", path, mode)
        path.chmod(0o600)
    return Identity(key)


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically (never readable by others, even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_identity(data_dir: Path) -> tuple[Identity, bool]:
    """The identity in ``data_dir`` (created on first run); returns (identity, created)."""
    path = data_dir / IDENTITY_FILE
    if path.exists() or path.is_symlink():
        return _read_identity(path), False
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = Identity.generate()
    write_private_file(path, ident.to_pem())
    log.info("created identity %s in %s", ident.peer_id, path, extra={"peer_id": ident.peer_id})
    return ident, True
