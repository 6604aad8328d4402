"""Load test of `seq2seq serve` on loopback: N concurrent clients, each sending one test sentence per request.

Starts the server as its own process on 127.0.0.1 over `--ckpt` (a checkpoint or an exported folder), then for each
concurrency level sends `--requests` requests (at most `--seconds` seconds per level) and reports requests/s,
latency p50/p99, and whether every request got a 200 with one translation. Nothing leaves the machine.

    python benchmarks/serve_load.py --ckpt ko_en_ct2/ --clients 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import httpx

from seq2seq import Translator
from seq2seq.registry import DATASETS


async def level(url: str, sentences: list[str], clients: int, requests: int, seconds: float) -> dict:
    latencies: list[float] = []
    answered, failed = 0, 0
    queue = list(range(requests))
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal answered, failed
        while queue and time.perf_counter() < deadline:
            i = queue.pop()
            start = time.perf_counter()
            reply = await http.post("/translate", json={"text": [sentences[i % len(sentences)]]})
            latencies.append(time.perf_counter() - start)
            ok = reply.status_code == 200 and len(reply.json()["translations"]) == 1
            answered, failed = answered + ok, failed + (not ok)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"sent": answered + failed, "answered": answered, "failed": failed, "rps": (answered + failed) / wall,
            "p50": cuts[49], "p99": cuts[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--port", type=int, default=18321)
    args = parser.parse_args()
    translator = Translator.from_checkpoint(args.ckpt)
    sentences = [s for s, _ in DATASETS.build(translator.module.config.data, "data").read("test").pairs]
    server = subprocess.Popen([sys.executable, "-m", "seq2seq", "serve", f"ckpt={args.ckpt}", f"port={args.port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        print(f"{'clients':>7}{'sent':>6}{'answered':>10}{'failed':>8}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
        for clients in args.clients:
            r = asyncio.run(level(url, sentences, clients, args.requests, args.seconds))
            print(f"{clients:>7}{r['sent']:>6}{r['answered']:>10}{r['failed']:>8}{r['rps']:>8.1f}"
                  f"{1000 * r['p50']:>9.0f}{1000 * r['p99']:>9.0f}")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
