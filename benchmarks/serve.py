"""`fedaug serve` throughput and latency: micro-batched vs one request per forward pass, measured in one run.

A SASRec bundle over the data set's catalog (untrained: speed does not depend on the weights; or --model) is
served by a real `fedaug serve` process per mode; ``clients`` concurrent clients each send `POST /v1/recommend`
(k = 10, a random user's history) back to back for ``--seconds``. The load generator runs on its own CPU (the
last one) and the server on the others, so the client's own work is not charged to the server. Modes:
``batched`` (the default server) and ``single`` (``--max-batch 1``: one request per forward pass, the baseline
every ratio is taken against).

    python benchmarks/serve.py --out benchmarks/results/serve_cpu.json [--data PATH/Beauty.txt]

Writes {"results": [{"mode", "clients", "rps", "p50_ms", "p99_ms", "requests"}], "ratio_batched_16"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "amazon-beauty" / "Beauty.txt"
MODES = {"single": ["--max-batch", "1", "--max-wait-ms", "0"], "batched": []}  # batched: `fedaug serve` as it starts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bundle(data_path: Path, directory: Path) -> tuple[Path, list[list[str]]]:
    import torch

    from fedaug.common.config import ModelSection
    from fedaug.common.data.loaders import load
    from fedaug.common.model.evaluate import sasrec_scorer
    from fedaug.common.model.sasrec import SASRec, SASRecConfig
    from fedaug.common.recommend.bundle import write_bundle

    data = load(data_path)
    torch.manual_seed(0)
    plain = ModelSection(tie_embeddings=False, behaviour=False, time_context=False, hidden=64, max_len=50, item_dim=64)
    model = SASRec(SASRecConfig.from_section(plain, data.n_items))
    write_bundle(directory, sasrec_scorer(model.eval(), "cpu"), data.catalog)
    raw = data.catalog.raw_ids
    histories = [[str(i) for i in raw[data.sequence(u)][-50:].tolist()] for u in range(min(data.n_users, 2000))]
    return directory, histories


class _Connection:
    """A keep-alive HTTP/1.1 connection over asyncio streams: the load generator must cost less than the server
    it measures (httpx spends ~3 ms of CPU a request here, more than the server's own work when batched)."""

    def __init__(self, port: int):
        self.port = port

    async def open(self) -> _Connection:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def post(self, path: str, body: dict) -> bytes:
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        data = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        self.writer.close()


async def _drive(port: int, histories: list[list[str]], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    rng = np.random.default_rng(0)
    connections = [await _Connection(port).open() for _ in range(clients)]
    for _ in range(3):  # warm-up
        await connections[0].post("/v1/recommend", {"history": histories[0], "k": 10})
    stop = time.monotonic() + seconds

    async def client(connection: _Connection, seed: int) -> None:
        local = np.random.default_rng(seed)
        while time.monotonic() < stop:
            body = {"history": histories[int(local.integers(len(histories)))], "k": 10}
            started = time.perf_counter()
            await connection.post("/v1/recommend", body)
            latencies.append(time.perf_counter() - started)

    began = time.monotonic()
    await asyncio.gather(*(client(c, int(rng.integers(1 << 30))) for c in connections))
    elapsed = time.monotonic() - began
    for connection in connections:
        connection.close()
    ms = np.array(latencies) * 1000
    return {"rps": round(len(latencies) / elapsed, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "requests": len(latencies)}


_ALL = sorted(os.sched_getaffinity(0))
SERVER_CPUS, CLIENT_CPUS = (set(_ALL[:-1]) or set(_ALL)), {_ALL[-1]}
"""The client on the last CPU, the server on the rest (on a one-CPU machine they share it)."""


def _serve(model: Path, mode: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    server_cpus = SERVER_CPUS
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(len(server_cpus))}
    process = subprocess.Popen([sys.executable, "-m", "fedaug", "serve", "--model", str(model), "--port", str(port),
                                "--device", "cpu", *MODES[mode]], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, preexec_fn=lambda: os.sched_setaffinity(0, server_cpus))
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process, port
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"fedaug serve ({mode}) did not come up in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, default=None, help="a bundle to serve (default: untrained SASRec)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", default="1,16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, histories = _bundle(args.data, Path(tmp) / "model")
        if args.model:
            model = args.model
        results = []
        os.sched_setaffinity(0, CLIENT_CPUS)  # the load generator, from here on
        for mode in MODES:
            process, port = _serve(model, mode)
            try:
                for clients in (int(c) for c in args.clients.split(",")):
                    row = {"mode": mode, "clients": clients,
                           **asyncio.run(_drive(port, histories, clients, args.seconds))}
                    print(row, flush=True)
                    results.append(row)
            finally:
                process.terminate()
                process.wait(30)
    by = {(r["mode"], r["clients"]): r for r in results}
    top = max(int(c) for c in args.clients.split(","))
    ratio = round(by[("batched", top)]["rps"] / by[("single", top)]["rps"], 2)
    out = {"data": str(args.data), "model": str(args.model or "untrained SASRec, hidden 64, max_len 50"),
           "seconds_per_point": args.seconds, "server_cpus": sorted(SERVER_CPUS), "client_cpus": sorted(CLIENT_CPUS),
           "results": results,
           f"ratio_batched_{top}": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"batched / single at {top} clients: {out[f'ratio_batched_{top}']}x")


if __name__ == "__main__":
    main()
