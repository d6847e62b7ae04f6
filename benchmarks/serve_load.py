"""Load test of ``digitlens serve``: requests/s, latency percentiles, errors and server memory.

Starts ``python -m digitlens serve RUN ... --port P`` in a subprocess on 127.0.0.1 (so the clients
do not share its interpreter), waits for ``/api/health`` (bounded), then for each scenario runs
``--clients`` concurrent clients (threads with their own httpx connection) for ``--seconds``
seconds, each posting what the page posts: a drawn digit as a 280x280 PNG
(``POST /api/predict?steps=1``). Scenarios:

- ``predict``: probabilities only;
- ``maps3``: probabilities plus three maps per model (saliency, integrated gradients, Grad-CAM;
  a ViT gives attention rollout instead of Grad-CAM: ``methods=default``).

Prints a markdown table: requests/s, p50/p95/p99 latency (ms, client side, end to end), error
count, the mean requests per batch the server reports (its batching of concurrent requests), and
the server's resident memory (VmRSS) before and after the scenario. It stops by itself; the
server is stopped at the end.

    python benchmarks/serve_load.py runs/demo-digits/cnn [RUN ...] [--clients 8] [--seconds 10]
        [--scenarios predict,maps3] [--warmup 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import threading
import time

import numpy as np

SCENARIOS = {"predict": "", "maps3": "default"}


def drawn_digit_png(seed: int) -> bytes:
    """A 280x280 PNG like the page's pad: a white 7 (or 1) on black, jittered by ``seed``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("L", (280, 280), 0)
    draw = ImageDraw.Draw(image)
    dx, dy = rng.integers(-30, 31, size=2)
    if seed % 2:
        draw.line([(140 + dx, 40 + dy), (142 + dx, 240 + dy)], fill=255, width=20)
    else:
        draw.line([(70 + dx, 60 + dy), (210 + dx, 60 + dy), (135 + dx, 235 + dy)], fill=255, width=20, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_scenario(url: str, methods: str, clients: int, seconds: float, bodies: list[bytes]) -> dict:
    """``clients`` threads posting for ``seconds``; returns latencies (s), errors and the duration."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        mine, bad = [], []
        with httpx.Client(base_url=url, timeout=30) as http:
            i = k
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    response = http.post(f"/api/predict?steps=1&methods={methods}", content=bodies[i % len(bodies)],
                                         headers={"Content-Type": "image/png"})
                    if response.status_code != 200:
                        bad.append(f"{response.status_code}: {response.text[:80]}")
                except httpx.HTTPError as exc:
                    bad.append(type(exc).__name__)
                mine.append(time.perf_counter() - started)
                i += clients
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": np.asarray(latencies), "errors": errors, "duration": time.perf_counter() - began}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders to serve")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each scenario's measurement")
    parser.add_argument("--scenarios", default="predict,maps3")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (serve --threads)")
    parser.add_argument("--start-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    import httpx

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"--scenarios: unknown {unknown[0]!r} (choose from {', '.join(SCENARIOS)})")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "digitlens", "serve", *args.runs, "--port", str(port),
                               "--threads", str(args.threads)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        started = time.monotonic()
        while True:
            if server.poll() is not None:
                print(f"error: the server exited: {server.stderr.read().decode().strip().splitlines()[-1:]}", file=sys.stderr)
                return 2
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print(f"error: the server did not answer within {args.start_timeout:g} s", file=sys.stderr)
                return 2
            time.sleep(0.1)
        print(f"server up in {time.monotonic() - started:.1f} s; {args.clients} clients, {args.seconds:g} s per scenario, "
              f"torch threads: {args.threads}; runs: {', '.join(args.runs)}")
        bodies = [drawn_digit_png(seed) for seed in range(16)]
        print("\n| scenario | requests/s | p50 ms | p95 ms | p99 ms | errors | requests per batch | server RSS MiB (before -> after) |")
        print("|---|---|---|---|---|---|---|---|")
        for name in scenarios:
            if args.warmup > 0:
                run_scenario(url, SCENARIOS[name], args.clients, args.warmup, bodies)
            before_rss = rss_mib(server.pid)
            before = httpx.get(f"{url}/api/health").json()
            result = run_scenario(url, SCENARIOS[name], args.clients, args.seconds, bodies)
            after = httpx.get(f"{url}/api/health").json()
            after_rss = rss_mib(server.pid)
            lat = result["latencies"] * 1000
            per_batch = (after["requests"] - before["requests"]) / max(1, after["batches"] - before["batches"])
            p50, p95, p99 = np.percentile(lat, [50, 95, 99]) if len(lat) else (float("nan"),) * 3
            label = {"predict": "predict only", "maps3": "predict + 3 maps"}[name]
            print(f"| {label} | {len(lat) / result['duration']:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
                  f"{len(result['errors'])} | {per_batch:.2f} | {before_rss:.0f} -> {after_rss:.0f} |", flush=True)
            for error in sorted(set(result["errors"]))[:3]:
                print(f"  error: {error}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
