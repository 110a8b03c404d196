"""`clipline`: validate, run, status, submit, logs, demo, ui, report, explore, replay, takedown, schemas and render."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from pipelines import __version__

REPO = Path(__file__).resolve().parents[1]
EXIT_STAGE_FAILED, EXIT_BAD_SPEC, EXIT_UNAVAILABLE = 1, 2, 3  # 3: tracking server or storage unusable at start


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job spec YAML, e.g. jobs/demo.yaml")
    p.add_argument("--storage", help="override the job's storage URL")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, typed by the schema: --set stages.crawl.with.image_size=32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"clipline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's and the libraries' logs on the console too (without it they "
                             "go to the run's log file only)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a job spec against the schema; run nothing")
    _job_args(p)

    p = sub.add_parser("run", help="run a job's stages on Ray; completed stages are cache hits")
    _job_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_", metavar="STAGE", help="run STAGE and everything downstream of it")
    group.add_argument("--until", metavar="STAGE", help="run STAGE and everything it needs")
    group.add_argument("--only", action="append", default=[], metavar="STAGE", help="run only STAGE (repeatable)")
    p.add_argument("--force", action="store_true", help="recompute the selected stages even if cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("status", help="each stage: cached, incomplete or missing, with row counts; or, with "
                                      "--address, a submission's state on a cluster")
    _job_args(p)
    p.add_argument("--address", help="Ray dashboard URL (http://HEAD:8265): JOB is then a submission id")

    p = sub.add_parser("submit", help="run a job on a Ray cluster through the Ray Jobs API")
    _job_args(p)
    p.add_argument("--address", help="Ray dashboard URL, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS "
                                     "or RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="follow the logs and exit with the job's exit code")
    p.add_argument("--deps", choices=["installed", "pip"], default="installed",
                   help="installed: the cluster's Python has clipline's dependencies (cluster/ sets it up); "
                        "pip: ship the pinned dependencies in the runtime env (Ray builds a virtualenv per job)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job, e.g. MLFLOW_TRACKING_URI=...; not for secrets: Ray "
                        "shows a job's runtime env on its dashboard")
    p.add_argument("--submission-id", help="default: clipline-<job>-<time>-<random>")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver process")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_", metavar="STAGE")
    group.add_argument("--until", metavar="STAGE")
    group.add_argument("--only", action="append", default=[], metavar="STAGE")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("logs", help="a submitted job's logs")
    p.add_argument("submission_id")
    p.add_argument("--address", help="Ray dashboard URL, e.g. http://HEAD:8265")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")

    p = sub.add_parser("demo", help="serve a synthetic web on 127.0.0.1 and run jobs/demo.yaml against it")
    p.add_argument("--storage", default="./clipline-data", help="where outputs and the MLflow store go (the URL "
                                                               "list: STORAGE/demo-web/urls.parquet)")
    p.add_argument("--serve-only", action="store_true",
                   help="write the URL list and serve the web until SIGTERM or Ctrl-C, running no job (for "
                        "`clipline submit jobs/demo.yaml --storage STORAGE` to a cluster on this machine)")
    p.add_argument("--port", type=int, default=8736, help="port of the synthetic web on 127.0.0.1")
    p.add_argument("--images", type=int, default=3000, help="images in the synthetic web")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("ui", help="serve the MLflow UI for a job's store on 127.0.0.1 (a tracking server's URI: "
                                  "print the address of the server's own UI)")
    p.add_argument("job", nargs="?", default=str(REPO / "jobs" / "demo.yaml"))
    p.add_argument("--storage")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1,
                   help="server processes (MLflow's default of 4 takes ~30 s to start on 2 cores)")

    p = sub.add_parser("report", help="write a job run's HTML report (availability, funnel, images, curves, "
                                      "evaluation) and log "
                                      "it to MLflow")
    _job_args(p)
    p.add_argument("--run-id", help="the job run (MLflow parent run) to report on; default: the latest")
    p.add_argument("-o", "--output", metavar="DIR", help="directory (any fsspec URL) for report-<run id>.html; "
                                                        "default: {storage}/{job}/_reports")
    p.add_argument("--images", type=int, default=48, help="at most this many kept and dropped images in the grid")
    p.add_argument("--hosts", type=int, default=20, help="hosts listed by name in each crawl's availability table "
                                                         "(the most rows first; the rest on one line)")

    p = sub.add_parser("explore", help="serve a page on 127.0.0.1 to search a curated dataset version by text and "
                                       "see why each row was kept or dropped")
    _job_args(p)
    p.add_argument("--stage", help="the curate stage whose current output to explore (default: the job's last)")
    p.add_argument("--model", help="what embeds queries and images: a train or embed stage of the job, an MLflow "
                                   "models:/ or runs:/ URI, or an open_clip architecture (with --checkpoint); "
                                   "default: the dataset's scoring model, else the model trained on it")
    p.add_argument("--checkpoint", help="weights for --model ARCH (.safetensors or a state dict)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8737)
    p.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="refuse a version of more rows (everything is held in memory; default 5,000,000)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("replay", help="send the MLflow records a job wrote to its local spool while the tracking "
                                      "server was down")
    p.add_argument("job", nargs="?", help="job spec YAML: its storage's spool goes to its tracking URI")
    p.add_argument("--storage", help="override the job's storage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--spool", metavar="DIR", help="the spool directory (default: the job's)")
    p.add_argument("--uri", help="tracking URI to send to (default: the job's)")

    p = sub.add_parser("takedown", help="write new versions of a job's datasets without the listed rows and tag the "
                                        "MLflow runs and model versions that used them")
    _job_args(p)
    p.add_argument("--list", dest="takedown_list", required=True, metavar="FILE",
                   help="one entry a line: a URL, a sha256 (64 hex) or a pHash (16 hex); # comments")
    p.add_argument("--max-distance", type=int, default=0, metavar="N", help="pHash match within N bits (default 0)")
    p.add_argument("--dry-run", action="store_true", help="say what would be taken down and tagged; write nothing")

    p = sub.add_parser("schemas", help="write or check schemas/*.json against the code that defines them")
    p.add_argument("--check", action="store_true", help="exit 1 if a file differs from the code")

    p = sub.add_parser("render", help="write deployment manifests for a job spec")
    targets = p.add_subparsers(dest="target", required=True)
    p = targets.add_parser("kuberay", help="a ConfigMap with the spec and a KubeRay RayJob that runs it")
    _job_args(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--image", help="container image with clipline installed (cluster/kuberay/Dockerfile)")
    p.add_argument("--namespace", help="metadata.namespace of the manifests (default: kubectl's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.offline import keep_local

    keep_local()  # before anything imports ray or mlflow: nothing goes off the machine unasked
    args = build_parser().parse_args(argv)
    from pipelines import console

    console.setup(verbose=args.verbose)
    from pipelines.spec import SpecError

    try:
        return _COMMANDS[args.command](args)
    except SpecError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC


def cmd_validate(args: argparse.Namespace) -> int:
    from pipelines import spec
    from pipelines.preflight import check

    job = spec.load(args.job, args.overrides, args.storage)
    check(job)
    print(f"{args.job}: valid job {job.name!r}: " + " -> ".join(f"{n} ({s.uses})" for n, s in job.stages.items()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import time

    from pipelines import console, spec
    from pipelines.runner import Selection, StageFailed, run_job
    from pipelines.spool import TrackingUnavailable
    from pipelines.storage import StorageError

    if os.environ.get("CLIPLINE_SUBMISSION_ID"):  # a submitted driver: say which Python the cluster gave it
        from pipelines.submit import driver_python

        logging.getLogger("clipline").info(driver_python())
    from pipelines.preflight import check

    job = spec.load(args.job, args.overrides, args.storage)
    select = Selection(from_=args.from_, until=args.until, only=args.only, force=args.force)
    try:
        chosen = set(select.stages(job))
    except ValueError as exc:  # an unknown --from/--until/--only stage: exit 2 before anything starts
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    check(job, chosen.__contains__)  # the selected stages' files: an unselected stage's input may be gone
    console.open_log(job.name)
    t0 = time.perf_counter()
    try:
        with console.session(progress=not args.no_progress):
            outcomes = run_job(job, select, progress=not args.no_progress)
    except StageFailed as exc:
        where = f" (details: {console.log_path()})" if console.log_path() else ""
        print(f"clipline: {exc}{where}\nclipline: completed stages are kept; run the same command again to "
              "resume.", file=sys.stderr)
        return EXIT_STAGE_FAILED
    except (TrackingUnavailable, StorageError) as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ValueError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    print("\n".join(console.summary_lines(outcomes, time.perf_counter() - t0)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines import spec
    from pipelines.runner import StageFailed, plan

    if args.address:
        return _submission_status(args)
    job = spec.load(args.job, args.overrides, args.storage)
    try:
        rows = plan(job)
    except StageFailed as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    for row in rows:
        counts = ", ".join(f"{k}={v}" for k, v in row.get("counts", {}).items() if v and not k.startswith("error_"))
        size = f"{row['rows']} rows" if row["rows"] is not None else "-"
        print(f"{row['stage']:<16} {row['state']:<13} {size:<12} {counts}")
        if row["path"]:
            print(f"{'':<16} {row['path']}")
    return 0


def _submission_status(args: argparse.Namespace) -> int:
    from pipelines import submit

    try:
        d = submit.describe(submit.client(args.address), args.job)
    except submit.SubmitError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    for key in ("submission_id", "status", "message", "start", "end", "driver_exit_code", "entrypoint"):
        print(f"{key:<17} {d[key] if d[key] is not None else '-'}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines import spec, submit

    job = spec.load(args.job, args.overrides, args.storage)  # a bad spec fails here, before the cluster is asked
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"clipline: --env {item!r}: expected KEY=VALUE", file=sys.stderr)
            return EXIT_BAD_SPEC
        env[key] = value
    run_args = (["--from", args.from_] if args.from_ else []) + (["--until", args.until] if args.until else [])
    run_args += [w for s in args.only for w in ("--only", s)] + (["--force"] if args.force else [])
    try:
        sid = submit.submit(job, Path(args.job), args.address, overrides=args.overrides, storage_url=args.storage,
                            run_args=run_args, deps=args.deps, env=env, submission_id=args.submission_id,
                            entrypoint_num_cpus=args.entrypoint_num_cpus, verbose=args.verbose)
        jobs = submit.client(args.address)
        print(sid)
        print(f"clipline: submitted {job.name!r} to {jobs.get_address()} as {sid}; its driver runs in the cluster's "
              f"`python` (the first on the head's PATH{'' if args.deps == 'installed' else ', in a virtualenv'}"
              f"); `clipline logs {sid} --address {jobs.get_address()}` follows it", file=sys.stderr)
        if not args.wait:
            return 0
        d = submit.follow(jobs, sid)
    except ValueError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except submit.SubmitError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    print(f"clipline: {sid} {d['status']}: {d['message']}", file=sys.stderr)
    return submit.exit_code(d)


def cmd_logs(args: argparse.Namespace) -> int:
    from pipelines import submit

    try:
        jobs = submit.client(args.address)
        if args.follow:
            return submit.exit_code(submit.follow(jobs, args.submission_id))
        submit.describe(jobs, args.submission_id)  # an unknown id is an error that names it
        sys.stdout.write(jobs.get_job_logs(args.submission_id))
    except submit.SubmitError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo.run import run_demo, serve_web

    if args.serve_only:
        if args.overrides:
            print("clipline: demo --serve-only runs no job: --set has nothing to change", file=sys.stderr)
            return EXIT_BAD_SPEC
        return serve_web(args.storage, args.port, args.images)
    return run_demo(storage=args.storage, port=args.port, images=args.images, overrides=args.overrides,
                    progress=not args.no_progress)


def cmd_ui(args: argparse.Namespace) -> int:
    from pipelines import spec
    from pipelines.tracking import resolve_uri, sqlite_artifact_root

    job = spec.load(args.job, [], args.storage)
    uri = resolve_uri(job.tracking_uri, job.storage)
    if uri.split("://", 1)[0].lower() in ("http", "https"):
        # a tracking server serves its own UI beside the REST API the job logs to; a local `mlflow ui` could not
        # open that store anyway (a database that only the server holds the credentials of)
        from pipelines.redact import scrub

        print(f"clipline: job {job.name} logs to the tracking server {scrub(uri)}, which serves the MLflow UI; "
              f"open it (experiment {job.experiment!r}) instead of starting one here", file=sys.stderr)
        print(scrub(uri).rstrip("/") + "/")
        return 0
    if (busy := _port_taken(args.host, args.port)) is not None:
        print(f"clipline: cannot serve the MLflow UI on {args.host}:{args.port}: {busy}; pick another --port",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", str(args.workers)]
    if (artifacts := sqlite_artifact_root(uri)) is not None:
        cmd += ["--default-artifact-root", artifacts]
    print(f"clipline: MLflow UI for {uri} at http://{args.host}:{args.port}", file=sys.stderr)
    os.execv(sys.executable, cmd)
    return 0  # not reached


def _port_taken(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (in use, not this machine's address), or None if it can: checked
    before exec'ing MLflow, whose server would otherwise fail after start-up while this command exited 0."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as MLflow's server: a listener refuses it,
        try:  # a closed connection's TIME_WAIT does not
            s.bind(address)
        except OSError as exc:
            return "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return None


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines import spec
    from pipelines.report import ReportError, build_report

    job = spec.load(args.job, args.overrides, args.storage)
    try:
        out, _ = build_report(job, args.run_id, args.output, args.images, args.hosts)
    except ReportError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    print(out)  # build_report logs the run and the MLflow artifact
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    import signal

    from pipelines import spec
    from pipelines.explore import MAX_ROWS, ExploreError, Explorer, open_version, resolve_model
    from pipelines.explore.server import make_server
    from pipelines.tracking import resolve_uri

    job = spec.load(args.job, args.overrides, args.storage)
    if (busy := _port_taken(args.host, args.port)) is not None:
        print(f"clipline: cannot serve the explorer on {args.host}:{args.port}: {busy}; pick another --port",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    # a models:/ or runs:/ model is looked up where the job logs
    os.environ.setdefault("MLFLOW_TRACKING_URI", resolve_uri(job.tracking_uri, job.storage))
    try:
        version = open_version(job, args.stage)
        ref, why = resolve_model(version, args.model, args.checkpoint)
        print(f"clipline: explore {job.name}/{version.stage}@{version.curate.fingerprint[:12]}: queries and images "
              f"embedded by {why}", file=sys.stderr)
        explorer = Explorer(version, ref, why, progress=not args.no_progress, max_rows=args.max_rows or MAX_ROWS)
    except ExploreError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        server = make_server(explorer, args.host, args.port)
    except OSError as exc:  # taken while the index was built, or an address this machine does not have
        print(f"clipline: cannot serve the explorer on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"clipline: explore listens on {args.host}: anyone who can reach it can read this dataset's rows, "
              "captions and URLs (it has no authentication)", file=sys.stderr)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    info = explorer.info()
    print(f"clipline: exploring {info['rows']:,} rows ({info['kept']:,} kept, {info['embedded']:,} embedded) at "
          f"http://{args.host}:{server.server_address[1]}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from pipelines import spec, spool
    from pipelines.tracking import resolve_uri

    if args.job is None and not (args.spool and args.uri):
        print("clipline: replay needs a job spec, or both --spool and --uri", file=sys.stderr)
        return EXIT_BAD_SPEC
    if args.job:
        job = spec.load(args.job, args.overrides, args.storage)
        directory = args.spool or spool.default_dir(job.storage)
        uri = args.uri or resolve_uri(job.tracking_uri, job.storage)
    else:  # both given (checked above)
        directory, uri = args.spool, args.uri
    waiting = spool.pending(directory)
    if not waiting:
        print(f"{directory}: nothing to replay")
        return 0
    from mlflow.exceptions import MlflowException

    try:
        counts = spool.replay(directory, uri)
    except spool.TrackingUnavailable as exc:
        print(f"clipline: {exc}; the spool is kept", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (MlflowException, ValueError, OSError) as exc:  # the server lost or refusing a record mid-replay
        print(f"clipline: replay of {directory} stopped: {type(exc).__name__}: {str(exc)[:1000]}; what was sent "
              f"is recorded, the rest is kept: run it again", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(f"{directory} -> {uri}: sent {sum(counts.values())} records from {len(waiting)} files (" +
          ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) + ")")
    return 0


def cmd_takedown(args: argparse.Namespace) -> int:
    from pipelines import spec, takedown
    from pipelines.spool import TrackingUnavailable
    from pipelines.storage import StorageError

    job = spec.load(args.job, args.overrides, args.storage)
    try:
        result = takedown.takedown(job, takedown.read_list(args.takedown_list), args.max_distance, args.dry_run)
    except (TrackingUnavailable, StorageError) as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ValueError as exc:  # TakedownError: the list's FILE:LINE, or an output that cannot be taken down
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    print("\n".join(takedown.report_lines(result)))
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from pipelines.schemas import check, write

    if args.check:
        stale = check(REPO / "schemas")
        for name in stale:
            print(f"schemas/{name} differs from the code; run `clipline schemas` to rewrite it", file=sys.stderr)
        return 1 if stale else 0
    for name in write(REPO / "schemas"):
        print(f"wrote schemas/{name}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from pipelines import kuberay

    out = kuberay.render(args.job, args.overrides, args.storage, image=args.image or kuberay.DEFAULT_IMAGE,
                         namespace=args.namespace)
    for line in out.warnings:
        print(f"clipline: warning: {line}", file=sys.stderr)
    if args.output:
        try:
            Path(args.output).write_text(out.to_yaml())
        except OSError as exc:
            print(f"clipline: -o {args.output}: cannot write: {exc.strerror}", file=sys.stderr)
            return EXIT_BAD_SPEC
        print(f"clipline: wrote {args.output}: ConfigMap {out.configmap['metadata']['name']}, "
              f"RayJob {out.rayjob['metadata']['name']}", file=sys.stderr)
    else:
        sys.stdout.write(out.to_yaml())
    return 0


_COMMANDS = {"validate": cmd_validate, "run": cmd_run, "status": cmd_status, "submit": cmd_submit, "logs": cmd_logs,
             "demo": cmd_demo, "ui": cmd_ui, "report": cmd_report, "explore": cmd_explore, "replay": cmd_replay,
             "takedown": cmd_takedown, "schemas": cmd_schemas, "render": cmd_render}

if __name__ == "__main__":  # `python -m pipelines.cli`: how a submitted job starts on a cluster
    try:
        raise SystemExit(main())
    except ModuleNotFoundError as exc:
        # the driver's Python is the cluster's first `python` on PATH: name it and what it lacks
        print(f"clipline: the Python at {sys.executable} has no module {exc.name!r}: run clipline in the Python "
              "it is installed in (on a cluster: put that Python first on the nodes' PATH, or submit with "
              "--deps pip)", file=sys.stderr)
        raise SystemExit(EXIT_UNAVAILABLE) from None
