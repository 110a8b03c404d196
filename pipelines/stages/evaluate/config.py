"""The evaluate stage's parameters: what a job writes under `stages.<name>.with` for `uses: evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.configschema import field
from pipelines.evaluation.config import EvalSet
from pipelines.models import ModelRef

if TYPE_CHECKING:
    from pipelines.preflight import Check


@dataclass(kw_only=True)
class EvaluateConfig:
    """Zero-shot classification and retrieval metrics (CLIP_benchmark's definitions), logged to MLflow."""

    model: ModelRef | None = field(None, "the model; default: the upstream train stage's final model")
    datasets: list[EvalSet] = field([], "datasets to evaluate on")
    batch_size: int = field(128, "images or texts per forward pass", minimum=1)
    actors: int = field(1, "embedding actors (Ray actors, one pool for all the stage's datasets)", minimum=1)
    num_cpus: float = field(1.0, "CPUs per actor (also its torch threads)", exclusiveMinimum=0)
    num_gpus: float = field(0.0, "GPUs per actor", minimum=0)
    examples: int = field(6, "retrieval queries shown in the examples grid per dataset", minimum=0)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("evaluate: datasets names no dataset")
        names = [d["name"] if isinstance(d, dict) else d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"evaluate: dataset name(s) {', '.join(dup)} used more than once")

    def preflight(self, check: Check) -> None:
        """Before the run (`pipelines.preflight`): the model's architecture and checkpoint, and each dataset's
        files and columns."""
        if self.model is not None:
            check.attempt(check.model, "model", self.model)
        for i, d in enumerate(self.datasets):
            check.attempt(check.eval_set, f"datasets[{i}]", d)
