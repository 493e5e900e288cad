"""cocoon-node market: signed offers, attestation verdicts, the offer book, proxy election.

Pure cores (explicit ``now``, injected ``random.Random``, no I/O):

- ``records.py``     wire messages (tags 200-299) and their Ed25519 signatures
- ``validation.py``  ACCEPT / REJECT / IGNORE for gossiped records, peer scores, stake oracle
- ``book.py``        the offer book: insert, expire, look up by model, match and rank
- ``election.py``    epochs, candidacy pool, stake-weighted election, rendezvous attachment
- ``reputation.py``  decaying per-worker reputation kept by proxies
- ``pricing.py``     worker pricing policy and re-publish schedule, market statistics
- ``core.py``        one node's market state (``ProxyCore``, ``ElectionView``), tying the above
- ``verify.py``      the attestation verifier Protocol (written by confidential compute)
- ``testing.py``     deterministic record builders for tests, simulations and benchmarks
- ``sim.py``         many nodes' cores in one process over a simulated gossip mesh

Trio shell:

- ``service.py``     workers publish offers, proxies validate / endorse / match, clients ask
"""
