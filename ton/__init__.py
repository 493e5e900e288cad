"""cocoon-node: ton package — payments per token over our own TON payment channels.

Files (pure cores take ``now`` and never do I/O; shells are trio)::

    contract/channel.tolk   the channel contract (Tolk); channel.boc = compiled code, committed
    contract/build.js       build step (@ton/tolk-js, `npm ci && node build.js`); never needed at run time
    data/mainnet-config.boc mainnet config cell (public chain data, from @ton/sandbox 0.41.0)
    keys.py        mnemonics, Ed25519 key pairs, 0600 mnemonic files
    wallets.py     wallet v4r2 / v5r1 addresses and signed transfers (offline)
    contract.py    the contract from Python: params/address, bodies, signed payloads, exit codes
    tvm.py         pytvm's emulator with its bugs worked around (64-bit args, raw calls)
    chain.py       ChainClient Protocol (the one chain interface), AccountInfo, TxInfo
    localchain.py  the local chain core: accounts, clock, real TVM, SQLite persistence
    localservice.py the local chain as an in-process ChainClient (+ faucet, advance_time)
    rpc.py         the local chain over loopback TCP: serve_localchain, LocalChainClient
    lite.py        the real backend: TON testnet/mainnet via pytoniq's LiteBalancer
    onchain.py     wallet transfers and channel operations over any ChainClient
    store.py       KVStore (read/write/remove), its SQLite WAL + fsync implementation, and
                   DurableWriter (every commit on a worker thread, concurrent writes grouped)
    messages.py    wire messages, tags 400-479
    channel.py     the channel state machine (pure): Persist before Send, settlement policy
    metering.py    per-token metering cores (payer, worker, proxy forwarder)
    session.py     trio shell: ChannelShell, PayerSession, WorkerSession, forward_session
    watcher.py     challenges stale uncooperative closes, finishes after the window
    opening.py     channel opening over the wire, the pure part: terms, ids, every check, error codes
    manager.py     PaymentManager (one per node): protocol /cocoon/pay/1, channels per peer,
                   persisted and restored, opening, top-ups, the stream handler
    settlement.py  the settlement driver: propose -> co-sign -> submit, close, policy ticks, watching
    paysessions.py what the node calls around one generation: pay_session, serve_session, routing
    paystats.py    statistics snapshots for `cocoon-node status` and Prometheus

The node uses :class:`ton.manager.PaymentManager` only (see ``ton/README.md``).
"""
