"""The node's configuration: one frozen :class:`NodeConfig`, loaded from TOML, with CLI overrides.

Sources, later ones win:

1. the defaults below (a devnet node on loopback);
2. ``<data dir>/config.toml`` (or ``--config FILE``);
3. ``--set section.key=value`` and the dedicated CLI flags.

Unknown sections or keys and values of the wrong type are a
:class:`~overlay.errors.ConfigError` naming the file and the key, so a typo is
never silently ignored.  The data dir is ``--data-dir``, else ``$COCOON_HOME``,
else ``$XDG_DATA_HOME/cocoon-node`` (``~/.local/share/cocoon-node``).
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from pathlib import Path
from typing import TypeVar

import attrs

from overlay.errors import ConfigError

__all__ = [
    "ChainSection",
    "ClientSection",
    "NodeConfig",
    "NodeSection",
    "OverlaySection",
    "WorkerSection",
    "apply_overrides",
    "default_data_dir",
    "load_config",
    "parse_override",
]

_T = TypeVar("_T")


@attrs.frozen
class NodeSection:
    network: str = "devnet"  # a network of bootstrap.toml
    log_level: str = "info"  # debug | info | warning | error
    control: bool = True  # serve status/peers on <data dir>/control.sock
    operator: str = ""  # who runs this node (proxy candidates: at most 2 elected per operator)
    proxy_fee_ppm: int = 20_000  # a proxy's fee on forwarded payments, parts per million (2 %)
    metrics_port: int = 0  # serve Prometheus /metrics on 127.0.0.1:<port> (0: off; a client's API has it)


@attrs.frozen
class OverlaySection:
    # IPv4 to listen on; "" = all interfaces (0.0.0.0), except on the devnet network (loopback)
    listen_host: str = ""
    listen_port: int = 0  # TCP port; 0 = any free port
    listen: bool = True  # accept inbound connections (false: outbound only, reached through relays)
    announce: tuple[str, ...] = ()  # multiaddrs others should dial (e.g. a port forwarded by the router)
    dht_mode: str = "auto"  # auto (server only while reachable) | server | client
    reachability: str = "auto"  # auto (measured by dial-backs) | public | private (skip the measurement)
    relay: bool = True  # a proxy or bootstrap node relays circuits for workers behind NAT
    relay_reservations: int = 256  # reservations a relay holds at once
    relay_reservation_s: float = 900.0  # s a reservation lasts before it must be renewed
    relay_circuit_s: float = 1800.0  # s one relayed connection may stay open (0: no limit)
    relay_circuit_mb: int = 256  # MiB one relayed connection may carry (0: no limit)
    holepunch: bool = True  # try DCUtR hole punching after dialling a peer through a relay
    bootstrap: tuple[str, ...] = ()  # extra bootstrap multiaddrs (added to the network's list)
    bootstrap_attempts: int = 5  # tries per bootstrap address
    max_frame: int = 1 << 20  # bytes, largest frame on our streams
    publish_rate: float = 200.0  # gossip publishes per second, at most


@attrs.frozen
class WorkerSection:
    model: str = "default"  # "default" (SmolLM2-135M-Instruct), a GGUF file or a Hugging Face directory
    engine: str = "auto"  # auto | cpu | cuda | exllamav2 | exllamav3 (auto: the best that loads here)
    max_batch: int = 8  # concurrent requests decoded together (at most; the engine reports what it runs)
    max_context: int = 2048  # tokens, prompt + completion
    price_prompt: int = 250  # nanoTON per prompt token at zero load (the floor)
    price_completion: int = 1000  # nanoTON per completion token at zero load (1 TON per 1M tokens)
    threads: int = 1  # torch threads for the CPU engine


@attrs.frozen
class ClientSection:
    api_host: str = "127.0.0.1"  # the OpenAI-compatible API listens here (loopback only by default)
    api_port: int = 8080  # TCP port of the API
    api_key: str = ""  # when set, requests must carry "Authorization: Bearer <key>"
    max_price_completion: int = 2000  # nanoTON per completion token, at most (before the proxy fee)
    max_price_prompt: int = 500  # nanoTON per prompt token, at most (before the proxy fee)
    min_tier: str = "none"  # none | tdx: the least confidential worker we accept
    models: tuple[str, ...] = ("smollm2-135m-instruct",)  # models /v1/models lists


@attrs.frozen
class ChainSection:
    backend: str = "local"  # local (embedded TVM chain) | ton (testnet/mainnet via lite servers)
    localchain: str = "127.0.0.1:4790"  # host:port of `cocoon-node localchain`
    global_config: str = ""  # path of a TON global config JSON (backend = ton)
    wallet_version: str = "v5r1"  # v5r1 | v4r2: the node wallet (mnemonic in <data dir>/wallet.mnemonic)
    network_id: int = -239  # TON global id the wallet signs for: -239 mainnet (and local), -3 testnet


@attrs.frozen
class NodeConfig:
    data_dir: Path
    node: NodeSection = NodeSection()
    overlay: OverlaySection = OverlaySection()
    worker: WorkerSection = WorkerSection()
    client: ClientSection = ClientSection()
    chain: ChainSection = ChainSection()


_SECTIONS: dict[str, type] = {
    "node": NodeSection,
    "overlay": OverlaySection,
    "worker": WorkerSection,
    "client": ClientSection,
    "chain": ChainSection,
}


def default_data_dir() -> Path:
    """``$COCOON_HOME``, else ``$XDG_DATA_HOME/cocoon-node``, else ``~/.local/share/cocoon-node``."""
    home = os.environ.get("COCOON_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "cocoon-node"


def _coerce(value: object, tp: object, where: str) -> object:
    """Check (and lightly convert) one TOML or CLI value to the field's type."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, str):
            value = [v for v in (x.strip() for x in value.split(",")) if v]
        if isinstance(value, list | tuple):
            return tuple(_coerce(v, typing.get_args(tp)[0], where) for v in value)
    elif tp is Path or (origin in (typing.Union, types.UnionType)):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type[_T], values: dict[str, object], where: str) -> _T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in attrs.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, str]:
    """``section.key=value`` -> (section, key, value)."""
    key, sep, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. overlay.listen_port=4701)")
    return section, name, value


def apply_overrides(cfg: NodeConfig, overrides: dict[str, dict[str, object]]) -> NodeConfig:
    """A new config with ``overrides[section][key] = value`` applied (values type-checked)."""
    changes: dict[str, object] = {}
    for section, values in overrides.items():
        cls = _SECTIONS.get(section)
        if cls is None:
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(_SECTIONS)}")
        current = attrs.asdict(getattr(cfg, section), recurse=False)
        current.update(values)
        changes[section] = _build(cls, current, section)
    return attrs.evolve(cfg, **changes)  # type: ignore[arg-type]


def load_config(
    data_dir: Path | None = None,
    config_file: Path | None = None,
    overrides: dict[str, dict[str, object]] | None = None,
) -> NodeConfig:
    """Defaults, then the TOML file, then ``overrides``; frozen."""
    data_dir = (data_dir or default_data_dir()).expanduser()
    cfg = NodeConfig(data_dir=data_dir)
    path = config_file or data_dir / "config.toml"
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from e
        file_values: dict[str, dict[str, object]] = {}
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            file_values[section] = values
        try:
            cfg = apply_overrides(cfg, file_values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    elif config_file is not None:
        raise ConfigError(f"config file {config_file} does not exist")
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg
