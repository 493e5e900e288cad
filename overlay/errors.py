"""The one error tree of cocoon-node.

Every exception the project raises on purpose derives from :class:`NodeError`.
Third-party errors are mapped at the boundary (``raise Mapped(str(e)) from e``).

::

    NodeError
    ├── ConfigError                  bad config file, bad CLI value, unusable data dir
    │   └── KeyFileError             identity / wallet key file unreadable or corrupt
    ├── StoreError                   a durable write or read of the data dir's store failed
    │   │                            (disk full, I/O error); the message names the file
    │   └── CorruptStore             a stored record that does not decode: never silently reset
    ├── ProtocolError                a peer or we broke the wire protocol
    │   ├── LocalProtocolError       we tried to send something illegal
    │   └── RemoteProtocolError      a peer sent something illegal
    │       ├── DecodeError          bytes that are not a valid envelope
    │       │   ├── FrameTooLarge    a frame over the hard size limit
    │       │   ├── UnknownMessageType  a well-formed envelope with an unregistered tag
    │       │   └── WrongVersion     an envelope of a wire version we do not speak
    │       └── RemoteError          the peer answered with a typed error frame
    ├── TransportError               sockets, dials, streams
    │   ├── DialError                could not reach a peer (refused, no answer, wrong id)
    │   ├── StreamClosed             our side closed it (trio's "Closed")
    │   ├── StreamBroken             the peer vanished mid-stream (trio's "Broken")
    │   └── TimeoutError_            a bounded wait ran out
    ├── OverlayError                 DHT and gossip
    │   ├── RecordRejected           a DHT record failed its namespace validator
    │   └── NotFound                 no value / provider for a key
    ├── MarketError                  offers, verdicts, election, matching
    ├── AttestationError             quotes, claims, policies (reason in ``.reason``)
    ├── SealError                    end-to-end encryption failed (forged, truncated, replayed)
    ├── ChannelError                 payment channel state machine
    │   ├── InsufficientFunds        a state would spend more than the party holds
    │   └── StaleState               a seqno not above the latest, an amount that went down
    ├── ChainError                   the chain backend (local TVM or lite servers)
    └── InferenceError               engines and the generation service
        ├── ModelLoadError           missing, corrupt or truncated model file (names the file)
        └── BadRequest               invalid generation request (prompt too long, bad sampling values)

Packages may subclass these in their own modules; a test walks every module and
checks that no exception class escapes the tree.
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "BadRequest",
    "ChainError",
    "ChannelError",
    "ConfigError",
    "DecodeError",
    "DialError",
    "FrameTooLarge",
    "InferenceError",
    "InsufficientFunds",
    "KeyFileError",
    "LocalProtocolError",
    "MarketError",
    "ModelLoadError",
    "NodeError",
    "NotFound",
    "OverlayError",
    "ProtocolError",
    "RecordRejected",
    "RemoteError",
    "RemoteProtocolError",
    "SealError",
    "StaleState",
    "StoreError",
    "CorruptStore",
    "StreamBroken",
    "StreamClosed",
    "TimeoutError_",
    "TransportError",
    "UnknownMessageType",
    "WrongVersion",
]


class NodeError(Exception):
    """Root of every error cocoon-node raises on purpose."""


class ConfigError(NodeError):
    """A config file, CLI value or data directory is unusable; the message says what to fix."""


class KeyFileError(ConfigError):
    """A key file exists but cannot be read or parsed. Never silently replaced."""


class StoreError(NodeError):
    """A durable write (or read) of the node's store failed: disk full, I/O error. Whatever the
    write was for did not happen (a state that was not persisted is not sent)."""


class CorruptStore(StoreError):
    """A stored record does not decode (a damaged file); the message names the file and the key.
    A node refuses to start on it rather than forget what it holds."""


class ProtocolError(NodeError):
    """The wire protocol was broken."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol forbids."""


class DecodeError(RemoteProtocolError):
    """Bytes that are not a valid envelope or message."""


class FrameTooLarge(DecodeError):
    """A frame larger than the hard limit."""


class UnknownMessageType(DecodeError):
    """An envelope whose type tag is not registered."""


class WrongVersion(DecodeError):
    """An envelope of a wire version we do not speak."""


class RemoteError(RemoteProtocolError):
    """The peer answered with a typed error frame; ``code`` names the kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TransportError(NodeError):
    """Sockets, dials and streams."""


class DialError(TransportError):
    """A peer could not be reached, refused us, or was not who we dialled."""


class StreamClosed(TransportError):
    """The stream was closed by our side (trio's *Closed*)."""


class StreamBroken(TransportError):
    """The peer vanished or reset the stream (trio's *Broken*)."""


class TimeoutError_(TransportError):
    """A bounded wait ran out."""


class OverlayError(NodeError):
    """DHT and gossip."""


class RecordRejected(OverlayError):
    """A DHT record failed its namespace validator."""


class NotFound(OverlayError):
    """No value or provider for a key."""


class MarketError(NodeError):
    """Offers, verdicts, election and matching."""


class AttestationError(NodeError):
    """A quote, claims or policy failed verification; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SealError(NodeError):
    """End-to-end encryption failed: forged, truncated, reordered, replayed or spliced data."""


class ChannelError(NodeError):
    """A payment channel state transition was refused."""


class InsufficientFunds(ChannelError):
    """A state would spend more than the party holds."""


class StaleState(ChannelError):
    """A state whose seqno is not above the latest known one."""


class ChainError(NodeError):
    """The chain backend failed or refused an operation."""


class InferenceError(NodeError):
    """Engines and the generation service."""


class ModelLoadError(InferenceError):
    """A model file is missing, corrupt or truncated; the message names the file."""


class BadRequest(InferenceError):
    """A generation request is invalid (prompt too long, max_tokens over the limit, bad sampling)."""
