"""Built-in stages: where each kind's Config and Stage class live, as dotted paths loaded only when needed.

Validating a job reads only the Config modules (dataclasses, no torch, pandas or Ray); a stage's driver is
imported when the stage is built. Each stage package's `__init__` is empty for the same reason: importing
`pipelines.stages.train.config` must not import the trainer.
"""

BUILTIN: dict[str, tuple[str, str]] = {
    "crawl": ("pipelines.stages.crawl.config:CrawlConfig", "pipelines.stages.crawl.stage:CrawlStage"),
    "ingest": ("pipelines.stages.ingest.config:IngestConfig", "pipelines.stages.ingest.stage:IngestStage"),
    "curate": ("pipelines.stages.curate.config:CurateConfig", "pipelines.stages.curate.stage:CurateStage"),
    "train": ("pipelines.stages.train.config:TrainConfig", "pipelines.stages.train.stage:TrainStage"),
    "evaluate": ("pipelines.stages.evaluate.config:EvaluateConfig",
                 "pipelines.stages.evaluate.stage:EvaluateStage"),
    "export": ("pipelines.stages.export.config:ExportConfig", "pipelines.stages.export.stage:ExportStage"),
    "embed": ("pipelines.stages.embed.config:EmbedConfig", "pipelines.stages.embed.stage:EmbedStage"),
}
