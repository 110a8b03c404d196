"""Built-in stages; importing this package registers them."""

from pipelines.stages.crawl import CrawlStage
from pipelines.stages.curate import CurateStage
from pipelines.stages.evaluate import EvaluateStage
from pipelines.stages.ingest import IngestStage
from pipelines.stages.train import TrainStage

BUILTIN = {"crawl": CrawlStage, "ingest": IngestStage, "curate": CurateStage, "train": TrainStage,
           "evaluate": EvaluateStage}
