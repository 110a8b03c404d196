"""A real S3-speaking server on 127.0.0.1 for the tests: moto's server mode, in a process of its own.

Clients find it the way they find any S3-compatible store: through the environment (`AWS_ENDPOINT_URL`,
which botocore/s3fs and pyarrow's S3 filesystem both honour, and credentials in `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY`), never through the job spec.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.net import answers, die_with_parent, free_port, wait_until


class S3Server:
    """`moto_server` on 127.0.0.1:<free port>; `env` is what a client (and every Ray worker) needs."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / "moto_server.log"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "clipline-test",
                    "AWS_SECRET_ACCESS_KEY": "clipline-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        moto = Path(sys.executable).with_name("moto_server")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env}, preexec_fn=die_with_parent)
        wait_until(lambda: answers("127.0.0.1", self.port), 60, f"moto_server on {self.endpoint} (log {self.log})",
                   alive=lambda: self.proc.poll() is None)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self):
        """A boto3 S3 client on this server (for test set-up and checks)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def bucket(self, name: str) -> str:
        """Create a bucket (idempotent); its s3:// URL."""
        c = self.client()
        if name not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
            c.create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under a prefix, listed by the server itself."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)
