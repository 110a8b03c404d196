"""The crawl's checks before the run (`pipelines.preflight`): its URL lists exist, in a format it reads, with the
columns it reads (the URL, the caption and the passthrough ones), found as `inputs.rows` finds them. Only each
file's header is read (a Parquet footer, a CSV header line, the first JSON line); no pandas."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.stages.crawl.config import CAPTION_COLS, EXTENSIONS, URL_COLS, CrawlConfig

if TYPE_CHECKING:
    from pipelines.preflight import Check


def input_format(path: str, cfg: CrawlConfig) -> str | None:
    """The format `inputs.file_format` reads a file as, or None where its extension does not say."""
    if cfg.format != "auto":
        return cfg.format
    name = path.lower()
    for comp in (".gz", ".bz2", ".zst", ".xz"):
        name = name.removesuffix(comp)
    return next((fmt for ext, fmt in EXTENSIONS.items() if name.endswith(ext)), None)


def check_inputs(cfg: CrawlConfig, check: Check) -> None:
    assert isinstance(cfg.input, list)  # CrawlConfig.__post_init__ makes it one
    for i, pattern in enumerate(cfg.input):
        check.attempt(_check_list, cfg, check, "input" if len(cfg.input) == 1 else f"input[{i}]", pattern)


def _check_list(cfg: CrawlConfig, check: Check, field: str, pattern: str) -> None:
    from pipelines.preflight import Problem

    for url in check.files(field, pattern):
        fmt = input_format(url, cfg)
        if fmt is None:
            raise Problem(field, f"{url}: cannot tell the format from the extension; set format: parquet|csv|tsv|jsonl")
        have = check.columns(field, url, fmt)
        listed = ", ".join(have) or "none"
        for key, wanted, defaults, what in (("url_col", cfg.url_col, URL_COLS, "URL"),
                                            ("caption_col", cfg.caption_col, CAPTION_COLS, "caption")):
            if wanted is not None and wanted not in have:
                check.problem(key, f"{url} has no column {wanted!r}; its columns: {listed}")
            elif wanted is None and not any(c in have for c in defaults):
                check.problem(field, f"{url} has no {what} column: expected one of {', '.join(defaults)} (or set "
                                     f"{key}); its columns: {listed}")
        missing = [c for c in cfg.passthrough if c not in have]
        if missing:
            check.problem("passthrough", f"{url} has no column {', '.join(map(repr, missing))}; its columns: {listed}")
