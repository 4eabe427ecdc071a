"""`draftwire overhead`: what NATS plus the codec add to one speculation round, on loopback.

A realistic round (gamma draft positions with top-K proposals over a real vocabulary size) is encoded, sent
as a NATS request to a responder that decodes it and answers with an encoded verdict, and the reply is
decoded: everything a round does except the model forwards. The responder runs in a separate process, as
the verifier does. Prints p50/p99 and writes JSON and a histogram.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from draftwire.shared.core.proposal import ProposalBlock, sparse_row
from draftwire.shared.core.protocol import Verdict, VerifyRequest
from draftwire.shared.io.bus import connect
from draftwire.shared.io.nats_server import EmbeddedNats

SUBJECT = "draftwire.bench.overhead"

_RESPONDER = f"""
import asyncio, sys, time
from draftwire.shared.io.bus import connect, flush
from draftwire.shared.core.protocol import Verdict, VerifyRequest

async def main(url):
    nc = await connect(url, "overhead-responder")
    async def handle(msg):
        req = VerifyRequest.decode(msg.data)
        verdict = Verdict(session=req.session, round=req.round, base=req.base, n_accepted=len(req.tokens),
                          token=int(req.tokens[-1]), verify_s=0.0, sent_at=time.time())
        await msg.respond(verdict.encode())
    await nc.subscribe("{SUBJECT}", cb=handle)
    await flush(nc)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


def make_request(gamma: int, k: int, vocab: int, rng: np.random.Generator, round_: int) -> VerifyRequest:
    rows = [sparse_row(rng.dirichlet(np.full(vocab, 0.01)), k, "f16") for _ in range(gamma)]
    block = ProposalBlock.from_rows(rows, vocab, "f16")
    tokens = [int(ids[0]) if ids is not None else 0 for ids, _ in rows]
    return VerifyRequest(session="bench", round=round_, base=100 + round_, last_token=1,
                         tokens=np.array(tokens), proposals=block, vocab_size=vocab, sent_at=time.time())


async def measure(rounds: int, gamma: int, k: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    reqs = [make_request(gamma, k, vocab, rng, i) for i in range(64)]
    async with EmbeddedNats() as server:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        responder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RESPONDER, server.url, env=env, stdout=subprocess.PIPE
        )
        try:
            await responder.stdout.readline()
            nc = await connect(server.url, "overhead-bench")
            total, codec = [], []
            for i in range(rounds + 50):
                req = reqs[i % len(reqs)]
                t0 = time.perf_counter()
                up = req.encode()
                t1 = time.perf_counter()
                msg = await nc.request(SUBJECT, up, timeout=5)
                t2 = time.perf_counter()
                Verdict.decode(msg.data)
                t3 = time.perf_counter()
                if i >= 50:  # warm-up
                    total.append(t3 - t0)
                    codec.append((t1 - t0) + (t3 - t2))
            await nc.close()
        finally:
            responder.terminate()
            await responder.wait()
    total_ms, codec_ms = np.array(total) * 1e3, np.array(codec) * 1e3
    return {
        "rounds": rounds, "gamma": gamma, "k": k, "vocab": vocab, "uplink_bytes": len(reqs[0].encode()),
        "p50_ms": float(np.percentile(total_ms, 50)), "p99_ms": float(np.percentile(total_ms, 99)),
        "mean_ms": float(total_ms.mean()),
        "device_codec_p50_ms": float(np.percentile(codec_ms, 50)),
        "samples_ms": total_ms.round(4).tolist(),
    }


def cmd_overhead(args) -> int:
    results = [asyncio.run(measure(args.rounds, args.gamma, k, args.vocab)) for k in args.k_values]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"NATS + codec per round on loopback ({args.rounds} rounds, gamma={args.gamma}, vocab={args.vocab}; "
          "responder decodes the request and encodes a verdict, no model)")
    print(f"{'K':>7} {'uplink B':>9} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'device codec p50 ms':>20}")
    for r in results:
        print(f"{r['k']:>7} {r['uplink_bytes']:>9} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['mean_ms']:>8.3f} "
              f"{r['device_codec_p50_ms']:>20.3f}")
    (out / "overhead.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.hist(r["samples_ms"], bins=80, alpha=0.6, label=f"K={r['k']} ({r['uplink_bytes']} B)")
    ax.set_xlabel("round trip: encode + NATS request/reply + decode (ms)")
    ax.set_ylabel("rounds")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=120)
    print(f"wrote {out / 'overhead.json'} and {out / 'overhead.png'}")
    return 0
