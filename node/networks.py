"""Networks and their bootstrap peers, read from ``bootstrap.toml``.

Lookup order: an explicit path, ``<data dir>/bootstrap.toml``, then the file
shipped with the package.  Every bootstrap entry must be a multiaddr ending in
``/p2p/<peer id>``; a malformed file is a ConfigError naming it.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import attrs

from overlay.errors import ConfigError
from overlay.identity import Identity

__all__ = ["Network", "devnet_bootstrap_identity", "load_networks"]

_SHIPPED = Path(__file__).with_name("bootstrap.toml")


@attrs.frozen
class Network:
    name: str
    description: str
    bootstrap: tuple[str, ...]
    chain: str  # "local" or "ton"
    localchain: str = ""  # host:port of the local chain (chain = "local")
    devnet_seed: str = ""  # public seed of the devnet bootstrap key (devnet only)


def devnet_bootstrap_identity(net: Network) -> Identity:
    """The devnet bootstrap key, derived from the public seed in bootstrap.toml."""
    if not net.devnet_seed:
        raise ConfigError(f"network {net.name!r} has no devnet_seed: its bootstrap key is private")
    return Identity.from_seed(hashlib.sha256(net.devnet_seed.encode()).digest())


def load_networks(path: Path | None = None, data_dir: Path | None = None) -> dict[str, Network]:
    """All networks of the first bootstrap.toml found (see the module docstring)."""
    candidates = [p for p in (path, data_dir / "bootstrap.toml" if data_dir else None, _SHIPPED) if p]
    chosen = next((p for p in candidates if p.exists()), None)
    if chosen is None:
        raise ConfigError("no bootstrap.toml found; reinstall cocoon-node or pass --bootstrap-file")
    try:
        raw = tomllib.loads(chosen.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {chosen}: {e}") from e
    nets = raw.get("networks")
    if not isinstance(nets, dict):
        raise ConfigError(f"{chosen}: expected [networks.<name>] tables")
    out: dict[str, Network] = {}
    for name, entry in nets.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{chosen}: networks.{name} must be a table")
        boot = entry.get("bootstrap", [])
        if not isinstance(boot, list) or not all(isinstance(b, str) and "/p2p/" in b for b in boot):
            raise ConfigError(f"{chosen}: networks.{name}.bootstrap must list multiaddrs ending in /p2p/<id>")
        try:
            out[name] = Network(
                name=name,
                description=str(entry.get("description", "")),
                bootstrap=tuple(boot),
                chain=str(entry.get("chain", "local")),
                localchain=str(entry.get("localchain", "")),
                devnet_seed=str(entry.get("devnet_seed", "")),
            )
        except TypeError as e:
            raise ConfigError(f"{chosen}: networks.{name}: {e}") from e
    return out
