"""The embed stage: a dataset version's image and text embeddings (float16, unit norm) keyed by uid, written once per
(dataset, model) through the runner's cache.  One job run (a test-only source stage copying crafted crawled shards,
then `embed` with a tiny seeded open_clip model) is shared by the tests that read its output."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import spec
from pipelines.contracts import EMBEDDINGS
from pipelines.runner import plan, run_job
from tests.conftest import write_job

ARCH, SEED = "clip-tiny", 5
EPS = 5e-4  # a random model puts every image near one direction; copies with pixel noise are above 0.99998
SOURCE = "tests.support.sources:CrawledFiles"


def crawled(tmp_path) -> list[str]:
    """Two crawled shards: images that decode, a row not downloaded, one opted out, an image that does not decode,
    a successful row without image bytes and one without a caption."""
    from tests.test_curate import GOOD, row, smooth_image, write_crawl

    no_bytes = {**row(f"{GOOD} without bytes"), "image": None}
    shard0 = [*(row(f"{GOOD} {i}", image=smooth_image(400 + i)) for i in range(8)),
              row(status="failed_to_download"), row(f"{GOOD} broken", image=b"not an image"), no_bytes]
    shard1 = [*(row(f"{GOOD} {i}", image=smooth_image(420 + i)) for i in range(6)),
              {**row(image=smooth_image(430)), "caption": None}, row(status="opted_out"),
              row(f"{GOOD} near copy", image=smooth_image(401, jitter=1)),  # semantic_dedup's duplicates
              row(f"{GOOD} nearer copy", image=smooth_image(424, jitter=1))]
    manifest = write_crawl(tmp_path, [shard0, shard1])
    return manifest.shard_urls()


def job_file(tmp_path, files: list[str]):
    from tests.test_curate import smooth_image

    query = tmp_path / "query.jpg"  # the image of the crawl's third row: query_subset's nearest row is that row
    query.write_bytes(smooth_image(402))
    return write_job(tmp_path, {
        "source": {"uses": SOURCE, "with": {"files": files}},
        "embed": {"uses": "embed", "needs": ["source"],
                  "with": {"model": {"arch": ARCH, "seed": SEED}, "batch_size": 8}},
        # semantic_dedup on the embed stage's image embeddings: one cluster and input order, so that its decision
        # is the greedy one over every row, which a test recomputes from a plain loop's embeddings
        "curate": {"uses": "curate", "needs": ["source", "embed"],
                   "with": {"rules": ["semantic_dedup"], "shard_rows": 100,
                            "semantic_dedup": {"embeddings": "embed", "clusters": 1, "keep": "input_order",
                                               "eps": EPS}}},
        # query_subset on the same embeddings: the image query is one crawled row's image
        "subset": {"uses": "curate", "needs": ["source", "embed"],
                   "with": {"rules": ["query_subset"], "shard_rows": 100,
                            "query_subset": {"embeddings": "embed", "queries": [{"image": str(query), "name": "row 2"}],
                                             "k_per_query": 1}}},
    })


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, ray_local):
    """(job file, outcomes of the one run, the crawled rows, the embeddings as written)."""
    tmp = tmp_path_factory.mktemp("embed")
    files = crawled(tmp)
    path = job_file(tmp, files)
    outcomes = {o.stage: o for o in run_job(spec.load(path), progress=False)}
    source = pa.concat_tables([pq.read_table(f) for f in files])
    out = pa.concat_tables([pq.read_table(u) for u in outcomes["embed"].manifest.shard_urls()])
    return path, outcomes, source, out


def reference(source: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text embeddings of the decodable successful rows, from a plain open_clip loop (float32)."""
    import io

    import torch
    from PIL import Image

    from pipelines import models

    model, preprocess, tokenizer = models.create(models.ModelRef(arch=ARCH, seed=SEED))
    rows = source.filter(pa.compute.equal(source["status"], "success")).to_pylist()
    images = [r["image"] for r in rows if r["image"] not in (None, b"not an image")]
    captions = [r["caption"] for r in rows if r["caption"] is not None]
    with torch.inference_mode():
        img = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]),
                                 normalize=True)
        txt = model.encode_text(tokenizer(captions), normalize=True)
    return img.numpy(), txt.numpy()


def matrix(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks().drop_null()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1)


@pytest.mark.slow
def test_embeddings_are_unit_float16_keyed_by_the_successful_rows(embedded):
    _, outcomes, source, out = embedded
    success = [r["uid"] for r in source.to_pylist() if r["status"] == "success"]
    assert out["uid"].to_pylist() == success  # every successful row once, in the input's order; no other row
    assert out.schema.equals(EMBEDDINGS, check_metadata=False)
    assert out.schema.field("image_embedding").type == pa.list_(pa.float16())
    img, txt = matrix(out["image_embedding"]), matrix(out["text_embedding"])
    assert img.dtype == txt.dtype == np.float16 and img.shape == (len(success) - 2, 64) and txt.shape[1] == 64
    for m in (img, txt):
        np.testing.assert_allclose(np.linalg.norm(m.astype(np.float32), axis=1), 1.0, atol=2e-3)
    ref_img, ref_txt = reference(source)
    np.testing.assert_allclose(img.astype(np.float32), ref_img, atol=2e-3)  # float16 rounding of the plain loop's
    np.testing.assert_allclose(txt.astype(np.float32), ref_txt, atol=2e-3)
    m = outcomes["embed"].manifest
    assert [s["path"] for s in m.shards] == ["part-00000.parquet", "part-00001.parquet"]  # one per upstream shard
    assert m.extra == {"model": ARCH, "embeddings": ["image", "text"], "dim": 64, "dtype": "float16",
                       "columns": ["uid", "image_embedding", "text_embedding"]}
    assert m.params["model"]["arch"] == ARCH and m.params["model"]["seed"] == SEED


@pytest.mark.slow
def test_a_missing_or_undecodable_image_has_a_null_image_embedding(embedded):
    from tests.test_curate import GOOD

    _, outcomes, source, out = embedded
    by_uid = {r["uid"]: r for r in source.to_pylist()}
    rows = out.to_pylist()
    no_image = [r["uid"] for r in rows if r["image_embedding"] is None]
    assert sorted(by_uid[u]["caption"] for u in no_image) == [f"{GOOD} broken", f"{GOOD} without bytes"]
    assert all(r["text_embedding"] is not None for r in rows if r["uid"] in no_image)  # its caption still embeds
    no_text = [r["uid"] for r in rows if r["text_embedding"] is None]
    assert [by_uid[u]["caption"] for u in no_text] == [None] and by_uid[no_text[0]]["image"] is not None
    assert outcomes["embed"].manifest.counts == {
        "rows_in": 21, "rows_out": 19, "skipped_failed_to_download": 1, "skipped_opted_out": 1,
        "no_image_embedding": 2}


@pytest.mark.slow
def test_a_second_run_is_a_cache_hit_and_another_model_another_fingerprint(embedded):
    path, first, _, _ = embedded
    store = path.parent / "store"
    files = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file() and "embed" in p.parts}
    again = {o.stage: o for o in run_job(spec.load(path), progress=False)}
    assert again["embed"].state == "cached" and again["embed"].fingerprint == first["embed"].fingerprint
    assert again["embed"].manifest.digest == first["embed"].manifest.digest
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file() and "embed" in p.parts} == files

    def fingerprint(*overrides: str) -> str:
        (row,) = [r for r in plan(spec.load(path, list(overrides))) if r["stage"] == "embed"]
        return row["fingerprint"]

    assert fingerprint() == first["embed"].fingerprint
    others = {fingerprint("stages.embed.with.model.arch=clip-small"), fingerprint("stages.embed.with.model.seed=6"),
              fingerprint("stages.embed.with.embeddings=[image]")}
    assert len(others) == 3 and first["embed"].fingerprint not in others


@pytest.mark.parametrize(("embeddings", "message"), [
    ("[]", r"stages\.e\.with\.embeddings"),
    ("[image, image]", r"embeddings: \['image', 'image'\] lists one kind twice"),
    ("[pixels]", r"stages\.e\.with\.embeddings\[0\]"),
])
def test_bad_embeddings_setting_is_an_error_naming_the_field(tmp_path, embeddings, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: t\nstages:\n  c:\n    uses: crawl\n    with: {{input: x.parquet}}\n"
                   f"  e:\n    uses: embed\n    needs: [c]\n    with: {{embeddings: {embeddings}}}\n")
    with pytest.raises(spec.SpecError, match=message):
        spec.load(bad)


@pytest.mark.slow
def test_semantic_dedup_reads_the_embed_stages_image_embeddings(embedded):
    """A curate stage whose semantic_dedup names the embed stage decides as the greedy rule over the plain loop's
    float32 embeddings (one cluster, input order): the noisy copies are dropped, every other decodable row kept."""
    from pipelines.stages.curate.rules import semantic_dedup as sd

    _, outcomes, source, _ = embedded
    m = outcomes["curate"].manifest
    assert m.inputs["embed"]["digest"] == outcomes["embed"].manifest.digest  # in the curate's fingerprint
    ledger = pa.concat_tables([pq.read_table(u) for u in (storage_url(m, s["path"]) for s in m.extra["ledger"])]
                              ).to_pandas()
    rows = source.to_pylist()
    assert ledger["uid"].tolist() == [r["uid"] for r in rows]
    seen = [i for i, r in enumerate(rows) if r["status"] == "success" and r["image"] not in (None, b"not an image")]
    ref_img, _ = reference(source)
    expected = sd.greedy(ref_img.astype(np.float32), 1 - EPS)
    assert ledger.loc[seen, "kept"].tolist() == expected.tolist()
    dropped = ledger.loc[ledger["reason"].eq("semantic_duplicate"), "uid"].tolist()
    by_uid = {r["uid"]: r["caption"] for r in rows}
    assert sorted(by_uid[u].rsplit(" ", 2)[-2] for u in dropped) == ["near", "nearer"]
    assert ledger.loc[seen, "semantic_cluster"].eq(0).all()
    assert ledger.drop(index=seen)["semantic_cluster"].isna().all()  # not downloaded, no bytes, undecodable
    assert m.counts["dropped_semantic_duplicate"] == 2 and m.metrics["semantic_sampled"] == len(seen)


def storage_url(m, path: str) -> str:
    from pipelines import storage

    return storage.join(m.location, path)


def test_semantic_dedup_checks_the_embed_stage_it_names(tmp_path):
    """The named stage must be in the curate's needs, hold image embeddings and have embedded the crawl curated."""
    import logging

    from pipelines import configschema
    from pipelines.manifest import Manifest
    from pipelines.stage import StageContext
    from pipelines.stages.curate.config import CurateConfig
    from pipelines.stages.curate.rules import semantic_dedup as sd
    from pipelines.stages.curate.stage import CurateStage

    def manifest(stage: str, uses: str, inputs: dict, columns: list[str]) -> Manifest:
        return Manifest(job="t", stage=stage, uses=uses, fingerprint="0" * 16, code_version="x", params={},
                        inputs=inputs, shards=[{"path": "part-00000.parquet", "rows": 1, "bytes": 1, "sha256": "0" * 64}],
                        counts={}, metrics={}, started_at="", finished_at="", extra={"columns": columns},
                        location=str(tmp_path / stage))

    crawl = manifest("crawl", "crawl", {}, [])
    other = Manifest(**{**crawl.to_json(), "fingerprint": "1" * 16, "digest": ""}, location=crawl.location)
    link = {"crawl": {"fingerprint": crawl.fingerprint, "digest": crawl.digest, "path": crawl.location}}
    rule = sd.SemanticDedupRule(sd.SemanticDedupConfig(embeddings="embed"), 1)
    assert not rule.uses_images and rule.reads() == {"embed": "embeddings"} and rule.identity() == {}
    rule.attach(crawl, {"embed": manifest("embed", "embed", link, ["uid", "image_embedding"])})
    assert rule.embedding_shards == [str(tmp_path / "embed" / "part-00000.parquet")]
    with pytest.raises(ValueError, match=r"semantic_dedup\.embeddings: stage 'embed' \(uses: embed\) wrote no image "):
        rule.attach(crawl, {"embed": manifest("embed", "embed", link, ["uid", "text_embedding"])})
    with pytest.raises(ValueError, match=r"semantic_dedup\.embeddings: .* not the crawl this stage curates"):
        rule.attach(other, {"embed": manifest("embed", "embed", link, ["uid", "image_embedding"])})
    assert sd.SemanticDedupRule(sd.SemanticDedupConfig(), 1).uses_images  # without it: the model pass, as before

    cfg = configschema.build(CurateConfig, {"rules": ["semantic_dedup"], "semantic_dedup": {"embeddings": "embed"}})
    ctx = StageContext(job="t", stage="curate", output=str(tmp_path / "out"), tracker=None,
                       log=logging.getLogger("t"), progress=False)
    with pytest.raises(ValueError, match=r"semantic_dedup\.embeddings: 'embed': not in this stage's needs \(crawl\)"):
        CurateStage(cfg).run(ctx, {"crawl": crawl})
    # and before that, when the job is loaded
    path = write_job(tmp_path, {
        "source": {"uses": SOURCE, "with": {"files": []}},
        "embed": {"uses": "embed", "needs": ["source"]},
        "curate": {"uses": "curate", "needs": ["source"],
                   "with": {"rules": ["semantic_dedup"], "semantic_dedup": {"embeddings": "embed"}}}})
    with pytest.raises(spec.SpecError, match=r"stages\.curate\.with\.semantic_dedup\.embeddings: names stage 'embed', "
                                             r"which is not in stages\.curate\.needs \(source\); add it there"):
        spec.load(path)


@pytest.mark.slow  # no Ray, but torch and open_clip imported: seconds, unless a test before it imported them
def test_an_actor_writes_only_the_embeddings_asked_for_and_describes_a_shard_already_written(tmp_path):
    """The actor alone, in this process: `embeddings: [text]` writes uid and text_embedding only; a shard an earlier
    attempt wrote is described (same record, file untouched), not embedded again, so a failed stage resumes."""
    from pipelines.models import ModelRef
    from pipelines.stages.embed.stage import ShardEmbedder

    (url, _) = crawled(tmp_path)
    actor = ShardEmbedder(ModelRef(arch=ARCH, seed=SEED), batch_size=4, threads=1, kinds=["text"],
                          output=str(tmp_path / "out"))
    first = actor.shard(0, url)
    written = tmp_path / "out" / "part-00000.parquet"
    table, mtime = pq.read_table(written), written.stat().st_mtime_ns
    assert table.column_names == ["uid", "text_embedding"] and table.num_rows == first["rows"] == 10
    assert first["counts"] == {"rows_in": 11, "rows_out": 10, "skipped_failed_to_download": 1}
    assert first["dim"] == 64 and not first["resumed"]
    again = actor.shard(0, url)
    assert again["resumed"] and written.stat().st_mtime_ns == mtime
    assert {k: again[k] for k in ("path", "rows", "bytes", "sha256", "counts", "dim")} == {
        k: first[k] for k in ("path", "rows", "bytes", "sha256", "counts", "dim")}


def test_an_unknown_model_is_found_before_the_run(tmp_path):
    from pipelines import preflight

    path = write_job(tmp_path, {"i": {"uses": "ingest", "with": {"builtin": "digits_train"}},
                                "e": {"uses": "embed", "needs": ["i"], "with": {"model": {"arch": "nope"}}}})
    with pytest.raises(spec.SpecError, match=r"stages\.e\.with\.model\.arch: 'nope' is not an open_clip architecture"):
        preflight.check(spec.load(path))


@pytest.mark.slow
def test_the_report_grid_of_such_a_curate_reads_its_crawl(embedded):
    """The curate output's inputs are the crawl and the embed stage (in name order, embed first): the report's grid
    of kept and dropped rows shows the crawled images and captions, not an error."""
    from pipelines.report import StageRun, section_grid

    _, outcomes, _, _ = embedded
    html = section_grid(StageRun("curate", "curate", None, outcomes["curate"].manifest), 8)
    assert "semantic_duplicate 2" in html and "near copy" in html and "class=err" not in html
    assert html.count("<img src='data:image/jpeg") == 5  # the 3 kept and 2 duplicates shown; not-downloaded: none


@pytest.mark.slow
def test_query_subset_finds_the_row_whose_image_is_the_query(embedded):
    """Through the runner, on the embed stage's float16 embeddings: the query, embedded with the model the embed
    stage's manifest names, is nearest to the row whose image it is (similarity 1 to float16 rounding); k 1 keeps that
    row alone; the curate manifest's params list the query."""
    _, outcomes, source, _ = embedded
    m = outcomes["subset"].manifest
    assert m.params["query_subset"]["queries"] == [{"text": None, "image": m.params["query_subset"]["queries"][0]["image"],
                                                    "name": "row 2"}]
    assert m.params["query_subset"]["queries"][0]["image"].endswith("query.jpg")
    assert m.inputs["embed"]["digest"] == outcomes["embed"].manifest.digest
    ledger = pa.concat_tables([pq.read_table(storage_url(m, s["path"])) for s in m.extra["ledger"]]).to_pandas()
    rows = source.to_pylist()
    assert ledger["uid"].tolist() == [r["uid"] for r in rows]
    assert ledger.loc[ledger["kept"], "uid"].tolist() == [rows[2]["uid"]]
    assert ledger.loc[2, "query_match"] == "row 2" and ledger.loc[2, "query_similarity"] > 0.9999
    seen = ledger["reason"].ne("not_downloaded") & ledger["status"].eq("success")
    assert ledger.loc[seen & ~ledger["kept"], "reason"].eq("query_subset").all()
    assert (ledger.loc[seen & ~ledger["kept"], "query_similarity"].fillna(-1) < ledger.loc[2, "query_similarity"]).all()
    assert m.counts["rows_out"] == 1 and m.metrics["query_subset_rows_0"] == 1
