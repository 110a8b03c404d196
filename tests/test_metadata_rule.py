"""The `metadata` rule's predicate grammar (pipelines/stages/curate/predicate.py): what parses and how it is written
back, errors that name the position and what was expected, SQL's null semantics, and masks that equal pandas'
on random tables."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.stages.curate.predicate import PredicateError, parse


@pytest.mark.parametrize(("text", "normalised", "columns"), [
    ("punsafe < 0.1", "punsafe < 0.1", ("punsafe",)),
    ("punsafe<0.1", "punsafe < 0.1", ("punsafe",)),
    ("  WIDTH >= 256 ", "WIDTH >= 256", ("WIDTH",)),
    ("pwatermark <= .8", "pwatermark <= 0.8", ("pwatermark",)),
    ("x > -1e-3", "x > -0.001", ("x",)),
    ("x = 3", "x == 3", ("x",)),
    ("x != 'a b'", "x != 'a b'", ("x",)),
    ("lang == 'it''s'", "lang == 'it''s'", ("lang",)),
    ('"my col" > 1', '"my col" > 1', ("my col",)),
    ('"say ""hi""" == 1', '"say ""hi""" == 1', ('say "hi"',)),
    ('"in" < 1', '"in" < 1', ("in",)),  # a column named like a keyword stays quoted
    ('"plain" < 1', "plain < 1", ("plain",)),
    ("0.1 > punsafe", "punsafe < 0.1", ("punsafe",)),  # a literal on the left: the operator flips
    ("256 <= WIDTH", "WIDTH >= 256", ("WIDTH",)),
    ("nsfw == TRUE", "nsfw == true", ("nsfw",)),
    ("false != nsfw", "nsfw != false", ("nsfw",)),
    ("a < 1 AND b > 2 Or c == 3", "a < 1 and b > 2 or c == 3", ("a", "b", "c")),
    ("a < 1 and (b > 2 or c == 3)", "a < 1 and (b > 2 or c == 3)", ("a", "b", "c")),
    ("(a < 1 and b > 2) or c == 3", "a < 1 and b > 2 or c == 3", ("a", "b", "c")),  # redundant parentheses go
    ("((a < 1))", "a < 1", ("a",)),
    ("not a < 1", "not a < 1", ("a",)),
    ("not (a < 1 or b < 1)", "not (a < 1 or b < 1)", ("a", "b")),
    ("NOT NOT a < 1", "not not a < 1", ("a",)),
    ("lang in ['en','de' ,]", "lang in ['en', 'de']", ("lang",)),
    ("n not in [1, 2.5]", "n not in [1, 2.5]", ("n",)),
    ("x is null", "x is null", ("x",)),
    ("x IS NOT NULL and x > 0", "x is not null and x > 0", ("x",)),
    ("a < 1 and a > 0", "a < 1 and a > 0", ("a",)),  # a column read twice is listed once
    ("héight > 1", "héight > 1", ("héight",)),
])
def test_parses_and_normalises(text, normalised, columns):
    p = parse(text)
    assert p.text == normalised and p.columns == columns and p.source == text
    assert parse(p.text).text == p.text  # the normalised text is a fixed point
    assert str(parse(p.text).expression) == str(p.expression)


@pytest.mark.parametrize(("text", "position", "message"), [
    ("", 1, "expected a column name, 'not' or '(', got end of text (the predicate is empty)"),
    ("punsafe < < 0.1", 11, "expected a number, a 'string' literal, true or false after '<', got '<'"),
    ("punsafe <", 10, "after '<', got end of text"),
    ("punsafe 0.1", 9, "expected a comparison (< <= > >= == !=), 'in', 'not in' or 'is' after the column "
                       "'punsafe', got '0.1'"),
    ("my col < 1", 4, "got 'col' (a column name with spaces is written in double quotes)"),
    ("lang == \"en\"", 9, "got '\"en\"' (a double-quoted name is a column; a string literal takes single quotes)"),
    ("x == null", 6, "got 'null' (test for null with `is null` or `is not null`)"),
    ("x is 3", 6, "expected 'null' or 'not null', got '3'"),
    ("x is not 3", 10, "expected 'null', got '3'"),
    ("x not < 3", 7, "expected 'in' after 'not', got '<'"),
    ("x in 3", 6, "expected '[' starting the list of values, got '3'"),
    ("x in []", 7, "got ']' (a list needs at least one value)"),
    ("x in [1 2]", 9, "expected ',' or ']' in the list of values, got '2'"),
    ("x in [1, 'a']", 10, "the list mixes a number (1) with a string ('a'); give values of one kind"),
    ("x in [1", 8, "expected ',' or ']' in the list of values, got end of text"),
    ("(a < 1", 7, "expected ')', 'and' or 'or', got end of text"),
    ("a < 1)", 6, "expected 'and', 'or' or the end of the predicate, got ')'"),
    ("a < 1 b > 2", 7, "expected 'and', 'or' or the end of the predicate, got 'b'"),
    ("a < 1 and", 10, "expected a column name, 'not' or '(', got end of text"),
    ("and < 1", 1, "got 'and' (a column named like a keyword is written in double quotes)"),
    ("a < 'open", 5, "unterminated string: expected a closing '"),
    ('"open < 1', 1, 'unterminated column name: expected a closing "'),
    ('"" < 1', 1, 'an empty column name ""'),
    ("a < 1 ; b", 7, "unexpected character ';'"),
    ("a.b < 1", 2, "unexpected character '.'"),
    ("a < true", 5, "true and false compare only with == or !=, not <"),
    ("a < 99999999999999999999", 5, "the integer 99999999999999999999 is out of the 64-bit range"),
    ("1 < 2", 5, "expected a column name after '<' (a comparison is between a column and a literal), got '2'"),
    ("1 and a < 2", 3, "expected a comparison (< <= > >= == !=) after the literal '1', got 'and'"),
    ("a < b", 5, "got 'b'"),  # a column compares with a literal, not with another column
    ("(" * 70 + "a < 1" + ")" * 70, 65, "nested deeper than 64 parentheses or nots"),
    ("not " * 70 + "a < 1", 257, "nested deeper than 64 parentheses or nots"),
])
def test_errors_name_the_predicate_position_and_what_was_expected(text, position, message):
    with pytest.raises(PredicateError) as info:
        parse(text)
    assert info.value.position == position
    assert str(info.value) == f"predicate {text!r}, position {position}: {info.value.reason}"
    assert message in info.value.reason


@pytest.mark.parametrize("text", [
    "__import__('os')",
    "__import__('os').system('true')",
    "punsafe < 0.1 or __import__('os').system('true')",
    "exec('1')",
    "open('/etc/passwd').read() == 'x'",
    "punsafe.__class__ < 1",
    "lambda: 1",
    "[x for x in y]",
    "f'{x}' == 1",
    "x < 1 if y else 2",
    "x + 1 < 2",
    "x < 1\nimport os",
])
def test_python_is_not_a_predicate(text):
    with pytest.raises(PredicateError):
        parse(text)


def table(**cols: list[Any]) -> pa.Table:
    return pa.table(cols)


def test_null_is_not_kept_unless_the_predicate_says_so():
    t = pa.table({"x": pa.array([0.05, None, 0.5, float("nan")]), "s": ["en", None, "de", "fr"]})
    kept = {q: parse(q).mask(t).tolist() for q in [
        "x < 0.1", "not x >= 0.1", "x != 0.05", "x < 0.1 or x is null", "x is null", "x is not null",
        "s in ['en', 'fr']", "s not in ['en']", "not s in ['en']", "not (s in ['en'])", "s != 'de'",
        "x < 0.1 or s == 'fr'", "x < 0.1 and s is null", "not (x < 0.1 and s == 'xx')",
    ]}
    assert kept == {
        "x < 0.1": [True, False, False, False],
        "not x >= 0.1": [True, False, False, True],   # NaN is a value: NaN >= 0.1 is false, so not is true
        "x != 0.05": [False, False, True, True],      # NaN != anything is true; null != anything is unknown
        "x < 0.1 or x is null": [True, True, False, False],
        "x is null": [False, True, False, False],     # NaN is not null
        "x is not null": [True, False, True, True],
        "s in ['en', 'fr']": [True, False, False, True],
        "s not in ['en']": [False, False, True, True],  # a null value is in no list and outside none
        "not s in ['en']": [False, False, True, True],
        "not (s in ['en'])": [False, False, True, True],
        "s != 'de'": [True, False, False, True],
        "x < 0.1 or s == 'fr'": [True, False, False, True],
        "x < 0.1 and s is null": [False, False, False, False],
        "not (x < 0.1 and s == 'xx')": [True, False, True, True],  # unknown and false is false; and unknown, not
    }
    assert parse("x < 0.1").evaluate(t).to_pylist() == [True, None, False, False]


def test_types_kinds_and_missing_columns():
    t = pa.table({"i": pa.array([1, 2, None], pa.int32()), "b": [True, False, None],
                  "d": pa.array(["en", "de", "en"]).dictionary_encode(), "n": pa.nulls(3),
                  "dec": pa.array([1, 2, 3], pa.decimal128(5, 1)), "big": pa.array(["a", "b", "c"], pa.large_string())})
    assert parse("i > 1.5").mask(t).tolist() == [False, True, False]
    assert parse("i in [1, 2.0]").mask(t).tolist() == [True, True, False]
    assert parse("b == true").mask(t).tolist() == [True, False, False]
    assert parse("d in ['en']").mask(t).tolist() == [True, False, True]
    assert parse("d >= 'e'").mask(t).tolist() == [True, False, True]
    assert parse("n < 1").mask(t).tolist() == [False] * 3  # an all-null column compares as unknown
    assert parse("dec >= 2").mask(t).tolist() == [False, True, True]
    assert parse("big < 'b'").mask(t).tolist() == [True, False, False]
    assert parse("i < 1").mask(t.slice(0, 0)).tolist() == []
    for text, message in [
        ("i < 'x'", "column 'i' is int32, which does not compare with a string (i < 'x')"),
        ("d < 1", "column 'd' is dictionary<values=string, indices=int32, ordered=0>, which does not compare with "
                  "a number"),
        ("b == 1", "column 'b' is bool, which does not compare with a number"),
        ("i in ['a']", "column 'i' is int32, which does not compare with a string"),
        ("i < 1 or zz < 1", "no column 'zz'; the table has i, b, d, n, dec, big"),
    ]:
        with pytest.raises(PredicateError) as info:
            parse(text).mask(t)
        assert str(info.value) == f"predicate {text!r}: {message}" or message in str(info.value)
        assert info.value.position is None


def test_predicates_pickle():
    import pickle

    p = parse("s not in ['a'] and x < 2")
    q = pickle.loads(pickle.dumps(p))
    t = pa.table({"s": ["a", "b", None], "x": [1, 1, 1]})
    assert q.text == p.text and q.mask(t).tolist() == p.mask(t).tolist() == [False, True, False]


# ---- random predicates against a pandas reference -----------------------------------------------------------

OPS = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}


def random_frame(rng: np.random.Generator, n: int) -> pd.DataFrame:
    def holes(s: pd.Series) -> pd.Series:
        return s.mask(rng.random(n) < 0.15)

    return pd.DataFrame({
        "punsafe": holes(pd.Series(rng.random(n).round(2), dtype="Float64")),
        "WIDTH": holes(pd.Series(rng.integers(0, 1000, n), dtype="Int64")),
        "lang": holes(pd.Series(rng.choice(["en", "de", "fr", "it's"], n), dtype="string")),
        "nsfw": holes(pd.Series(rng.random(n) < 0.3, dtype="boolean")),
        "my col": holes(pd.Series(rng.integers(-3, 4, n), dtype="Int64")),
    })


def literal(r: random.Random, column: str) -> tuple[str, Any]:
    if column == "punsafe":
        v = round(r.random(), 2)
        return repr(v), v
    if column in ("WIDTH", "my col"):
        v = r.randint(-3, 3) if column == "my col" else r.choice([0, 256, 500, 999])
        return str(v), v
    if column == "lang":
        v = r.choice(["en", "de", "fr", "it's", "xx"])
        return "'" + v.replace("'", "''") + "'", v
    v = r.random() < 0.5
    return ("true" if v else "false"), v


def name(column: str) -> str:
    return f'"{column}"' if " " in column else column


def random_test(r: random.Random, df: pd.DataFrame) -> tuple[str, pd.Series]:
    """One comparison, list or null test, and its value per row as a pandas nullable boolean (NA = unknown)."""
    column = r.choice(list(df.columns))
    s = df[column]
    kind = r.random()
    if kind < 0.15:
        negated = r.random() < 0.5
        value = s.notna() if negated else s.isna()
        return f"{name(column)} is {'not ' if negated else ''}null", value.astype("boolean")
    if kind < 0.35:
        items = [literal(r, column) for _ in range(r.randint(1, 3))]
        found = s.isin([v for _, v in items]).astype("boolean").mask(s.isna())
        negated = r.random() < 0.5
        text = f"{name(column)} {'not ' if negated else ''}in [{', '.join(t for t, _ in items)}]"
        return text, ~found if negated else found
    op = r.choice(["==", "!="] if column == "nsfw" else list(OPS))
    text, value = literal(r, column)
    result = getattr(s, OPS[op])(value).astype("boolean")
    if r.random() < 0.2:  # the literal on the left
        flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}[op]
        return f"{text} {flipped} {name(column)}", result
    return f"{name(column)} {op} {text}", result


def random_predicate(r: random.Random, df: pd.DataFrame, depth: int = 0) -> tuple[str, pd.Series]:
    roll = r.random()
    if depth >= 3 or roll < 0.35:
        return random_test(r, df)
    if roll < 0.5:
        text, value = random_predicate(r, df, depth + 1)
        return f"not ({text})", ~value
    word = r.choice(["and", "or"])
    parts = [random_predicate(r, df, depth + 1) for _ in range(r.randint(2, 3))]
    value = parts[0][1]
    for _, v in parts[1:]:
        value = (value & v) if word == "and" else (value | v)  # pandas' nullable booleans are Kleene's too
    return f" {word} ".join(f"({t})" for t, _ in parts), value


def test_random_predicates_match_pandas():
    rng = np.random.default_rng(19)
    r = random.Random(19)
    df = random_frame(rng, 400)
    t = pa.Table.from_pandas(df, preserve_index=False)
    assert t.schema.field("lang").type == pa.string() and t.column("punsafe").null_count > 0
    checked = 0
    for _ in range(300):
        text, expected = random_predicate(r, df)
        p = parse(text)
        want = expected.fillna(False).to_numpy(dtype=bool)
        assert p.mask(t).tolist() == want.tolist(), text
        assert parse(p.text).mask(t).tolist() == want.tolist(), p.text  # the normalised text means the same
        checked += int(want.any() and not want.all())
    assert checked > 100  # most predicates split the rows, so the comparison says something


# ---- the rule: config checks, the spec-time column check, a curate run ----------------------------------------

def metadata_config(*keep: str, rules: tuple[str, ...] = ("metadata",)) -> Any:
    from pipelines import configschema
    from pipelines.stages.curate.config import CurateConfig

    return configschema.build(CurateConfig, {"rules": list(rules), "metadata": {"keep": list(keep)}})


def test_config_errors_name_the_field_and_position():
    cfg = metadata_config("punsafe < 0.1", "WIDTH>=256", "punsafe < 0.1 and lang in ['en']")
    (rule,) = cfg.instances()
    assert rule.reasons() == ("metadata: punsafe < 0.1", "metadata: WIDTH >= 256",
                              "metadata: punsafe < 0.1 and lang in ['en']")
    assert rule.columns() == ("punsafe", "WIDTH", "lang")
    assert cfg.required_columns() == {"punsafe": "metadata", "WIDTH": "metadata", "lang": "metadata"}
    for keep, message in [
        (["punsafe < 0.1", "WIDTH >> 256"],
         "metadata.keep[1]: predicate 'WIDTH >> 256', position 8: expected a number, a 'string' literal, true or "
         "false after '>', got '>'"),
        (["__import__('os')"], "metadata.keep[0]: predicate \"__import__('os')\", position 11: expected a comparison"),
        ([], "metadata.keep: the rule is listed but has no predicates"),
        (["a < 1", "a<1"], "metadata.keep[1]: 'a < 1' is the predicate keep[0] already is; give each once"),
    ]:
        with pytest.raises(ValueError) as info:
            metadata_config(*keep)
        assert message in str(info.value)
    metadata_config("not a predicate at all", rules=("basic",))  # an unlisted rule's settings are not its concern


def test_decide_names_the_first_failing_predicate_and_type_errors():
    from pipelines.stages.curate.rules.metadata import MetadataRule

    cfg = metadata_config("punsafe < 0.1", "WIDTH >= 256")
    rule = MetadataRule(cfg.metadata, 1)
    crawled = pa.table({"punsafe": [0.0, 0.5, None, 0.05], "WIDTH": [300, 300, 300, 100]})
    decisions = rule.decide(pd.DataFrame(index=range(4)), crawled)
    assert [(r, m.tolist()) for r, m in decisions] == [("metadata: punsafe < 0.1", [False, True, True, False]),
                                                        ("metadata: WIDTH >= 256", [False, False, False, True])]
    import pickle

    assert pickle.loads(pickle.dumps(rule)).decide(pd.DataFrame(index=range(4)), crawled)[1][1].tolist() == \
        [False, False, False, True]
    with pytest.raises(ValueError, match=r"curate rule metadata, keep\[1\]: predicate 'WIDTH >= 256': column 'WIDTH' "
                                         r"is string, which does not compare with a number"):
        rule.decide(pd.DataFrame(index=range(1)), pa.table({"punsafe": [0.0], "WIDTH": ["300"]}))


def job(tmp_path, passthrough: list[str], keep: list[str]) -> Any:
    import yaml

    urls = tmp_path / "urls.csv"  # validating reads its header (preflight): the columns the crawl reads
    urls.write_text(",".join(["url", "caption", *passthrough]) + "\n")
    raw = {"name": "j", "storage": str(tmp_path / "store"), "stages": {
        "crawl": {"uses": "crawl", "with": {"input": str(urls), "passthrough": passthrough}},
        "curate": {"uses": "curate", "needs": ["crawl"], "with": {"rules": ["basic", "metadata"],
                                                                  "metadata": {"keep": keep}}}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_column_the_crawl_does_not_write_is_a_spec_error(tmp_path):
    from pipelines import spec
    from tests.support.cli import run_cli

    good = spec.load(job(tmp_path, ["punsafe", "WIDTH"], ["punsafe < 0.1", "WIDTH >= 256", "width > 8"]))
    assert good.stages["curate"].config.metadata.keep[1] == "WIDTH >= 256"
    with pytest.raises(spec.SpecError) as info:
        spec.load(job(tmp_path, ["punsafe"], ["punsafe < 0.1", "WIDTH >= 256"]))
    assert ("stages.curate.with.metadata: reads the column 'WIDTH', which stage 'crawl' (crawl) does not write; add "
            "it to stages.crawl.with.passthrough") in str(info.value)
    with pytest.raises(spec.SpecError) as info:
        spec.load(job(tmp_path, ["punsafe"], ["punsafe < 0.1", "punsafe <"]))
    assert "stages.curate.with: metadata.keep[1]: predicate 'punsafe <', position 10: expected" in str(info.value)

    done = run_cli("validate", job(tmp_path, ["uid"], ["source_uid != 'x'", "similarity > 0.3"]))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "reads the column 'similarity', which stage 'crawl' (crawl) does not write" in done.stderr


def test_validating_predicates_imports_no_pandas(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    path = job(tmp_path, ["punsafe", "lang"], ["punsafe < 0.1", "lang in ['en']", "not (punsafe is null)"])
    code = (f"import sys; from pipelines import cli; rc = cli.main(['validate', {str(path)!r}]); "
            "print(sorted(m for m in ('torch', 'pandas', 'ray') if m in sys.modules)); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_curate_keeps_the_rows_the_predicates_keep(tmp_path, ray_local):
    import pyarrow.parquet as pq

    from tests.test_curate import row, run_curate, write_crawl

    rng = np.random.default_rng(3)
    shards = [[row(f"a photo of a small red house number {i}", seed=i + 40 * s,
                   status="failed_to_download" if i % 9 == 4 else "success")
               for i in range(15)] for s in range(2)]
    shards[0][0]["caption"] = "two words"  # basic drops it first, whatever its metadata
    crawl = write_crawl(tmp_path, shards)
    passthrough = []
    for s, shard in enumerate(crawl.shards):
        path = tmp_path / "crawl" / shard["path"]
        t = pq.read_table(path)
        n = t.num_rows
        cols = {"punsafe": pa.array(rng.random(n).round(2), mask=rng.random(n) < 0.2),
                "WIDTH": pa.array(rng.integers(100, 600, n)),
                "LANGUAGE": pa.array(rng.choice(["en", "de", "fr"], n))}
        for name, values in cols.items():
            t = t.append_column(name, values)
        pq.write_table(t, path)
        passthrough.append(t.select(["uid", "status", *cols]).to_pandas().assign(shard=s, row=range(n)))
    keep = ["punsafe < 0.5 or punsafe is null", "WIDTH >= 256", "LANGUAGE in ['en', 'de']"]
    result, ledger, curated, _ = run_curate(tmp_path, crawl, rules=["basic", "metadata"], metadata={"keep": keep},
                                            basic={"min_side": 0})
    meta = pd.concat(passthrough, ignore_index=True)
    fails = [~(meta["punsafe"].lt(0.5) | meta["punsafe"].isna()), meta["WIDTH"].lt(256),
             ~meta["LANGUAGE"].isin(["en", "de"])]
    reasons = ["metadata: punsafe < 0.5 or punsafe is null", "metadata: WIDTH >= 256",
               "metadata: LANGUAGE in ['en', 'de']"]
    want = pd.Series([None] * len(meta), dtype=object)
    for reason, fail in reversed(list(zip(reasons, fails, strict=True))):  # the first failing predicate wins
        want[fail.to_numpy()] = reason
    want[(meta["shard"] == 0) & (meta["row"] == 0)] = "caption_words"
    want[meta["status"] != "success"] = "not_downloaded"
    got = meta[["shard", "row"]].merge(ledger[["shard", "row", "reason"]], on=["shard", "row"], how="left")
    assert got["reason"].tolist() == want.tolist()
    assert set(curated["uid"]) == set(meta.loc[want.isna(), "uid"]) and len(curated) == want.isna().sum() > 3
    for reason in reasons:
        assert 0 < (want == reason).sum() == result.counts[f"dropped_{reason}"]
    assert {"punsafe", "WIDTH", "LANGUAGE"} <= set(curated.columns)  # the passthrough columns travel on
