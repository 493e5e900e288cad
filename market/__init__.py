"""cocoon-node market: signed offers, attestation verdicts, the offer book, proxy election.

Pure cores (explicit ``now``, injected ``random.Random``, no I/O):

- ``records.py``     wire messages (tags 200-299) and their Ed25519 signatures
- ``validation.py``  ACCEPT / REJECT / IGNORE for gossiped records, peer scores, the stake oracle
- ``book.py``        the offer book: insert, expire, look up by model, match and rank
- ``election.py``    epochs, candidacy pool, stake-weighted election, rendezvous attachment
- ``reputation.py``  decaying per-worker reputation kept by proxies
- ``pricing.py``     a worker's pricing policy and re-publish schedule, market statistics
- ``core.py``        one node's market state (``ProxyCore``, ``ElectionView``), tying the above
- ``verify.py``      the attestation verifier Protocol (implemented by ``node.tee``)
- ``testing.py``     deterministic record builders for tests, simulations and benchmarks
- ``sim.py``         many nodes' cores in one process over a lossy gossip mesh, virtual time

Trio shells (over :class:`protocols.MarketOverlay`, which :class:`overlay.host.Overlay` satisfies):

- ``protocols.py``   topics, protocol ids, settings, the overlay and DHT Protocols
- ``directory.py``   the elected proxies as a node sees them; a candidate's announcements
- ``service.py``     ``WorkerService`` (offers, report, heartbeats), ``ProxyService`` (book, match)
- ``client.py``      ``MarketClient``: match with the client's own checks, statistics, usage reports
"""
