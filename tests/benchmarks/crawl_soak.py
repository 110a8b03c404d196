"""Crawl soak: peak memory of clipline's crawl stage at 10,000 and 100,000 URLs, side by side.

Each size is crawled through clipline's own crawl stage (a job file run by `pipelines.runner.run_job`, as
the tests run it) from a loopback server that answers every path with the same small pre-encoded JPEG
(64 px, resized to 32), in a fresh local Ray started in a subprocess of its own (this script run again
with `--one N`), so that each size's peaks are its own. Every URL is on one host, so the per-host cap is
off. Measured per size: rows in and rows out by status (every input row exactly once: the output's
sorted source_row is range(N)), wall time of run_job and rows/s, and memory:

- driver +: growth of the driver's peak RSS (VmHWM, reset just before run_job) over its RSS at that point;
- worker pk: the largest VmHWM of any Ray worker process under the driver (tests/support/procmem.py: started as
  default_worker.py, retitled `ray::<task>`), read every 0.5 s and at the end;
- workers: the largest sum of the Ray workers' RSS in one sample (psutil, every 0.5 s);
- tree: the same for the driver and all its descendants (raylet, GCS, Ray's agents, workers);
- drift: the tree's largest sum in the second half of the run over that in the first half.

Before the measured crawl, each process crawls a few hundred other URLs (--warmup) with the same
settings, so that imports, MLflow's database and every Ray worker's imports are done and the figures are
those of a crawl under way, not of its start-up (the worker peaks still include it: VmHWM is for life).

RSS counts shared pages (libraries, the object store) once per process, so the totals overstate what the
machine spends; what matters here is how they change with size. Printed: a row per size, the peak RSS
per kind of process, and the ratio of the largest size's peaks to the smallest's: about 1 while the rows
grow 10x means the crawl's memory does not grow with its input.

    make bench            # or: .venv/bin/python -m tests.benchmarks.crawl_soak [--sizes 10000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


class JpegServer:
    """HTTP on 127.0.0.1 (port 0) answering any request with one pre-encoded JPEG, then closing the connection.

    asyncio in a thread of its own: the demo server renders each image and starts a thread per connection,
    which is slower than a crawl on two cores; this one costs a few tens of microseconds a request."""

    def __init__(self, side: int = 64) -> None:
        import numpy as np
        from PIL import Image

        y, x = np.mgrid[0:side, 0:side]
        pixels = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], axis=-1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        body = buf.getvalue()
        self.response = (b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % len(body)) + body
        self.served = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jpeg-server", daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> JpegServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the JPEG server did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        self._loop = loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=4096))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.response)
            await writer.drain()
            self.served += 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()


def write_url_list(path: Path, base: str, rows: int) -> None:
    """rows unique URLs with captions, in the format of pipelines.demo.server.url_list (url, caption)."""
    import pandas as pd

    pd.DataFrame({"url": [f"{base}/{i}" for i in range(rows)],
                  "caption": [f"a test image, number {i}" for i in range(rows)]}).to_parquet(path, index=False)


# -- one size, in its own process and its own Ray -------------------------------------------------------------

class Sampler(threading.Thread):
    """Every `interval` s: the RSS of this process and of each descendant, summed per kind; the largest sums
    kept, and each Ray worker's last VmHWM (so a worker that exits before the end still counts)."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        import psutil

        from tests.support import procmem

        self.psutil, self.procmem = psutil, procmem
        self.interval, self.stop = interval, threading.Event()
        self.me = psutil.Process()
        self.peak_by_kind: Counter[str] = Counter()  # largest per-sample sum of RSS of each kind
        self.peak_workers_total = self.peak_tree_total = 0
        self.worker_hwm: dict[int, int] = {}
        self.max_workers_at_once = 0
        self.samples = 0
        self.trace: list[tuple[float, int, int]] = []  # (seconds, workers total, tree total)
        self.t0 = time.perf_counter()

    def _kind(self, pid: int) -> str:
        """Classified at every sample: a worker the raylet has forked but not yet exec'd looks like the raylet."""
        if pid == self.me.pid:
            return "driver"
        exe = os.path.basename(self.procmem.cmdline(pid).split(b"\0", 1)[0]).decode(errors="replace")
        if exe in ("raylet", "gcs_server"):
            return exe
        return "ray worker" if self.procmem.is_ray_worker(pid) else "other"  # other: Ray's agents and monitors

    def sample(self) -> None:
        psutil = self.psutil
        try:
            procs = [self.me, *self.me.children(recursive=True)]
        except psutil.Error:
            return
        sums: Counter[str] = Counter()
        workers = 0
        for proc in procs:
            try:
                kind = self._kind(proc.pid)
                sums[kind] += proc.memory_info().rss
            except psutil.Error:
                continue  # gone meanwhile
            if kind == "ray worker":
                workers += 1
                if (hwm := self.procmem.vm_hwm(proc.pid)) is not None:
                    self.worker_hwm[proc.pid] = max(hwm, self.worker_hwm.get(proc.pid, 0))
        for kind, total in sums.items():
            self.peak_by_kind[kind] = max(self.peak_by_kind[kind], total)
        tree = sum(sums.values())
        self.peak_workers_total = max(self.peak_workers_total, sums["ray worker"])
        self.peak_tree_total = max(self.peak_tree_total, tree)
        self.max_workers_at_once = max(self.max_workers_at_once, workers)
        self.samples += 1
        self.trace.append((round(time.perf_counter() - self.t0, 2), sums["ray worker"], tree))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self.sample()  # a last one, after the crawl


def run_one(args: argparse.Namespace) -> dict:
    """Crawl args.one rows of args.list in a fresh local Ray; return the figures (see the module docstring)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's servers on 127.0.0.1 (see conftest)
    import gc

    import pyarrow.parquet as pq
    import ray

    # isort: split
    import psutil  # Ray's own copy where the environment has none (ray puts it on sys.path), so after ray

    from pipelines import spec
    from pipelines.runner import run_job
    from tests.conftest import crawl_stage, write_job
    from tests.support import procmem

    work = Path(args.work)
    stage = crawl_stage(args.list, samples_per_shard=args.shard, threads=args.threads, image_size=args.image_size,
                        timeout=args.timeout, http_retries=0, per_host_connections=args.per_host_connections)
    job = spec.load(write_job(work, {"crawl": stage}, name=f"soak{args.one}"))
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    if args.warmup:  # imports, MLflow's database and Ray's workers made ready, so the peaks below are the crawl's
        # in shards enough to keep every worker busy, so that each of them has imported the crawl's code
        per_shard = -(-args.warmup // (2 * args.num_cpus))
        warm = crawl_stage(args.warm_list, **{k: v for k, v in stage["with"].items() if k != "input"}
                           | {"samples_per_shard": per_shard})
        run_job(spec.load(write_job(work, {"crawl": warm}, name="warmup")), progress=False)

    gc.collect()
    base_rss = psutil.Process().memory_info().rss
    reset = procmem.reset_peak()
    sampler = Sampler(args.interval)
    sampler.start()
    t0 = time.perf_counter()
    (outcome,) = run_job(job, progress=False)
    wall = time.perf_counter() - t0
    sampler.finish()
    driver_hwm = procmem.vm_hwm() or 0
    workers = sampler.worker_hwm | procmem.ray_workers_peak_rss()  # the latest reading of those still here
    ray.shutdown()

    # every row accounted for; read after the peaks were taken, and only the two columns needed
    tables = [pq.read_table(u, columns=["source_row", "status"]) for u in outcome.manifest.shard_urls()]
    source_rows = sorted(r for t in tables for r in t.column("source_row").to_pylist())
    assert source_rows == list(range(args.one)), f"{len(source_rows)} rows out of {args.one}, or not each once"
    status = Counter(s for t in tables for s in t.column("status").to_pylist())
    assert all(outcome.manifest.counts[k] == v for k, v in status.items()), (outcome.manifest.counts, status)
    return {
        "rows_in": args.one, "rows_out": len(source_rows), "shards": len(tables), "status": dict(status),
        "wall_s": round(wall, 2), "rows_per_s": round(args.one / wall, 1),
        "driver_base_rss": base_rss, "driver_peak_rss": driver_hwm if reset else max(driver_hwm, base_rss),
        "driver_growth": max(0, driver_hwm - base_rss) if reset else None,
        "worker_peaks": {str(k): v for k, v in sorted(workers.items())},
        "worker_peak": max(workers.values(), default=0),
        "workers_total": sampler.peak_workers_total, "tree_total": sampler.peak_tree_total,
        "peak_by_kind": dict(sampler.peak_by_kind), "max_workers_at_once": sampler.max_workers_at_once,
        "samples": sampler.samples, "trace": sampler.trace,
    }


# -- the driver of the benchmark -----------------------------------------------------------------------------

def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def drift(trace: list) -> str:
    """The tree's largest RSS sum in the second half of the samples over that in the first half."""
    half = len(trace) // 2
    return ratio(max(t[2] for t in trace[half:]), max(t[2] for t in trace[:half])) if half else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="URLs per run")
    parser.add_argument("--shard", type=int, default=1000, help="samples_per_shard")
    parser.add_argument("--threads", type=int, default=16, help="download threads per shard task")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of each local Ray (shard tasks: twice that)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--per-host-connections", type=int, default=0, help="0: no cap (one host serves all)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=int, default=200, help="rows crawled first, in the same Ray, not measured")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: crawl one size, here
    parser.add_argument("--list", help=argparse.SUPPRESS)
    parser.add_argument("--warm-list", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        Path(args.json).write_text(json.dumps(run_one(args)))
        return

    passed = ["--shard", str(args.shard), "--threads", str(args.threads), "--num-cpus", str(args.num_cpus),
              "--image-size", str(args.image_size), "--timeout", str(args.timeout), "--warmup", str(args.warmup),
              "--per-host-connections", str(args.per_host_connections), "--interval", str(args.interval)]
    results: dict[int, dict] = {}
    root = Path(tempfile.mkdtemp(prefix="clipline-soak-"))
    try:
        with JpegServer() as server:
            for n in args.sizes:
                work = root / f"n{n}"
                work.mkdir()
                write_url_list(work / "urls.parquet", f"{server.base}/img", n)
                write_url_list(work / "warm.parquet", f"{server.base}/warm", args.warmup)
                served = server.served
                cmd = [sys.executable, "-m", "tests.benchmarks.crawl_soak", "--one", str(n), "--list",
                       str(work / "urls.parquet"), "--warm-list", str(work / "warm.parquet"), "--work", str(work),
                       "--json", str(work / "result.json"), *passed]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, cwd=REPO)
                r = results[n] = json.loads((work / "result.json").read_text())
                r["process_s"] = round(time.perf_counter() - t0, 1)
                r["served"] = server.served - served - args.warmup
                print(f"{n} rows: {r['wall_s']:.1f} s in run_job ({r['process_s']:.1f} s with Ray's start), "
                      f"{r['served']} requests served (warm-up not counted), statuses {r['status']}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\ncrawl soak: shards of {args.shard} rows, {args.threads} threads, {args.num_cpus} CPUs; "
          "peak RSS in MiB")
    head = (f"{'rows in':>8} {'rows out':>8} {'shards':>6} {'wall s':>7} {'rows/s':>7} {'driver +':>8} "
            f"{'worker pk':>9} {'workers':>8} {'tree':>6} {'drift':>5}  rows out by status")
    print(head)
    print("-" * len(head))
    for n, r in results.items():
        by_status = ", ".join(f"{k} {v}" for k, v in sorted(r["status"].items(), key=lambda kv: -kv[1]))
        print(f"{n:>8} {r['rows_out']:>8} {r['shards']:>6} {r['wall_s']:>7.1f} {r['rows_per_s']:>7.0f} "
              f"{mib(r['driver_growth']):>8} {mib(r['worker_peak']):>9} {mib(r['workers_total']):>8} "
              f"{mib(r['tree_total']):>6} {drift(r['trace']):>5}  {by_status}")
    kinds = sorted({k for r in results.values() for k in r["peak_by_kind"]})
    print("\npeak RSS per kind of process, MiB (largest per-sample sum; workers: at most "
          + ", ".join(str(r["max_workers_at_once"]) for r in results.values()) + " at once)")
    print(f"{'rows in':>8} " + " ".join(f"{k:>11}" for k in kinds) + f" {'worker VmHWMs':>14}")
    for n, r in results.items():
        peaks = " ".join(mib(v) for v in r["worker_peaks"].values())
        print(f"{n:>8} " + " ".join(f"{mib(r['peak_by_kind'].get(k, 0)):>11}" for k in kinds) + f"  {peaks}")
    if len(results) > 1:
        (lo, a), (hi, b) = min(results.items()), max(results.items())
        print(f"\npeak({hi}) / peak({lo}), rows x{hi / lo:g}: worker peak {ratio(b['worker_peak'], a['worker_peak'])}, "
              f"workers total {ratio(b['workers_total'], a['workers_total'])}, "
              f"tree total {ratio(b['tree_total'], a['tree_total'])}, "
              f"driver peak {ratio(b['driver_peak_rss'], a['driver_peak_rss'])} "
              f"(growth {mib(a['driver_growth'])} -> {mib(b['driver_growth'])} MiB)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "crawl_soak.json"), "w") as f:
        internal = ("one", "list", "warm_list", "work", "json")
        json.dump({"config": {k: v for k, v in vars(args).items() if k not in internal},
                   "results": {str(n): r for n, r in results.items()}}, f, indent=2)


if __name__ == "__main__":  # each size re-runs this script (--one N) in a process, and a Ray, of its own
    main()
