"""overlay: the libp2p host behind a narrow interface, and the wire.

Files:
    errors.py    the one error tree of the project
    wire.py      the versioned msgpack codec and message registry
    framing.py   pure stream framing (varint length prefix) and token coalescing
    streams.py   FramedStream: wire messages over libp2p (or in-memory) streams
"""
