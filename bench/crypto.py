"""Confidential-compute benchmark: sealing cost per chunk, HPKE setup, TDX quote verification.

Everything runs in this process on one core.  Each figure is the best of
``--repeats`` short runs' means (the machine is shared and noisy; the best
short run is the least disturbed).  Baselines measured in the same run: the bare
ChaCha20-Poly1305 encrypt+decrypt of the same payload, dcap-qvl's own
``verify``.  Prints one table.  Run:

    .venv/bin/python bench/crypto.py [--quick]

Figures (targets from issue 5):
- per-chunk seal+open of a 40-byte token message (a TokenChunk's size):
  the sealing core on encoded frames (nonce, AAD, padding, AEAD, msgpack
  envelope, sequence checks), target <= 5 us;
- HPKE setup: the client's seal_request and the worker's open_request (1 KiB prompt);
- quote verification with the real fixture (../shared/fixtures/tdx, skipped
  when absent): parse + chain to the pinned root + dcap-qvl with collateral +
  DEBUG and measurement checks, target <= 2 ms; a cache hit; the test-TEE path;
- the share of one core that sealing costs a worker streaming 200 tokens/s
  (one sealed chunk and one transcript hash per token, plus one request
  opened per 256 tokens), target <= 1 %.
"""

from __future__ import annotations

import argparse
import calendar
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from node.tee import (
    INTEL_SGX_ROOT,
    CollateralStore,
    SyntheticTee,
    TdxVerifier,
    TeePolicy,
    Verifier,
    make_tdx_report,
    measurement_of,
    new_epoch_keys,
    open_request,
    parse_quote,
    report_data,
    seal_request,
)
from node.tee.claims import EpochKeys
from node.tee.seal import ChunkCipher, Transcript
from overlay import wire

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "tdx"
FIXTURE_NOW = calendar.timegm((2025, 6, 19, 12, 0, 0))
TOKEN_MSG = os.urandom(40)  # bytes: about one encoded TokenChunk
PROMPT = os.urandom(1024)
TOK_S = 200  # tokens/s of the worker in the core-share figure
TOKENS_PER_REQUEST = 256


def best_mean_us(fns: Mapping[str, Callable[[], object]], n: int, rounds: int) -> dict[str, float]:
    """For each function, the best over ``rounds`` of the mean of ``n`` calls, in microseconds.

    The functions take turns within every round, so a figure and its baseline see the same load.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return {name: t * 1e6 for name, t in best.items()}


def _keys() -> EpochKeys:
    return new_epoch_keys(
        tier="tdx",
        peer_id="12D3KooWM1fkd4Uyda7gvV7reznkKUzdPu9RmvMYiM73GKP9HWVJ",
        model_id="smollm2-135m-instruct-q4_1",
        model_hash=bytes(32),
        epoch=1,
        epoch_beacon=bytes(32),
        issued_at=0,
        not_after=2**40,
    )


def bench_chunks(n: int, repeats: int) -> dict[str, float]:
    key, nonce, sid = os.urandom(32), os.urandom(12), os.urandom(16)
    aead = ChaCha20Poly1305(key)
    aad = os.urandom(45)

    def bare() -> None:
        aead.decrypt(nonce, aead.encrypt(nonce, TOKEN_MSG, aad), aad)

    tx, rx = ChunkCipher(key, nonce, sid), ChunkCipher(key, nonce, sid)

    def chunk() -> None:
        rx.open_frame(tx.seal_frame(TOKEN_MSG))

    tx2 = ChunkCipher(key, nonce, sid)
    t_sent = Transcript()

    def seal_only() -> None:  # what a worker pays per token inside SealedStream
        tx2.seal_frame(TOKEN_MSG)
        t_sent.add(TOKEN_MSG)

    tx3, rx3 = ChunkCipher(key, nonce, sid), ChunkCipher(key, nonce, sid)
    t_a, t_b = Transcript(), Transcript()

    def chunk_transcript() -> None:  # both ends, with the transcript hashes SealedStream keeps
        t_a.add(TOKEN_MSG)
        t_b.add(rx3.open_frame(tx3.seal_frame(TOKEN_MSG)) or b"")

    fns = {"bare": bare, "chunk": chunk, "chunk_transcript": chunk_transcript, "seal": seal_only}
    return best_mean_us(fns, n, repeats)


def bench_hpke(n: int, repeats: int) -> dict[str, float]:
    keys = _keys()
    sealed = [seal_request(keys.claims, PROMPT)[0] for _ in range(n)]
    it = iter(sealed * repeats * 2)
    return best_mean_us(
        {
            "seal_request": lambda: seal_request(keys.claims, PROMPT),
            "open_request": lambda: open_request(next(it), keys),
        },
        n,
        repeats,
    )


def bench_quotes(n: int, repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    tee = SyntheticTee(b"bench".ljust(32, b"\0"))
    keys = _keys()
    synth = wire.encode(make_tdx_report(keys.claims, tee.quote(report_data(keys.claims)), None))
    policy = TeePolicy(seq=1, issued_at=0, not_after=2**40, measurements=(tee.measurement,))
    v = Verifier(tdx=TdxVerifier(policy=policy, roots=(INTEL_SGX_ROOT, tee.root)), cache_size=1)

    def synthetic_check() -> None:
        v._cache.clear()
        v.check(synth, now=FIXTURE_NOW)

    out.update(best_mean_us({"synthetic": synthetic_check}, n, repeats))
    out.update(best_mean_us({"cache_hit": lambda: v.check(synth, now=FIXTURE_NOW)}, n * 10, repeats))
    quote_path, coll_path = FIXTURES / "tdx_quote", FIXTURES / "tdx_quote_collateral.json"
    if not (quote_path.exists() and coll_path.exists()):
        return out
    import dcap_qvl

    raw, text = quote_path.read_bytes(), coll_path.read_text()
    store = CollateralStore()
    ref = store.add(text)
    allowed = measurement_of(parse_quote(raw).td)
    real_policy = TeePolicy(seq=1, issued_at=0, not_after=2**40, measurements=(allowed,))
    tdx = TdxVerifier(policy=real_policy, roots=(INTEL_SGX_ROOT,), collateral=store)
    coll = dcap_qvl.QuoteCollateralV3.from_json(text)
    assert tdx.check_quote(raw, now=FIXTURE_NOW, collateral_ref=ref).status == "UpToDate"
    out.update(best_mean_us({"parse": lambda: parse_quote(raw)}, n * 10, repeats))
    out.update(
        best_mean_us(
            {
                "dcap_verify": lambda: dcap_qvl.verify(raw, coll, FIXTURE_NOW),
                "real": lambda: tdx.check_quote(raw, now=FIXTURE_NOW, collateral_ref=ref),
            },
            n,
            repeats,
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (noisier)")
    ap.add_argument("--repeats", type=int, default=25, help="short runs per figure; the best mean counts")
    args = ap.parse_args()
    repeats = 5 if args.quick else args.repeats

    chunks = bench_chunks(200, repeats * 10)
    hpke_ = bench_hpke(10, repeats)
    quotes = bench_quotes(5, repeats * 2)
    per_token_us = chunks["seal"] + hpke_["open_request"] / TOKENS_PER_REQUEST
    share = TOK_S * per_token_us / 1e6

    rows: list[tuple[str, str, str, str]] = [
        ("chunk seal+open, 40 B (framed)", f"{chunks['chunk']:.2f} us", "<= 5 us", _ok(chunks["chunk"] <= 5)),
        ("  baseline: bare ChaCha20-Poly1305 enc+dec", f"{chunks['bare']:.2f} us", "", ""),
        ("  sealing overhead over bare AEAD", f"{chunks['chunk'] - chunks['bare']:.2f} us", "", ""),
        ("  with both transcript hashes (SealedStream)", f"{chunks['chunk_transcript']:.2f} us", "", ""),
        ("chunk seal + transcript hash (worker side)", f"{chunks['seal']:.2f} us", "", ""),
        ("HPKE seal_request, 1 KiB (client)", f"{hpke_['seal_request']:.1f} us", "", ""),
        ("HPKE open_request, 1 KiB (worker)", f"{hpke_['open_request']:.1f} us", "", ""),
        ("report check, test TEE (chain + sigs)", f"{quotes['synthetic'] / 1e3:.3f} ms", "", ""),
        ("report check, cache hit", f"{quotes['cache_hit']:.1f} us", "", ""),
    ]
    if "real" in quotes:
        rows += [
            (
                "quote verify, real fixture (ours + dcap)",
                f"{quotes['real'] / 1e3:.3f} ms",
                "<= 2 ms",
                _ok(quotes["real"] <= 2000),
            ),
            ("  baseline: dcap_qvl.verify alone", f"{quotes['dcap_verify'] / 1e3:.3f} ms", "", ""),
            ("  our quote parser", f"{quotes['parse']:.1f} us", "", ""),
        ]
    else:
        rows.append(("quote verify, real fixture", "skipped", "<= 2 ms", "fixture absent"))
    rows.append(
        (f"core share of sealing at {TOK_S} tok/s", f"{share * 100:.3f} %", "<= 1 %", _ok(share <= 0.01))
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>12}  {'target':>8}  result")
    print("-" * (width + 34))
    for name, value, target, result in rows:
        print(f"{name:<{width}}  {value:>12}  {target:>8}  {result}")
    print(f"(best of {repeats} means per figure; other load on the host inflates them)")


def _ok(passed: bool) -> str:
    return "ok" if passed else "MISSED"


if __name__ == "__main__":
    main()
