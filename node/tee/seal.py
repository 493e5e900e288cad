"""End-to-end sealing of a worker stream: HPKE request, AEAD-numbered chunks, a mandatory final.

Pure core (no I/O, no clock)::

    client                                               worker
    secret <- 32 random bytes
    SealedRequest(claims_hash,                     -->  keys = lookup(claims_hash)   (else "other claims")
      HPKE(X25519, HKDF-SHA256, ChaCha20-Poly1305,      secret || request = HPKE.open(...)
           pk = claims.enc_pk,
           info = label || claims_hash,
           pt = secret || pad(request)))
    both sides: h = SHA-256(sealed);  k_c2s || n_c2s || k_s2c || n_s2c = HKDF-SHA256(secret, salt=h)
    SealedChunk(seq, final, box)                  <->  box = ChaCha20-Poly1305(k_dir, n_dir XOR seq, pad(msg),
                                                             aad = label || h[:16] || seq || final)

Each direction's chunks are numbered from 0 and must arrive in order; a stream
ends only with a chunk whose ``final`` flag (authenticated in the AAD) is set.
So truncation (EOF without final), reordering or replay (wrong seq),
splicing (another stream's keys and stream id), tampering (tag), and a request
sealed to other claims (HPKE ``info``, unknown claims hash) all raise
:class:`~overlay.errors.SealError`.  Messages are padded to 32-byte buckets
(requests to 256) so chunk sizes leak less about tokens.

Secrets come from the OS CSPRNG (``secrets``), never from an injected
``random.Random``.  The trio shell is :class:`node.tee.stream.SealedStream`.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import struct
import typing
from collections import OrderedDict

import attrs
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from overlay import wire
from overlay.errors import SealError

from .claims import EpochKeys, claims_hash
from .messages import MAX_SEALED, Claims, SealedChunk, SealedRequest, TranscriptSignature

__all__ = [
    "CHUNK_PAD",
    "REQUEST_PAD",
    "SUITE",
    "ChunkCipher",
    "ReplayGuard",
    "Session",
    "Transcript",
    "check_transcript",
    "chunk_parts",
    "decode_frame",
    "encode_chunk",
    "open_request",
    "request_info",
    "seal_request",
    "sign_transcript",
    "transcript_message",
    "verify_transcript",
]

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
REQUEST_INFO_LABEL = b"cocoon-node/seal/v1/request\x00"
KEYS_LABEL = b"cocoon-node/seal/v1/stream-keys"
CHUNK_AAD_LABEL = b"cocoon-node/seal/v1/chunk\x00"
TRANSCRIPT_LABEL = b"cocoon-node/seal/v1/transcript\x00"
SECRET_LEN = 32
REQUEST_PAD = 256  # bytes: request plaintext padded to a multiple of this
CHUNK_PAD = 32  # bytes: chunk plaintext padded to a multiple of this
_TAG_LEN = 16
_MAX_SEQ = (1 << 63) - 1


def request_info(c_hash: bytes) -> bytes:
    """HPKE ``info`` binding a request to one set of claims."""
    return REQUEST_INFO_LABEL + c_hash


def _pad(data: bytes, block: int) -> bytes:
    n = len(data) + 1
    return data + b"\x80" + bytes(-n % block)


#: The padding after a chunk payload of length n: 0x80 then zeros up to the next multiple of CHUNK_PAD.
_PADS = tuple(b"\x80" + bytes(-(n + 1) % CHUNK_PAD) for n in range(CHUNK_PAD))


def _unpad(data: bytes) -> bytes:
    stripped = data.rstrip(b"\x00")
    if not stripped or stripped[-1] != 0x80:
        raise SealError("bad padding")
    return stripped[:-1]


class ChunkCipher:
    """One direction of a stream: seals (sender) or opens (receiver) numbered chunks.

    ``seal_frame``/``open_frame`` work on encoded frames (the hot path of the
    stream shell); ``seal``/``open`` are the same on :class:`SealedChunk`.
    """

    __slots__ = ("_aad", "_base", "_decrypt", "_encrypt", "finished", "seq")

    def __init__(self, key: bytes, nonce_base: bytes, stream_id: bytes) -> None:
        aead = ChaCha20Poly1305(key)
        self._encrypt = aead.encrypt
        self._decrypt = aead.decrypt
        self._base = int.from_bytes(nonce_base, "big")
        prefix = CHUNK_AAD_LABEL + stream_id
        self._aad = functools.partial(struct.Struct(f">{len(prefix)}sQ?").pack, prefix)  # (seq, final) -> AAD
        self.seq = 0  # next chunk number
        self.finished = False  # the final chunk went through

    def seal_frame(self, payload: bytes, *, final: bool = False) -> bytes:
        """The next chunk carrying ``payload`` (an encoded wire message, or b"" for a bare final), encoded."""
        if self.finished:
            raise SealError("stream already finished")
        seq = self.seq
        if seq >= _MAX_SEQ:
            raise SealError("chunk counter exhausted")
        box = self._encrypt(
            (self._base ^ seq).to_bytes(12, "big"),
            payload + _PADS[len(payload) % CHUNK_PAD],
            self._aad(seq, final),
        )
        self.seq = seq + 1
        self.finished = final
        return _frame(seq, final, box)

    def seal(self, payload: bytes, *, final: bool = False) -> SealedChunk:
        """As :meth:`seal_frame`, as a message."""
        parts = chunk_parts(self.seal_frame(payload, final=final))
        assert parts is not None
        return SealedChunk(seq=parts[0], final=parts[1], box=parts[2])

    def open_frame(self, payload: bytes) -> bytes | None:
        """The payload of the next chunk, from its encoded frame; None when ``payload`` is not a
        SealedChunk in shortest form (decode it and use :meth:`open`).  Any forged, replayed,
        reordered or spliced chunk raises SealError."""
        parts = chunk_parts(payload)
        if parts is None:
            return None
        seq, final, box = parts
        if self.finished:
            raise SealError(f"chunk {seq} after the final chunk")
        if seq != self.seq:
            what = "replayed" if seq < self.seq else "missing or reordered"
            raise SealError(f"chunk {seq} {what} (expected {self.seq})")
        try:
            padded = self._decrypt((self._base ^ seq).to_bytes(12, "big"), box, self._aad(seq, final))
        except InvalidTag:
            raise SealError(f"chunk {seq} does not authenticate (forged or spliced)") from None
        self.seq = seq + 1
        self.finished = final
        stripped = padded.rstrip(b"\x00")
        if stripped[-1:] != b"\x80":
            raise SealError("bad padding")
        return stripped[:-1]

    def open(self, chunk: SealedChunk) -> bytes:
        """As :meth:`open_frame`, for a decoded chunk."""
        if not 0 <= chunk.seq <= _MAX_SEQ:
            raise SealError(f"chunk number {chunk.seq} out of range")
        data = self.open_frame(_frame(chunk.seq, chunk.final, chunk.box))
        if data is None:  # a box over MAX_SEALED: no valid chunk has one
            raise SealError("chunk too large")
        return data

    def check_end(self) -> None:
        """At end of stream: raise unless the final chunk arrived (truncation)."""
        if not self.finished:
            raise SealError(f"stream truncated after {self.seq} chunks: no final chunk")


@attrs.frozen
class Session:
    """The two directions of one sealed stream."""

    send: ChunkCipher
    recv: ChunkCipher
    stream_id: bytes  # SHA-256(sealed request)[:16]


def _session(secret: bytes, sealed: bytes, *, client: bool) -> Session:
    h = hashlib.sha256(sealed).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=88, salt=h, info=KEYS_LABEL).derive(secret)
    stream_id = h[:16]
    c2s = ChunkCipher(okm[0:32], okm[32:44], stream_id)
    s2c = ChunkCipher(okm[44:76], okm[76:88], stream_id)
    return Session(send=c2s, recv=s2c, stream_id=stream_id) if client else Session(s2c, c2s, stream_id)


def seal_request(claims: Claims, request: bytes) -> tuple[SealedRequest, Session]:
    """Seal an encoded request to the claims' X25519 key; returns the frame and the client session."""
    if len(claims.enc_pk) != 32:
        raise SealError("claims hold no X25519 key")
    c_hash = claims_hash(claims)
    secret = secrets.token_bytes(SECRET_LEN)
    try:
        pk = X25519PublicKey.from_public_bytes(claims.enc_pk)
        sealed = SUITE.encrypt(secret + _pad(request, REQUEST_PAD), pk, info=request_info(c_hash))
    except ValueError as e:
        raise SealError(f"cannot seal to this key: {e}") from e
    if len(sealed) > MAX_SEALED:
        raise SealError(f"request of {len(request)} bytes too large to seal")
    return SealedRequest(claims_hash=c_hash, sealed=sealed), _session(secret, sealed, client=True)


def open_request(request: SealedRequest, keys: EpochKeys) -> tuple[bytes, Session]:
    """Open a request with the epoch keys its claims hash named; returns (request, worker session)."""
    if request.claims_hash != keys.claims_hash:
        raise SealError("request sealed to other claims")
    return _open(request.sealed, keys.enc_key, keys.claims_hash)


def _open(sealed: bytes, key: X25519PrivateKey, c_hash: bytes) -> tuple[bytes, Session]:
    try:
        plain = SUITE.decrypt(sealed, key, info=request_info(c_hash))
    except (InvalidTag, ValueError):
        raise SealError("request does not open with these claims' key") from None
    if len(plain) < SECRET_LEN + 1:
        raise SealError("request too short")
    return _unpad(plain[SECRET_LEN:]), _session(plain[:SECRET_LEN], sealed, client=False)


class Transcript:
    """A running SHA-256 over one direction's plaintexts, each prefixed by its 8-byte length."""

    __slots__ = ("_h", "count", "history")

    def __init__(self, *, keep_history: bool = False) -> None:
        self._h = hashlib.sha256()
        self.count = 0
        self.history: list[bytes] | None = [self.digest] if keep_history else None  # digest after k messages

    @property
    def digest(self) -> bytes:
        return self._h.copy().digest()

    def add(self, message: bytes) -> None:
        self._h.update(_LEN(len(message)) + message)
        self.count += 1
        if self.history is not None:
            self.history.append(self.digest)


_LEN = struct.Struct(">Q").pack


def transcript_message(c_hash: bytes, t: TranscriptSignature) -> bytes:
    """What the worker's epoch Ed25519 key signs at the end of a stream."""
    return b"".join(
        (
            TRANSCRIPT_LABEL,
            c_hash,
            t.stream_id,
            struct.pack(">QQ", t.sent, t.received),
            t.sent_hash,
            t.received_hash,
        )
    )


def sign_transcript(
    keys: EpochKeys, stream_id: bytes, sent: Transcript, received: Transcript
) -> TranscriptSignature:
    unsigned = TranscriptSignature(
        stream_id=stream_id,
        sent=sent.count,
        received=received.count,
        sent_hash=sent.digest,
        received_hash=received.digest,
        signature=b"",
    )
    return attrs.evolve(unsigned, signature=keys.sig_key.sign(transcript_message(keys.claims_hash, unsigned)))


def verify_transcript(t: TranscriptSignature, claims: Claims) -> None:
    """Check the signature by the claims' Ed25519 key (anyone holding the claims can); SealError if bad."""
    try:
        key = Ed25519PublicKey.from_public_bytes(claims.sig_pk)
        key.verify(t.signature, transcript_message(claims_hash(claims), t))
    except (InvalidSignature, ValueError):
        raise SealError("transcript signature does not verify with the attested key") from None


def check_transcript(
    t: TranscriptSignature, claims: Claims, *, stream_id: bytes, received: Transcript, sent: Transcript
) -> None:
    """The client's check: signed by the attested key, over what we received and a prefix of what we sent."""
    verify_transcript(t, claims)
    if t.stream_id != stream_id:
        raise SealError("transcript of another stream")
    if (t.sent, t.sent_hash) != (received.count, received.digest):
        raise SealError(f"worker signed {t.sent} messages sent, we received {received.count} (or others)")
    history = sent.history or []
    if not 0 <= t.received < len(history) or history[t.received] != t.received_hash:
        raise SealError("worker signed a transcript of messages we did not send")


class ReplayGuard:
    """Remembers the hashes of opened requests (LRU, ``capacity``) so a replayed one is refused."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def check(self, request: SealedRequest) -> None:
        h = hashlib.sha256(request.sealed).digest()
        if h in self._seen:
            raise SealError("replayed request")
        self._seen[h] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


# --------------------------------------------------------------------------- fast framing

# SealedChunk's registered fast path (overlay.wire): its envelope [1, 321, [seq, final, box]] in
# msgpack's shortest forms, packed and parsed by hand, byte for byte what the generic codec writes.
_CHUNK = wire.fast_path(SealedChunk)


def _frame(seq: int, final: bool, box: bytes) -> bytes:
    data = _CHUNK.pack(seq, final, box)
    if data is None:
        raise SealError(f"chunk {seq} cannot be framed (sequence number or size out of range)")
    return data


def encode_chunk(chunk: SealedChunk) -> bytes:
    """``wire.encode(chunk)``, byte for byte, through the fast path."""
    return _frame(chunk.seq, chunk.final, chunk.box)


def chunk_parts(payload: bytes) -> tuple[int, bool, bytes] | None:
    """``(seq, final, box)`` if ``payload`` is a SealedChunk envelope in shortest msgpack form, else None."""
    parts = _CHUNK.parts(payload)
    if parts is None:
        return None
    seq, final, box = typing.cast(tuple[int, bool, bytes], parts)  # the fast path's field kinds
    return (seq, final, box) if seq <= _MAX_SEQ else None


def decode_frame(payload: bytes) -> object:
    """Decode one frame of a sealed stream (a SealedChunk takes wire's fast path)."""
    return wire.decode(payload)
