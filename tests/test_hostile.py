"""Hostile input (tests/support/hostile.py) against the crawl: every row accounted for, bounded in time and memory.

The fetch-level tests check the protocol faults one request at a time: a slow drip ends at the request's
deadline (3 x timeout) although no single read ever times out, header bombs fail at once as protocol
errors, redirect loops end, and the server sees the client stop reading endless bodies. The stage test
crawls the whole corpus on a local Ray instance.

Captions are stored byte-exact: NUL, escape sequences, CR, C0/C1 controls, bidi overrides, non-characters
and 100 KB of text all survive Parquet's UTF-8 strings, and the uid hashes them as they are. The crawl
does not sanitise them (a consumer that prints or tokenises captions decides what to do with them); only a
caption that is empty or all whitespace (str.strip: \\v, \\f and \\x1c-\\x1f included) is missing_caption.
"""

from __future__ import annotations

import time
from collections import Counter

import cv2
import numpy as np
import pandas as pd
import pytest

from pipelines import spec
from pipelines.contracts import uid
from pipelines.runner import run_job
from pipelines.stages.crawl.fetch import Fetcher
from pipelines.stages.crawl.netpolicy import AddressPolicy
from tests.conftest import crawl_stage, read_output, write_job
from tests.support import hostile
from tests.support.procmem import ray_workers_peak_rss

TIMEOUT = 1.0  # the crawl's read timeout: 4 x the drip interval, so no single read of a drip times out
DEADLINE = 3 * TIMEOUT  # what a request may take in all (Fetcher: 3 x timeout per attempt)
SLACK = 1.0  # scheduling and the last read's own wait, on a loaded machine


@pytest.fixture(scope="module")
def corpus() -> list[hostile.Case]:
    return hostile.corpus()


@pytest.fixture(scope="module")
def server(corpus):
    with hostile.HostileServer(corpus) as srv:
        yield srv


def fetcher(**kw) -> Fetcher:
    args = {"timeout": TIMEOUT, "max_bytes": 1 << 20, "max_redirects": 5,
            "policy": AddressPolicy.from_cidrs(["127.0.0.0/8"], []), "user_agent_token": "clipline",
            "contact": None, "disallowed": []} | kw
    return Fetcher(**args)


def timed_fetch(server, name: str, **kw):
    """The fetch, its seconds, and the server's record of this very response (None if it never finished)."""
    before = server.count(name)
    t0 = time.monotonic()
    got = fetcher(**kw).fetch(server.url(name))
    elapsed = time.monotonic() - t0
    return got, elapsed, (lambda: server.wait_served(name, timeout=10, after=before))


def test_decoded_formats_are_what_the_decoder_reads(corpus):
    """hostile.DECODED (which valid files must succeed) against the installed OpenCV."""
    valid = {c.name.removesuffix("_valid").upper() for c in corpus if c.group == "format" and c.name.endswith("_valid")}
    assert {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "ICO"} <= valid  # Pillow writes them all here
    reads = {fmt for fmt, data in hostile.writable_formats().items()
             if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None}
    assert reads == hostile.DECODED


@pytest.mark.parametrize("name", ["drip_status_line", "drip_headers", "drip_body", "continue_flood",
                                  "trailer_flood", "redirect_into_drip"])
def test_a_slow_or_endless_response_ends_at_the_deadline(server, name):
    got, elapsed, served = timed_fetch(server, name)
    assert (got.status, got.error_class) == ("failed_to_download", "timeout"), got.error_message
    assert "deadline" in got.error_message
    assert elapsed < DEADLINE + SLACK


@pytest.mark.parametrize(("name", "message"), [
    ("header_line_1mb", "more than 65536 bytes when reading header line"),
    ("headers_5000", "more than 100 headers"),
    ("status_line_endless", "more than 65536 bytes when reading status line"),
    ("redirect_location_1mb", "more than 65536 bytes when reading header line"),
    ("not_http", "BadStatusLine"),
    ("length_longer_than_body", "IncompleteRead"),  # read1 alone would hand the short body on as complete
])
def test_malformed_responses_are_protocol_errors_at_once(server, name, message):
    got, elapsed, served = timed_fetch(server, name)
    assert (got.status, got.error_class) == ("failed_to_download", "protocol")
    assert message in got.error_message and got.data is None
    assert elapsed < DEADLINE  # at once: not held until the deadline


def test_the_client_stops_reading_an_endless_status_line(server):
    got, _, served = timed_fetch(server, "status_line_endless")
    assert got.error_class == "protocol"
    served = served()
    assert served is not None and served.hung_up and served.sent < hostile.ENDLESS // 8


@pytest.mark.parametrize("name", ["endless_body", "endless_chunked"])
def test_an_endless_body_is_cut_at_the_byte_cap(server, name):
    got, elapsed, served = timed_fetch(server, name)
    assert (got.status, got.error_class) == ("failed_to_download", "too_large") and got.data is None
    assert elapsed < DEADLINE  # at once: not held until the deadline
    served = served()
    # what the server got out: the 1 MiB read plus what the loopback's socket buffers held
    assert served is not None and served.hung_up and served.sent < hostile.ENDLESS // 8


@pytest.mark.parametrize("name", ["loop_a", "loop_self"])
def test_a_redirect_loop_ends_as_a_redirect_error(server, name):
    got, elapsed, served = timed_fetch(server, name, max_redirects=20)  # urllib's loop detection, not the hop limit
    assert (got.status, got.error_class, got.http_status) == ("failed_to_download", "redirect", 302)
    assert "infinite loop" in got.error_message
    assert elapsed < DEADLINE  # at once: not held until the deadline


@pytest.mark.parametrize("name", ["redirect_endless_body", "redirect_drip_body"])
def test_a_redirects_body_is_not_read(server, name):
    got, elapsed, served = timed_fetch(server, name)
    assert got.status == "success" and got.data[:2] == b"\xff\xd8"
    assert elapsed < DEADLINE  # urllib would read the body to its end before following the redirect
    served = served()
    assert served is not None and served.hung_up and served.sent < hostile.ENDLESS // 8


def test_an_unusable_location_is_a_redirect_error_not_an_invalid_url(server):
    got, _, served = timed_fetch(server, "redirect_location_garbage")
    assert (got.status, got.error_class, got.http_status) == ("failed_to_download", "redirect", 302)
    assert "Invalid IPv6 URL" in got.error_message


@pytest.mark.slow
@pytest.mark.timeout(300)  # a hang detector: each row is bounded by 3 x timeout, 8 rows at a time per shard
def test_crawl_of_the_hostile_corpus_accounts_for_every_row(tmp_path, corpus, server, web, ray_local):
    rows = [{"url": server.url(c.name), "caption": f"hostile case {c.name}", "case": c.name} for c in corpus]
    control = server.url("jpeg_valid")
    rows += [{"url": control, "caption": text, "case": f"caption_{name}"} for name, text in hostile.CAPTIONS.items()]
    rows += [{"url": control, "caption": text, "case": f"blank_{name}"}
             for name, text in hostile.BLANK_CAPTIONS.items()]
    rows += [{"url": web.url("bomb", 1), "caption": "the demo's 20000 x 20000 PNG", "case": "demo_bomb"},
             {"url": web.url("img", 1), "caption": "a demo image", "case": "demo_img"}]
    frame = pd.DataFrame(rows)
    frame.to_parquet(tmp_path / "urls.parquet")
    max_bytes, image_size = 4 << 20, 32
    # no per-host connection cap: slow cases would hold the slots and the rest time out waiting for them
    stage = crawl_stage(str(tmp_path / "urls.parquet"), timeout=TIMEOUT, http_retries=0, per_host_connections=0,
                        max_bytes=max_bytes, image_size=image_size, samples_per_shard=40, threads=8)
    job = spec.load(write_job(tmp_path, {"crawl": stage}))
    t0 = time.monotonic()
    (outcome,) = run_job(job, progress=False)
    elapsed = time.monotonic() - t0
    out = read_output(outcome.manifest)

    assert outcome.state == "ran"
    assert sorted(out["source_row"]) == list(range(len(frame)))  # every row exactly once
    merged = frame.reset_index(names="source_row").merge(out, on="source_row", suffixes=("_in", ""))
    assert (merged["url"] == merged["url_in"]).all()
    assert (merged["caption"] == merged["caption_in"]).all()  # byte-exact, controls and 100 KB included
    assert all(u == uid(url, cap) for u, url, cap in zip(out["uid"], out["url"], out["caption"], strict=True))

    expected = {c.name: c for c in corpus}
    wrong = []
    for r in merged.itertuples():
        if r.case in expected:
            ok = expected[r.case].expects(r.status, r.error_class)
        elif r.case.startswith("caption_") or r.case == "demo_img":
            ok = (r.status, r.error_class) == ("success", None)
        elif r.case.startswith("blank_"):
            ok = (r.status, r.error_class) == ("invalid", "missing_caption")
        else:  # demo_bomb
            ok = (r.status, r.error_class) == ("failed_to_resize", "too_many_pixels")
        if not ok:
            wrong.append((r.case, r.status, r.error_class, r.error_message))
    assert not wrong, wrong

    failed = out[out["status"] != "success"]
    assert failed["error_message"].notna().all() and (failed["error_message"].str.len() > 0).all()
    assert failed["image"].isna().all()
    ok = out[out["status"] == "success"]
    assert len(ok) == sum(c.status == "success" for c in corpus) + len(hostile.CAPTIONS) + 1
    assert (ok["image"].str.len() <= max_bytes).all()
    assert ((ok["width"] <= image_size) & (ok["height"] <= image_size)).all()
    assert (ok["original_width"] * ok["original_height"] <= 89_478_485).all()  # the default max_pixels
    counts = Counter(out["status"])
    assert {k: outcome.manifest.counts[k] for k in counts} == dict(counts)

    # every endless response was cut off by its client before its end; those whose bytes a client would keep
    # (a body, a line) soon after the byte cap or the line limit, the floods it discards at the deadline
    for name in ("endless_body", "endless_chunked", "redirect_endless_body", "status_line_endless",
                 "continue_flood", "trailer_flood"):
        served = [s for s in server.served if s.name == name]
        bound = hostile.ENDLESS if name.endswith("_flood") else hostile.ENDLESS // 8
        assert served and all(s.hung_up and s.sent < bound for s in served), (name, served)
    # the session's Ray workers (this crawl's among them): the bound is loose, a worker imports cv2, Pillow,
    # pyarrow and the pipeline (~0.7 GB); a hostile image that got decoded whole would pass it
    peaks = ray_workers_peak_rss()
    assert peaks, "no Ray worker process found under this one"
    assert max(peaks.values()) < 2 << 30, peaks
    print(f"\nhostile crawl: {len(out)} rows in {elapsed:.1f} s; {dict(counts)}; "
          f"Ray workers' peak RSS (MiB): {sorted(v >> 20 for v in peaks.values())}")
