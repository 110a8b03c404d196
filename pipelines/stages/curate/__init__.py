"""`uses: curate`: crawled shards in; curated shards and a ledger of every row's decision out."""

from pipelines.stages.curate.stage import CurateStage

__all__ = ["CurateStage"]
