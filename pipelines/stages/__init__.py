"""Built-in stages; importing this package registers them."""

from pipelines.stages.crawl import CrawlStage

BUILTIN = {"crawl": CrawlStage}
