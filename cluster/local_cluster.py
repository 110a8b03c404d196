"""A multi-node Ray cluster on this machine, every server on 127.0.0.1, held until SIGTERM or SIGINT.

    .venv/bin/python cluster/local_cluster.py --state-dir DIR [--workers N] [--port P]
        [--dashboard-port D] [--client-port C] [--cpus-per-node K] [--timeout S]

cluster/local.sh runs this in the background; run it by hand to watch a cluster in the foreground.

Nodes are started with `ray.cluster_utils.Cluster` (what Ray's own tests use for several raylets on one
machine), not `ray start`: the CLI replaces a loopback node address with the machine's own
(`ray._private.services.resolve_ip_for_localhost`) and, with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which
keeps a node on loopback), refuses `--address`. `Cluster` builds each node from RayParams with
node_ip_address 127.0.0.1, so the GCS, raylets, object managers, agents, the dashboard and the Ray client
server all bind 127.0.0.1.

Once every node is alive, DIR/state.json holds the address, the dashboard URL, the auth mode and this
process's id, and the same lines are printed (KEY=VALUE). Ray's files (sessions, logs, the address file a
bare `ray.init()` looks for) live under DIR/ray, so nothing elsewhere on this machine joins by accident.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Ray's session directories hold Unix sockets, whose paths may not exceed 107 bytes;
# ".../ray/session_2026-12-01_21-24-54_471731_1234567/sockets/plasma_store" adds 68 bytes to DIR
MAX_STATE_DIR = 39
STATE_FILE = "state.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    def count(minimum: int):
        def parse(text: str) -> int:
            if not text.isdigit() or int(text) < minimum:
                raise argparse.ArgumentTypeError(f"expects a whole number >= {minimum}, got '{text}'")
            return int(text)
        return parse

    p = argparse.ArgumentParser(prog="cluster/local_cluster.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--state-dir", required=True, type=Path, help="state file, logs and Ray's session files")
    p.add_argument("--workers", type=count(0), default=2, help="worker nodes besides the head (2)")
    p.add_argument("--port", type=count(1), default=6380, help="GCS port: the cluster address (6380)")
    p.add_argument("--dashboard-port", type=count(1), default=8266, help="dashboard and Jobs API (8266)")
    p.add_argument("--client-port", type=count(0), default=0, help="Ray client server (ray://) port; 0: none")
    p.add_argument("--cpus-per-node", type=count(1), default=1, help="logical CPUs of each node (1)")
    p.add_argument("--timeout", type=count(1), default=120, help="seconds each node may take to join (120)")
    args = p.parse_args(argv)
    if len(str(args.state_dir.absolute())) > MAX_STATE_DIR:
        p.error(f"--state-dir {args.state_dir} is too long: Ray's socket paths under it would pass 107 bytes; "
                f"use a shorter one (at most {MAX_STATE_DIR} characters)")
    return args


def configure_environment(state_dir: Path) -> None:
    """What Ray reads at import or passes on to the processes it starts; call before `import ray`."""
    from pipelines.offline import keep_local

    keep_local(ray_head=True)  # no usage reports, no cloud metadata probe, from any node or job driver
    # 0 keeps ray.util.get_node_ip_address() on 127.0.0.1 (1 answers the machine's own address) for these
    # nodes, their workers and the drivers of submitted jobs, all of which inherit this environment
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # this interpreter's bin dir first on PATH: a submitted job's entrypoint (`python -m pipelines.cli ...`)
    # is a shell command the head runs with the nodes' environment, so it gets this Python, not the
    # submitter's shell's first `python`
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # the address file a bare `ray.init()` reads (ray_current_cluster) follows RAY_TMPDIR: keep it in here
    os.environ["RAY_TMPDIR"] = str(state_dir)
    os.environ.pop("RAY_ADDRESS", None)
    # token authentication unless the caller says otherwise, as `ray.init()` does for a new cluster;
    # the token is ~/.ray/auth_token (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH), where drivers find it
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def start(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The cluster, every node alive, and what a driver needs to reach it."""
    import ray
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._private.services import wait_for_node
    from ray.cluster_utils import Cluster

    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    temp_dir = str(args.state_dir / "ray")
    node = {"node_ip_address": "127.0.0.1", "num_cpus": args.cpus_per_node, "temp_dir": temp_dir}
    # shutdown_at_exit: the nodes' processes end with this one (an atexit hook, and on Linux the parent-death
    # signal Ray sets on its children); the agents, children of the raylets, may linger, which stop handles
    cluster = Cluster(shutdown_at_exit=True)
    try:
        # wait=False, then our own bound: add_node's is a fixed 30 s, too short for a busy machine
        head = cluster.add_node(wait=False, **node, gcs_server_port=args.port, include_dashboard=True,
                                dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port,
                                ray_client_server_port=args.client_port or None,
                                # a random agent port: a fixed 52365 would clash with any other Ray here
                                dashboard_agent_listen_port=None)
        wait_for_node(head.gcs_address, head.plasma_store_socket_name, args.timeout)
        for i in range(1, args.workers + 1):
            # a runtime_resources directory of each node's own, as on separate machines: the nodes share one
            # session directory, and a node's runtime env agent that meets a job's working_dir for the first
            # time deletes and unpacks it again, under the feet of the driver running in the head's copy
            # (the FileNotFoundError from os.getcwd() that failed a fresh cluster's first submission)
            worker = cluster.add_node(wait=False, **node, runtime_env_dir_name=f"runtime_resources_node{i}")
            wait_for_node(worker.gcs_address, worker.plasma_store_socket_name, args.timeout)
        cluster.wait_for_nodes(timeout=args.timeout)
    except BaseException:
        cluster.shutdown()
        raise
    if not head.webui_url:
        cluster.shutdown()
        raise RuntimeError(f"the dashboard did not start on 127.0.0.1:{args.dashboard_port}; see "
                           f"{temp_dir}/session_latest/logs/dashboard.log")
    state = {"pid": os.getpid(), "address": head.gcs_address, "dashboard": f"http://{head.webui_url}",
             "auth_mode": os.environ["RAY_AUTH_MODE"], "nodes": 1 + args.workers,
             "cpus_per_node": args.cpus_per_node, "client": f"ray://127.0.0.1:{args.client_port}"
             if args.client_port else None, "ray_dir": temp_dir, "ray": ray.__version__,
             "python": sys.executable}  # the Python of the nodes and of submitted drivers (PATH, above)
    return cluster, state


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    state_file = args.state_dir / STATE_FILE
    state_file.unlink(missing_ok=True)
    configure_environment(args.state_dir)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # Ctrl-C while starting: finish, then shut down
    # while starting, SIGTERM is Ray's: each Node installs a handler that ends its own processes and exits
    # (SystemExit), and start() then shuts down the nodes already up
    cluster, state = start(args)
    for sig in (signal.SIGTERM, signal.SIGINT):  # from now on: every node, in order, then exit 0
        signal.signal(sig, lambda *_: stop.set())
    try:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(state_file)  # whole or absent: local.sh polls for it
        print(f"RAY_ADDRESS={state['address']}")
        print(f"RAY_AUTH_MODE={state['auth_mode']}")
        print(f"DASHBOARD={state['dashboard']}")
        print(f"local_cluster: {state['nodes']} nodes ({args.cpus_per_node} CPU each) up, pid {os.getpid()}",
              flush=True)
        while not stop.wait(1.0):
            if not cluster.remaining_processes_alive():
                print("local_cluster: a Ray process of the cluster exited; shutting down", file=sys.stderr)
                return 1
        return 0
    finally:
        state_file.unlink(missing_ok=True)
        started = time.monotonic()
        cluster.shutdown()
        print(f"local_cluster: stopped {state['nodes']} nodes in {time.monotonic() - started:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
