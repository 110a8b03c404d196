"""`clipline`: validate, run, status, demo, ui and schemas."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipelines import __version__

REPO = Path(__file__).resolve().parents[1]
EXIT_STAGE_FAILED, EXIT_BAD_SPEC = 1, 2


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job spec YAML, e.g. jobs/demo.yaml")
    p.add_argument("--storage", help="override the job's storage URL")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, typed by the schema: --set stages.crawl.with.image_size=32")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (it may be replaced after start-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"clipline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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

    p = sub.add_parser("status", help="each stage: cached, incomplete or missing, with row counts")
    _job_args(p)

    p = sub.add_parser("demo", help="serve a synthetic web on 127.0.0.1 and run jobs/demo.yaml against it")
    p.add_argument("--storage", default="./clipline-data", help="where outputs and the MLflow store go")
    p.add_argument("--port", type=int, default=8736, help="port of the synthetic web on 127.0.0.1")
    p.add_argument("--images", type=int, default=3000, help="images in the synthetic web")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("ui", help="serve the MLflow UI for a job's store on 127.0.0.1")
    p.add_argument("job", nargs="?", default=str(REPO / "jobs" / "demo.yaml"))
    p.add_argument("--storage")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)

    p = sub.add_parser("schemas", help="write or check schemas/*.json against the code that defines them")
    p.add_argument("--check", action="store_true", help="exit 1 if a file differs from the code")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("clipline")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("clipline: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from pipelines.spec import SpecError

    try:
        return _COMMANDS[args.command](args)
    except SpecError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC


def cmd_validate(args: argparse.Namespace) -> int:
    from pipelines import spec

    job = spec.load(args.job, args.overrides, args.storage)
    print(f"{args.job}: valid job {job.name!r}: " + " -> ".join(f"{n} ({s.uses})" for n, s in job.stages.items()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines import spec
    from pipelines.runner import Selection, StageFailed, run_job

    job = spec.load(args.job, args.overrides, args.storage)
    select = Selection(from_=args.from_, until=args.until, only=args.only, force=args.force)
    try:
        outcomes = run_job(job, select, progress=not args.no_progress)
    except StageFailed as exc:
        print(f"clipline: {exc}\nclipline: completed stages are kept; run the same command again to resume.",
              file=sys.stderr)
        return EXIT_STAGE_FAILED
    except ValueError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    for o in outcomes:
        rows = f"{o.manifest.rows} rows" if o.manifest else "-"
        print(f"{o.stage:<16} {o.state:<13} {rows:<14} {o.manifest.location if o.manifest else ''}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines import spec
    from pipelines.runner import StageFailed, plan

    job = spec.load(args.job, args.overrides, args.storage)
    try:
        rows = plan(job)
    except StageFailed as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    for row in rows:
        counts = ", ".join(f"{k}={v}" for k, v in row.get("counts", {}).items() if v and not k.startswith("error_"))
        rows = f"{row['rows']} rows" if row["rows"] is not None else "-"
        print(f"{row['stage']:<16} {row['state']:<13} {rows:<12} {counts}")
        if row["path"]:
            print(f"{'':<16} {row['path']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo.run import run_demo

    return run_demo(storage=args.storage, port=args.port, images=args.images, overrides=args.overrides,
                    progress=not args.no_progress)


def cmd_ui(args: argparse.Namespace) -> int:
    from pipelines import spec, storage
    from pipelines.tracking import resolve_uri

    job = spec.load(args.job, [], args.storage)
    uri = resolve_uri(job.tracking_uri, job.storage)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    if storage.is_local(job.storage):
        cmd += ["--default-artifact-root", Path(job.storage, "mlartifacts").resolve().as_uri()]
    print(f"clipline: MLflow UI for {uri} at http://{args.host}:{args.port}", file=sys.stderr)
    os.execv(sys.executable, cmd)
    return 0  # not reached


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


_COMMANDS = {"validate": cmd_validate, "run": cmd_run, "status": cmd_status, "demo": cmd_demo, "ui": cmd_ui,
             "schemas": cmd_schemas}

if __name__ == "__main__":
    raise SystemExit(main())
