"""The evaluate stage: zero-shot classification and retrieval metrics (CLIP_benchmark's), logged to MLflow."""

from pipelines.stages.evaluate.stage import EvaluateStage

__all__ = ["EvaluateStage"]
