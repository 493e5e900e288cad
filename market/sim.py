"""Many nodes' market cores in one process: a discrete-event simulation with a virtual clock.

Model
-----
- **Nodes**: proxy candidates (each keeps a :class:`~market.core.ProxyCore` and
  competes in every election), workers (one model each, an
  :class:`~market.pricing.OfferPublisher` whose load drifts), and clients.
  Every node keeps an :class:`~market.core.ElectionView`.
- **Gossip**: one random mesh per topic (the candidacy topic holds every node;
  each model's offer topic holds the candidates and that model's workers).  A
  node validates a message the first time it sees it and forwards it to its
  mesh peers only on ACCEPT (gossipsub v1.1 semantics).  Each copy takes a
  uniformly drawn one-way latency (so messages reorder) and is dropped with
  probability ``drop``; a dropped copy is recovered by lazy gossip
  (IHAVE/IWANT) within the next heartbeat with probability ``(1 - drop)^2``.
- **Direct links**: heartbeats (worker -> its 3 proxies) and match requests
  (client -> its proxy -> back) take one latency draw each way.
- **Churn**: workers leave (gracefully, publishing a withdrawal, or by
  crashing) and come back; **spammers** flood offers every second and forge
  offers for other workers' peer ids.
- **Time** is virtual (a heap of events); everything random comes from one
  seeded ``random.Random``, so a seed reproduces a run exactly.

Figures (:class:`SimReport`): election agreement at each epoch start (nodes
whose elected set equals the set computed from every candidacy published
before the cut-off), offer propagation from publish to each proxy candidate
(p50/p99 and delivery ratio), and matches: a selection is *stale* when the
offer handed to the client had expired or its worker had already withdrawn it;
an *outdated price* (a newer offer with another price in flight) and a
*crashed* worker (gone without withdrawing, found by client failover) are
counted separately.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections.abc import Callable

import attrs

from overlay.identity import Identity

from .book import OfferBook
from .core import ElectionView, ProxyCore
from .election import ElectionParams, EpochClock, attach, elect
from .pricing import OfferPublisher, PricingPolicy, WorkerProfile
from .records import MatchRequest, SignedCandidacy, SignedOffer, UsageReport, WorkerHeartbeat, sign_offer
from .testing import MODEL_HASH, MemoSignatures, fixed_epoch_seed, make_candidacy, offer_body, seeded_identity
from .validation import MarketLimits, OfferValidator, StakeTable

__all__ = ["SimConfig", "SimReport", "Simulation", "run"]

_CAND_TOPIC = "candidacies"
_COUNTERS = ("matches", "unmatched", "stale", "outdated", "crashed", "spam", "forged", "copies", "dropped")


@attrs.frozen
class SimConfig:
    nodes: int = 1000
    candidates: int = 48  # proxy candidates among the nodes
    k: int = 16  # proxies elected per epoch
    workers: int = 600  # the rest are clients
    models: int = 4
    spammers: int = 2  # workers that flood and forge (counted among workers)
    seed: int = 1
    duration: float = 600.0  # s of virtual time
    epoch_length: float = 120.0  # s
    mesh_out: int = 3  # mesh links each node opens per topic (mean degree about 2x: gossipsub D = 6)
    latency: tuple[float, float] = (0.025, 0.075)  # s one way (RTT 50-150 ms)
    drop: float = 0.01  # probability a message copy is lost
    heartbeat: float = 1.0  # s: gossip heartbeat (lazy repair)
    worker_tick: float = 5.0  # s between a worker's publish checks
    load_period: float = 60.0  # s between load changes (and heartbeats to proxies)
    candidacy_period: float = 60.0  # s between candidacy announcements
    mean_lifetime: float = 3600.0  # s a worker stays before leaving
    mean_downtime: float = 300.0  # s a worker stays away
    graceful: float = 0.9  # probability a leaving worker withdraws its offer
    match_rate: float = 20.0  # matches per second over all clients
    refresh: float = 120.0  # s between routine offer re-publishes
    lifetime: float = 600.0  # s an offer lives


@attrs.frozen
class SimReport:
    nodes: int
    candidates: int
    workers: int
    clients: int
    epochs_checked: int
    election_agreement: float  # fraction of (node, epoch) pairs whose set equals the true set
    offers_published: int  # honest offers (spam and forgeries excluded)
    propagation_p50: float  # s, publish -> first copy at a proxy candidate
    propagation_p99: float
    delivery_ratio: (
        float  # (offer, candidate) pairs delivered / offers published 5 s before the end x candidates
    )
    matches: int
    unmatched: int
    stale_selections: int  # expired or withdrawn offers handed to clients
    stale_rate: float
    outdated_price: int  # a newer offer with another price was already published
    crashed_selections: int  # the worker had crashed without withdrawing (the client fails over)
    spam_published: int  # validly signed flood offers (one per second per spammer)
    spam_accepted_max: int  # most flood offers one proxy accepted (bound: spammers x duration / 10 s)
    spam_selected: int  # matches that handed out a spammer's (valid, live) offer
    forged_published: int
    forged_accepted: int  # nodes that accepted a forgery: must be 0
    copies: int  # message copies sent over mesh links
    dropped: int
    virtual_seconds: float
    wall_seconds: float


@attrs.define
class _Node:
    idx: int
    ident: Identity
    role: str  # "candidate" | "worker" | "client"
    election: ElectionView
    proxy: ProxyCore | None = None
    validator: OfferValidator | None = None  # a worker's own, for relaying its model's topic
    publisher: OfferPublisher | None = None
    model: str = ""
    alive: bool = True
    active: int = 0
    queue: int = 0
    seen: set[int] = attrs.Factory(set)


@attrs.define
class _Truth:
    seqno: int = -1
    withdrawn_at: float | None = None
    crashed_at: float | None = None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Simulation:
    """Build with a :class:`SimConfig`, then :meth:`run` once for a :class:`SimReport`."""

    def __init__(self, cfg: SimConfig) -> None:
        if cfg.candidates <= 0 or cfg.candidates + cfg.workers > cfg.nodes or cfg.spammers > cfg.workers:
            raise ValueError("need 0 < candidates, candidates + workers <= nodes, spammers <= workers")
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self._random = self.rng.random
        self.now = 0.0
        length = cfg.epoch_length
        self.clock = EpochClock(0.0, length, lead=length, overlap=length / 10)
        self.params = ElectionParams(k=cfg.k)
        self.limits = MarketLimits(max_candidacy_lifetime=4 * length)
        self.stakes = StakeTable()
        self.check = MemoSignatures()
        self._events: list[tuple[float, int, Callable[..., None], tuple[object, ...]]] = []
        self._seq = itertools.count()
        self._msg_ids = itertools.count()
        self.models = [f"model-{m}" for m in range(cfg.models)]
        self.nodes = [self._make_node(i) for i in range(cfg.nodes)]
        self.candidates = [n for n in self.nodes if n.role == "candidate"]
        self.workers = [n for n in self.nodes if n.role == "worker"]
        self.clients = [n for n in self.nodes if n.role == "client"]
        self.spammers = {n.idx for n in self.workers[: cfg.spammers]}
        self.by_peer = {n.ident.peer_id: n for n in self.candidates}
        self.bootstrap = sorted(self.by_peer)  # before the first election: a permissioned list
        self.mesh: dict[str, dict[int, list[int]]] = {}
        self._build_mesh(_CAND_TOPIC, [n.idx for n in self.nodes])
        for m in self.models:
            members = [n.idx for n in self.candidates] + [w.idx for w in self.workers if w.model == m]
            self._build_mesh(m, members)
        self.truth = {w.ident.peer_id: _Truth() for w in self.workers if w.idx not in self.spammers}
        self.published_cands: dict[int, list[SignedCandidacy]] = {}
        self.publish_time: dict[int, float] = {}
        self.offer_msgs: set[int] = set()
        self.spam_msgs: set[int] = set()
        self.forged_msgs: set[int] = set()
        self.spam_accepted: dict[int, int] = {}
        self.propagation: list[float] = []
        self.agreement: list[bool] = []
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self._arrivals: dict[int, dict[int, float]] = {}  # message -> node -> earliest scheduled arrival
        self._repair = (1 - cfg.drop) ** 2
        self._first_copies: list[int] = []  # honest offer ids, once per (offer, candidate) first copy

    def _make_node(self, i: int) -> _Node:
        cfg = self.cfg
        role = (
            "candidate" if i < cfg.candidates else "worker" if i < cfg.candidates + cfg.workers else "client"
        )
        ident = seeded_identity(i, f"sim{cfg.seed}")
        view = ElectionView(
            self.clock, fixed_epoch_seed, self.stakes, params=self.params, limits=self.limits,
            check_signature=self.check,
        )  # fmt: skip
        node = _Node(i, ident, role, view)
        if role == "candidate":
            book = OfferBook(load_ttl=2 * cfg.load_period)
            node.proxy = ProxyCore(book=book, check_signature=self.check, attested_tiers=False)
        elif role == "worker":
            node.validator = OfferValidator(check_signature=self.check)
            node.model = self.models[i % cfg.models]
            profile = WorkerProfile(
                ident.peer_id, ident.public_key, (f"/ip4/10.0.{i // 250}.{i % 250}/tcp/4001",),
                node.model, MODEL_HASH, capacity=8, max_context=4096, decode_tok_s=self.rng.uniform(20, 200),
            )  # fmt: skip
            floor = self.rng.randint(50, 150)
            node.publisher = OfferPublisher(
                profile, PricingPolicy(floor, 4 * floor), refresh=cfg.refresh, lifetime=cfg.lifetime
            )
        return node

    # ---- plumbing

    def _at(self, t: float, fn: Callable[..., None], *args: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def _latency(self) -> float:
        lo, hi = self.cfg.latency
        return lo + (hi - lo) * self._random()

    def _build_mesh(self, topic: str, members: list[int]) -> None:
        adj: dict[int, set[int]] = {i: set() for i in members}
        for i in members:
            for j in self.rng.sample(members, min(self.cfg.mesh_out + 1, len(members))):
                if j != i and len(adj[i]) < 4 * self.cfg.mesh_out:
                    adj[i].add(j)
                    adj[j].add(i)
        self.mesh[topic] = {i: sorted(peers) for i, peers in adj.items()}

    def _forward(self, topic: str, frm: int, msg_id: int, rec: object, source: int = -1) -> None:
        """Send one copy to every mesh peer of ``frm`` but ``source`` (the hot loop of the simulation)."""
        nodes, rnd, now = self.nodes, self._random, self.now
        drop, repair, heartbeat = self.cfg.drop, self._repair, self.cfg.heartbeat
        lo, span = self.cfg.latency[0], self.cfg.latency[1] - self.cfg.latency[0]
        arrivals = self._arrivals[msg_id]
        peers = self.mesh[topic].get(frm, ())
        self.counts["copies"] += len(peers) - (source in peers)
        for to in peers:
            if to == source or msg_id in nodes[to].seen:
                continue  # a duplicate: it costs bandwidth and changes nothing, so it is not scheduled
            if rnd() < drop:
                self.counts["dropped"] += 1
                if rnd() >= repair:
                    continue  # the lazy-gossip repair (IHAVE, IWANT) was lost too
                t = now + heartbeat * rnd() + 3 * (lo + span * rnd())
            else:
                t = now + lo + span * rnd()
            if arrivals.get(to, math.inf) <= t:
                continue  # an earlier copy is already on its way: this one would be a duplicate
            arrivals[to] = t
            heapq.heappush(self._events, (t, next(self._seq), self._deliver, (topic, to, frm, msg_id, rec)))

    def _publish(self, topic: str, origin: _Node, rec: object) -> int:
        msg_id = next(self._msg_ids)
        self.publish_time[msg_id] = self.now
        self._arrivals[msg_id] = {}
        origin.seen.add(msg_id)
        if isinstance(rec, SignedOffer):
            self.offer_msgs.add(msg_id)
        self._forward(topic, origin.idx, msg_id, rec)
        return msg_id

    def _deliver(self, topic: str, to: int, frm: int, msg_id: int, rec: object) -> None:
        node = self.nodes[to]
        if msg_id in node.seen:
            return
        node.seen.add(msg_id)
        source = self.nodes[frm].ident.peer_id
        if node.proxy is not None and msg_id in self.offer_msgs:
            if msg_id not in self.spam_msgs and msg_id not in self.forged_msgs:
                self.propagation.append(self.now - self.publish_time[msg_id])
                self._first_copies.append(msg_id)
        if isinstance(rec, SignedCandidacy):
            ok = node.election.receive_candidacy(rec, self.now, source).accepted
        elif isinstance(rec, SignedOffer):
            if node.proxy is not None:
                ok = node.proxy.receive_offer(rec, self.now, source).accepted
                if ok and msg_id in self.spam_msgs:
                    self.spam_accepted[to] = self.spam_accepted.get(to, 0) + 1
            else:
                assert node.validator is not None
                ok = node.validator.validate(rec, self.now, source).accepted
        else:
            ok = False
        if not ok:
            return
        if msg_id in self.forged_msgs:
            self.counts["forged"] += 1
        self._forward(topic, to, msg_id, rec, frm)

    # ---- actors

    def _candidate_tick(self, node: _Node) -> None:
        target = self.clock.epoch_of(self.now) + 2
        if self.now <= self.clock.cutoff(target):
            stake = seeded_identity(node.idx, f"sim{self.cfg.seed}-stake")
            rec = make_candidacy(
                node.ident, stake, epoch=target, now=self.now, amount=1000 + (node.idx * 7919) % 9000,
                stakes=self.stakes, operator=f"operator-{node.idx // 2}",
                lifetime=self.clock.start(target + 1) + self.clock.overlap - self.now,
            )  # fmt: skip
            self.published_cands.setdefault(target, []).append(rec)
            node.election.receive_candidacy(rec, self.now, node.ident.peer_id)
            self._publish(_CAND_TOPIC, node, rec)
        self._at(self.now + self.cfg.candidacy_period, self._candidate_tick, node)

    def _forget_arrivals(self) -> None:
        """Messages older than a minute are delivered everywhere they will be: drop their bookkeeping."""
        horizon = self.now - 60.0
        for msg_id in [m for m in self._arrivals if self.publish_time[m] < horizon]:
            del self._arrivals[msg_id]
        self._at(self.now + 60.0, self._forget_arrivals)

    def _proxy_tick(self, node: _Node) -> None:
        assert node.proxy is not None
        node.proxy.tick(self.now)
        self._at(self.now + 10.0, self._proxy_tick, node)

    def _worker_tick(self, node: _Node) -> None:
        pub = node.publisher
        assert pub is not None
        if node.alive:
            body = pub.tick(self.now, active=node.active, queue_tokens=node.queue)
            if body is not None:
                self.truth[body.peer_id].seqno = body.seqno
                rec = sign_offer(node.ident, body)
                node.validator.validate(rec, self.now) if node.validator else None
                self._publish(node.model, node, rec)
        self._at(self.now + self.cfg.worker_tick, self._worker_tick, node)

    def _load_change(self, node: _Node) -> None:
        if node.alive:
            node.active = max(0, min(8, node.active + self.rng.choice((-2, -1, 0, 1, 2))))
            node.queue = max(0, node.queue + self.rng.randint(-3000, 3000))
            hb = WorkerHeartbeat(0, node.active, 8, node.queue, 50.0, 5.0, 100.0, self.now)
            for peer_id in self._proxies_for(node):
                self._at(self.now + self._latency(), self._heartbeat, self.by_peer[peer_id], node, hb)
        self._at(self.now + self.cfg.load_period, self._load_change, node)

    def _heartbeat(self, proxy: _Node, worker: _Node, hb: WorkerHeartbeat) -> None:
        assert proxy.proxy is not None
        if worker.alive:
            proxy.proxy.heartbeat(worker.ident.peer_id, hb, self.now)

    def _leave(self, node: _Node) -> None:
        pub = node.publisher
        assert pub is not None
        truth = self.truth[node.ident.peer_id]
        body = pub.withdraw(self.now)
        if self.rng.random() < self.cfg.graceful:
            truth.seqno, truth.withdrawn_at = body.seqno, self.now
            self._publish(node.model, node, sign_offer(node.ident, body))
        else:
            truth.crashed_at = self.now  # the process died: the withdrawal is never sent
        node.alive = False
        self._at(self.now + self.rng.expovariate(1 / self.cfg.mean_downtime), self._rejoin, node)

    def _rejoin(self, node: _Node) -> None:
        assert node.publisher is not None
        node.publisher.resume()
        node.alive = True
        node.active = node.queue = 0
        truth = self.truth[node.ident.peer_id]
        truth.withdrawn_at = truth.crashed_at = None
        self._at(self.now + self.rng.expovariate(1 / self.cfg.mean_lifetime), self._leave, node)

    def _spam_tick(self, node: _Node) -> None:
        # One validly signed offer per second (validators accept one per 10 s) and one forgery
        # claiming a random honest worker's peer id and key.
        node.queue += 1  # the spammer's seqno
        body = offer_body(
            node.ident, now=self.now, model_id=node.model, seqno=node.queue, lifetime=self.cfg.lifetime,
            price_prompt=100, price_completion=400, capacity=8,
        )  # fmt: skip
        self.spam_msgs.add(self._publish(node.model, node, sign_offer(node.ident, body)))
        victim = self.rng.choice(self.workers)
        forged = attrs.evolve(body, peer_id=victim.ident.peer_id, worker_key=victim.ident.public_key)
        self.forged_msgs.add(self._publish(node.model, node, SignedOffer(forged, node.ident.sign(b"x"))))
        self._at(self.now + 1.0, self._spam_tick, node)

    def _proxies_for(self, node: _Node) -> list[str]:
        epoch = self.clock.epoch_of(self.now)
        elected = node.election.proxies(epoch)
        if elected:
            return attach(node.ident.peer_id, elected, epoch, 3)
        return attach(node.ident.peer_id, [], epoch, 3) or self.bootstrap[:3]

    def _match(self) -> None:
        client = self.rng.choice(self.clients)
        proxy_ids = self._proxies_for(client)
        model = self.rng.choice(self.models)
        self._at(self.now + self._latency(), self._answer, self.by_peer[proxy_ids[0]], model)
        self._at(self.now + self.rng.expovariate(self.cfg.match_rate), self._match)

    def _answer(self, proxy: _Node, model: str) -> None:
        assert proxy.proxy is not None
        req = MatchRequest(0, model, 10**6, 10**6, "none", 3, ())
        resp = proxy.proxy.match(req, self.now, self.rng)
        if not resp.offers:
            self.counts["unmatched"] += 1
            return
        self.counts["matches"] += 1
        o = resp.offers[0].body
        truth = self.truth.get(o.peer_id)
        if truth is None:  # a spammer's offer: validly signed and live, so not stale
            self.counts["spam"] += 1
        elif o.expires_at <= self.now or (truth.withdrawn_at is not None and truth.withdrawn_at < self.now):
            self.counts["stale"] += 1
        elif truth.crashed_at is not None:
            self.counts["crashed"] += 1
            # The client's dial fails (after a timeout) and it tells its proxy, which suspends the worker.
            report = UsageReport(o.peer_id, False, 0, 0)
            self._at(self.now + 1.0 + self._latency(), self._report, proxy, report)
        elif o.seqno < truth.seqno:
            self.counts["outdated"] += 1

    def _report(self, proxy: _Node, report: UsageReport) -> None:
        assert proxy.proxy is not None
        proxy.proxy.usage(report, self.now)

    def _check_epoch(self, epoch: int) -> None:
        truth = elect(self.published_cands.get(epoch, []), epoch, fixed_epoch_seed(epoch), self.params)
        expected = tuple(p.peer_id for p in truth)
        for node in self.nodes:
            self.agreement.append(tuple(p.peer_id for p in node.election.proxies(epoch)) == expected)

    # ---- run

    def run(self) -> SimReport:
        started = time.perf_counter()
        cfg = self.cfg
        for n in self.candidates:
            self._at(5 * self._random(), self._candidate_tick, n)
            self._at(10 * self._random(), self._proxy_tick, n)
        for w in self.workers:
            if w.idx in self.spammers:
                self._at(self._random(), self._spam_tick, w)
                continue
            self._at(cfg.worker_tick * self._random(), self._worker_tick, w)
            self._at(cfg.load_period * self._random(), self._load_change, w)
            self._at(self.rng.expovariate(1 / cfg.mean_lifetime), self._leave, w)
        if self.clients:
            self._at(10.0, self._match)
        self._at(60.0, self._forget_arrivals)
        first, last = 2, self.clock.epoch_of(cfg.duration)
        for e in range(first, last + 1):
            self._at(self.clock.start(e), self._check_epoch, e)
        events = self._events
        while events and events[0][0] <= cfg.duration:
            t, _, fn, args = heapq.heappop(events)
            self.now = t
            fn(*args)
        honest = self.offer_msgs - self.spam_msgs - self.forged_msgs
        settled = [m for m in honest if self.publish_time[m] <= cfg.duration - 5.0]  # not still in flight
        settled_set = set(settled)
        delivered = sum(1 for m in self._first_copies if m in settled_set)
        expected_pairs = len(settled) * len(self.candidates)
        c = self.counts
        return SimReport(
            nodes=cfg.nodes,
            candidates=len(self.candidates),
            workers=len(self.workers),
            clients=len(self.clients),
            epochs_checked=max(0, last - first + 1),
            election_agreement=sum(self.agreement) / len(self.agreement) if self.agreement else float("nan"),
            offers_published=len(honest),
            propagation_p50=_percentile(self.propagation, 0.5),
            propagation_p99=_percentile(self.propagation, 0.99),
            delivery_ratio=delivered / expected_pairs if expected_pairs else float("nan"),
            matches=c["matches"],
            unmatched=c["unmatched"],
            stale_selections=c["stale"],
            stale_rate=c["stale"] / c["matches"] if c["matches"] else 0.0,
            outdated_price=c["outdated"],
            crashed_selections=c["crashed"],
            spam_published=len(self.spam_msgs),
            spam_accepted_max=max(self.spam_accepted.values(), default=0),
            spam_selected=c["spam"],
            forged_published=len(self.forged_msgs),
            forged_accepted=c["forged"],
            copies=c["copies"],
            dropped=c["dropped"],
            virtual_seconds=cfg.duration,
            wall_seconds=time.perf_counter() - started,
        )


def run(cfg: SimConfig | None = None) -> SimReport:
    """Run one simulation (defaults: 1,000 nodes, 600 virtual seconds)."""
    return Simulation(cfg or SimConfig()).run()
