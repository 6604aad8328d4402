"""Load test of `seq2seq serve` on loopback. Nothing leaves the machine.

Starts the server as its own process on 127.0.0.1 over `--ckpt` (a checkpoint or an exported folder) and runs:

- levels: N concurrent clients, each sending one test sentence per request (`--requests` per level, at most
  `--seconds`): requests/s, latency p50/p99, and how many got a 200 with one translation;
- mixed: the same with every fourth request bad (an `include` phrase longer than the model writes): the good ones
  must all be answered, the bad ones refused with a 4xx;
- overload: `--flood` clients at once, each with 64 sentences at beam 8, against a server whose queue holds
  `--max-queue` sources: how many got 503, and the latency of those answered;
- abandon: the same flood from clients that give up after one second; then one one-sentence request: its latency
  (work whose client left is dropped, so it does not wait behind it) and the server's memory before and after.

    python benchmarks/serve_load.py --ckpt ko_en_ct2/ --clients 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from seq2seq import Translator
from seq2seq.registry import DATASETS


def _cuts(latencies: list[float]) -> tuple[float, float]:
    if not latencies:
        return float("nan"), float("nan")
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return cuts[49], cuts[98]


async def level(url: str, sentences: list[str], clients: int, requests: int, seconds: float,
                bad_phrase: str | None = None) -> dict:
    """`clients` concurrent clients; with `bad_phrase`, every fourth request asks to include it (a 4xx)."""
    latencies: list[float] = []
    counts = {"answered": 0, "failed": 0, "bad_refused": 0, "bad_accepted": 0}
    queue = list(range(requests))
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() < deadline:
            i = queue.pop()
            bad = bad_phrase is not None and i % 4 == 0
            body: dict = {"text": [sentences[i % len(sentences)]]}
            if bad:
                body["include"] = [[bad_phrase]]
            start = time.perf_counter()
            reply = await http.post("/translate", json=body)
            if bad:
                counts["bad_refused" if 400 <= reply.status_code < 500 else "bad_accepted"] += 1
                continue
            latencies.append(time.perf_counter() - start)
            ok = reply.status_code == 200 and len(reply.json()["translations"]) == 1
            counts["answered" if ok else "failed"] += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    p50, p99 = _cuts(latencies)
    return {**counts, "rps": (counts["answered"] + counts["failed"]) / wall, "p50": p50, "p99": p99}


async def flood(url: str, sentences: list[str], clients: int, give_up: float | None) -> dict:
    """`clients` requests of 64 sentences at beam 8 at once; with `give_up`, each client leaves after that long."""
    body = {"text": (sentences * 64)[:64], "beam": 8}
    codes: list[int | str] = []
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        start = time.perf_counter()
        try:
            reply = await http.post("/translate", json=body)
        except httpx.TimeoutException:
            codes.append("gave up")
            return
        codes.append(reply.status_code)
        if reply.status_code == 200:
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, timeout=give_up or 600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    p50, p99 = _cuts(latencies)
    return {"codes": {c: codes.count(c) for c in sorted(set(codes), key=str)}, "p50": p50, "p99": p99}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--flood", type=int, default=50, help="clients of the overload and abandon cases")
    parser.add_argument("--max-queue", type=int, default=256, help="the server's `max_queue`")
    parser.add_argument("--port", type=int, default=18321)
    args = parser.parse_args()
    translator = Translator.from_checkpoint(args.ckpt)
    sentences = [s for s, _ in DATASETS.build(translator.module.config.data, "data").read("test").pairs]
    too_long = " ".join(sentences * 50)[: 4 * translator.module.model.spec.max_positions * 8]
    server = subprocess.Popen([sys.executable, "-m", "seq2seq", "serve", f"ckpt={args.ckpt}", f"port={args.port}",
                               f"max_queue={args.max_queue}", "max_work=1024", "max_chars=100000",
                               "max_body=10000000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                backend = httpx.get(f"{url}/health").json()["backend"]
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise SystemExit("the server did not start")
        print(f"{args.ckpt} ({backend}): up to {args.requests} one-sentence requests per level, "
              f"{args.seconds:.0f} s at most")
        print(f"{'case':>8}{'clients':>8}{'answered':>10}{'failed':>8}{'bad 4xx':>9}{'bad ok':>8}{'req/s':>8}"
              f"{'p50 ms':>9}{'p99 ms':>9}")
        for mixed in (False, True):
            for clients in args.clients:
                r = asyncio.run(level(url, sentences, clients, args.requests, args.seconds,
                                      too_long if mixed else None))
                print(f"{'mixed' if mixed else 'good':>8}{clients:>8}{r['answered']:>10}{r['failed']:>8}"
                      f"{r['bad_refused']:>9}{r['bad_accepted']:>8}{r['rps']:>8.1f}{1000 * r['p50']:>9.0f}"
                      f"{1000 * r['p99']:>9.0f}")
        r = asyncio.run(flood(url, sentences, args.flood, None))
        print(f"overload: {args.flood} clients x 64 sentences, beam 8, max_queue {args.max_queue}: {r['codes']}; "
              f"answered p50 {r['p50']:.1f} s, p99 {r['p99']:.1f} s")
        before = rss_mb(server.pid)
        r = asyncio.run(flood(url, sentences, args.flood, 1.0))
        start = time.perf_counter()
        reply = httpx.post(f"{url}/translate", json={"text": sentences[:1]}, timeout=600)
        after = time.perf_counter() - start
        print(f"abandon: {args.flood} clients gave up after 1 s ({r['codes']}); a one-sentence request then took "
              f"{after:.2f} s ({reply.status_code}); server memory {before:.0f} -> {rss_mb(server.pid):.0f} MB; "
              f"queued now {httpx.get(f'{url}/health').json()['queued']}")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
