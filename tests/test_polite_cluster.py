"""Per-host limits across a cluster: three Ray nodes on 127.0.0.1 (`ray.cluster_utils.Cluster`, 1 CPU each), a
crawl of several shards whose rows all go to two loopback hosts, judged from the hosts' side (tests/support/
hostload.py: requests in flight per Host header and arrival times).

One job, run as its own driver process as `clipline run` would: stage `task` with `per_host_scope: task`, the limits
as they held before, per shard task; then stage `job` with the same rows on two other hosts and `per_host_scope:
job` (the host token service). The service's cap and rate hold at every host for the whole crawl; the same crawl
with per-task limits exceeds both, as the three shard tasks running at once each bring their own. (`task` runs
first so that the start of the worker processes falls on it.)
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from pipelines import manifest, spec
from pipelines.runner import plan
from tests.conftest import REPO, crawl_stage, read_output, write_job
from tests.support.hostload import HostLoad

pytestmark = pytest.mark.slow

CAP, RATE = 2, 8.0  # per host: connections, request starts a second
ROWS, PER_SHARD = 18, 6  # rows per host; 6 shards of each stage's 36 rows, 3 rows of each host a shard
DRIVER = "import sys; from pipelines.cli import main; sys.exit(main(['run', '--no-progress', sys.argv[1]]))"


def excess(starts: list[float]) -> float:
    """The most requests that arrived in any stretch beyond what RATE allows over it: max over i < j of
    (j - i) - RATE * (t_j - t_i). Starts spaced exactly 1/RATE apart give 0; n at once give n - 1."""
    return max((j - i) - RATE * (b - a) for (i, a), (j, b) in itertools.combinations(enumerate(starts), 2))


def three_nodes(root: Path):
    from ray._private.services import wait_for_node
    from ray.cluster_utils import Cluster

    cluster = Cluster(shutdown_at_exit=True)
    for i in range(3):
        node = cluster.add_node(wait=False, node_ip_address="127.0.0.1", num_cpus=1, temp_dir=str(root),
                                **({"include_dashboard": False} if i == 0 else {}))
        wait_for_node(node.gcs_address, node.plasma_store_socket_name, 120)
    cluster.wait_for_nodes(timeout=120)
    return cluster


def test_per_host_limits_hold_for_the_whole_crawl_across_three_nodes(tmp_path):
    with HostLoad(hosts=4, hold=0.3) as load, tempfile.TemporaryDirectory(prefix="pc-", dir="/tmp") as root:
        polite, rude = load.hosts[:2], load.hosts[2:]

        def urls(hosts: list[str], name: str) -> str:
            rows = pd.DataFrame({"url": [f"http://{h}/img/{i}" for i in range(ROWS) for h in hosts],
                                 "caption": [f"picture {i} of {h}" for i in range(ROWS) for h in hosts]})
            rows.to_parquet(tmp_path / name)
            return str(tmp_path / name)

        limits = {"samples_per_shard": PER_SHARD, "threads": 4, "timeout": 5, "per_host_connections": CAP,
                  "per_host_rate": RATE}
        cluster = three_nodes(Path(root))  # a Ray session directory's socket paths must stay short: /tmp
        try:
            job = write_job(tmp_path, {  # stages run one after the other
                "task": crawl_stage(urls(rude, "rude.parquet"), **limits, per_host_scope="task"),
                "job": crawl_stage(urls(polite, "polite.parquet"), **limits, per_host_scope="job"),
            }, ray={"address": cluster.address})
            done = subprocess.run([sys.executable, "-c", DRIVER, str(job)], cwd=REPO, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
        finally:
            cluster.shutdown()
        with load.lock:
            arrivals = {h: list(t) for h, t in load.arrivals.items()}
            most = dict(load.max_in_flight)

    outputs = {r["stage"]: manifest.read(r["path"]) for r in plan(spec.load(job))}
    for m in outputs.values():
        assert m is not None and m.rows == 2 * ROWS and m.counts["success"] == 2 * ROWS, m and m.counts
        assert len(m.shards) == 2 * ROWS // PER_SHARD
        assert (read_output(m)["status"] == "success").all()

    # job-wide: at no host more than CAP requests at once, nor starts faster than RATE (but for the spread of
    # the grants' trips back to the workers), whichever of the shard tasks on the three nodes sent them
    for host in polite:
        assert most[host] == CAP, (host, most)  # RATE * hold = 2.4: the cap, not the rate, stops a third
        assert excess(arrivals[host]) <= 2, (host, excess(arrivals[host]))
    metrics = outputs["job"].metrics
    # every request the hosts saw (images and robots.txt) held a slot of the service; none gave up waiting
    assert metrics["host_slots_granted"] == sum(len(arrivals[h]) for h in polite)
    assert metrics["host_slots_timeouts"] == 0 and metrics["host_slots_waited"] > 0
    assert metrics["host_max_connections"] == CAP and metrics["host_leases_expired"] == 0
    # its callers: worker processes on all three nodes (each node's one CPU ran one of the first three shards)
    assert metrics["host_service_nodes"] == 3 and metrics["host_service_processes"] >= 3

    # per task, as before: the shard tasks in flight on the three nodes each hold their own CAP and RATE
    for host in rude:
        assert most[host] > CAP, (host, most)
        assert excess(arrivals[host]) > 2, (host, excess(arrivals[host]))
    assert "host_slots_granted" not in outputs["task"].metrics
