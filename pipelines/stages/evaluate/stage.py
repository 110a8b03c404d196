"""The evaluate stage: zero-shot classification and retrieval on each dataset, as CLIP_benchmark defines them.

Embeddings come from an actor pool on Ray, metrics from CLIP_benchmark's definitions: both from the evaluation
library (`pipelines/evaluation/`), which the train stage's periodic evaluation uses too.  Output: one
CLIP_benchmark-format JSON per dataset and task, MLflow metrics `eval/<dataset>/<metric>` (`@` written as
`_at_`), a confusion matrix and a grid of retrieval examples per dataset, and a summary table with the
average of each dataset's main metric (acc1, or the mean of image and text recall@1), as DataComp averages.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch

from pipelines import layout, models, storage
from pipelines.evaluation import datasets
from pipelines.evaluation.datasets import load
from pipelines.evaluation.embed import EmbedPool
from pipelines.evaluation.tasks import TASKS, caption_images, main_metric, mlflow_key, score, texts, zeroshot_logits
from pipelines.manifest import Manifest
from pipelines.models import ModelRef
from pipelines.prometheus import EVAL_AVERAGE, EVAL_METRIC, StageMetrics
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.evaluate.config import EvaluateConfig

MAX_CONFUSION_CLASSES = 60  # beyond this a confusion matrix is unreadable (and huge)


@register
class EvaluateStage(Stage):
    kind = "evaluate"
    Config = EvaluateConfig
    dependencies = ("open_clip_torch", "torch", "pillow", "scikit-learn")

    def run(self, ctx: StageContext, upstream: dict[str, Manifest]) -> StageResult:
        cfg: EvaluateConfig = self.config
        ref = cfg.model or self._upstream_model(upstream)
        from pipelines.models import preprocess_cfg

        size = preprocess_cfg(ref.arch)["size"] if not ref.model_uri else 224
        size = size[0] if isinstance(size, (tuple, list)) else size
        shards, summary, flat = [], [], {}
        prom = StageMetrics.of(ctx)
        # one pool of embedding actors for every dataset: they start while the first set loads
        with EmbedPool(ref, cfg.actors, cfg.num_cpus, cfg.num_gpus) as pool:
            for ds_cfg in cfg.datasets:
                data = load(ds_cfg, size)
                if not data.images:
                    raise ValueError(f"dataset {data.name}: no images to evaluate")
                tasks = list(dict.fromkeys(ds_cfg.tasks))
                prompts, captions = texts(data, tasks)
                ctx.log.info("%s: embedding %d images and %d texts", data.name, len(data.images),
                             len(prompts) + len(captions))
                img, txt = pool.embed(data.images, prompts + captions, cfg.batch_size)
                img_t, txt_t = torch.from_numpy(img), torch.from_numpy(txt)
                results = score(data, tasks, img_t, txt_t)
                for task in tasks:
                    m = results[task]
                    if task == "zeroshot":
                        self._confusion(ctx, data, zeroshot_logits(data, img_t, txt_t).argmax(dim=1),
                                        torch.tensor(data.labels))
                    elif cfg.examples:
                        self._examples(ctx, data, img_t, txt_t[len(prompts):], captions, caption_images(data),
                                       cfg.examples)
                    record = {"dataset": data.name, "model": ref.arch, "pretrained": ref.checkpoint or ref.model_uri,
                              "task": TASKS[task], "metrics": m, "language": "en"}
                    blob = json.dumps(record, indent=2, allow_nan=True).encode()
                    rel = f"{data.name}_{TASKS[task]}.json"
                    storage.atomic_write(storage.join(ctx.output, rel), blob)
                    shards.append(layout.shard_record(rel, len(data.images), blob))
                    flat.update({mlflow_key(data.name, k): v for k, v in m.items()})
                    for k, v in m.items():
                        prom.set(EVAL_METRIC, v, dataset=data.name, task=TASKS[task], metric=k)
                    summary.append({"dataset": data.name, "task": TASKS[task], "images": len(data.images),
                                    "main_metric": "acc1" if task == "zeroshot" else "mean_recall@1",
                                    "value": main_metric(task, m)})
                    ctx.log.info("%s %s: %s", data.name, task, ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
        average = float(np.mean([s["value"] for s in summary]))
        # the job run's headline: the average and each dataset's main metric (retrieval's mean of recall@1 too)
        headline: dict[str, float] = {"eval/average": average}
        headline.update({mlflow_key(str(s["dataset"]), str(s["main_metric"])): float(s["value"])  # type: ignore[arg-type]
                         for s in summary})
        flat.update(headline)
        prom.set(EVAL_AVERAGE, average)
        ctx.tracker.log_metrics(flat, prefix="")  # `eval/<dataset>/<metric>` exactly; NaN (acc5 < 5 classes) left out
        self._summary(ctx, summary, average)
        self._score_model_version(ctx, upstream, headline)
        return StageResult(shards=shards, counts={"datasets": len(cfg.datasets)},
                           metrics={"average": average},
                           extra={"summary": summary, "model": {"arch": ref.arch, "checkpoint": ref.checkpoint,
                                                                "model_uri": ref.model_uri},
                                  "headline": headline,
                                  # what a cache hit's run repeats when the run that computed this is unreadable
                                  "metrics": {k: v for k, v in flat.items() if v == v}})

    @staticmethod
    def _score_model_version(ctx: StageContext, upstream: dict[str, Manifest], headline: dict[str, float]) -> None:
        """The scores as tags on the registered model version the upstream train stage made, beside this run's id;
        the registry is not spooled, so while MLflow is offline the version is left as it is (and said so)."""
        trained = [m.extra["model"] for m in upstream.values() if m.extra.get("model", {}).get("version")]
        if len(trained) != 1:
            return
        info = trained[0]
        tags = {**{k: f"{v:.4f}" for k, v in headline.items()}, "clipline.eval_run": ctx.tracker.run_id}
        if ctx.tracker.annotate_model_version(info["registered_model"], info["version"], tags):
            ctx.log.info("scores tagged on model version %s/%s", info["registered_model"], info["version"])
        else:
            ctx.log.warning("MLflow is offline: the scores are not tagged on model version %s/%s (the registry is "
                            "not spooled); a later --force run of this stage tags them",
                            info["registered_model"], info["version"])

    @staticmethod
    def _upstream_model(upstream: dict[str, Manifest]) -> ModelRef:
        trained = [m for m in upstream.values() if "model" in m.extra]
        if len(trained) != 1:
            raise ValueError("evaluate: give with.model, or make the stage need exactly one train stage "
                             f"(its needs: {', '.join(upstream) or 'none'})")
        return models.trained(trained[0])

    @staticmethod
    def _confusion(ctx: StageContext, data: datasets.EvalData, pred: torch.Tensor, target: torch.Tensor) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k = len(data.classnames)
        if k > MAX_CONFUSION_CLASSES:
            ctx.log.warning("%s: %d classes; the confusion matrix is drawn only up to %d", data.name, k,
                            MAX_CONFUSION_CLASSES)
            return
        cm = np.zeros((k, k), np.int64)
        np.add.at(cm, (target.numpy(), pred.numpy()), 1)
        fig, ax = plt.subplots(figsize=(0.45 * k + 3, 0.45 * k + 2.5))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(k), data.classnames, rotation=90)
        ax.set_yticks(range(k), data.classnames)
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > cm.max() / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{data.name}: zero-shot confusion matrix ({len(target)} images)")
        fig.tight_layout()
        ctx.tracker.log_figure(fig, f"eval_{data.name}_confusion.png")
        plt.close(fig)

    @staticmethod
    def _examples(ctx: StageContext, data: datasets.EvalData, img: torch.Tensor, cap: torch.Tensor,
                  captions: list[str], text_image: list[int], n: int) -> None:
        """Text queries and their top 5 images; the right image framed in green."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        queries = np.linspace(0, len(captions) - 1, min(n, len(captions))).astype(int)
        scores = cap[queries] @ img.t()
        top = torch.sort(scores, dim=1, descending=True, stable=True)[1][:, :5]
        fig, axes = plt.subplots(len(queries), 6, figsize=(13, 2.1 * len(queries)), squeeze=False)
        for row, q in enumerate(queries):
            axes[row, 0].text(0, 0.5, captions[q], wrap=True, fontsize=9, va="center")
            axes[row, 0].axis("off")
            for col, i in enumerate(top[row].tolist()):
                ax = axes[row, col + 1]
                ax.imshow(Image.open(io.BytesIO(data.images[i])).convert("RGB"))
                ax.set_xticks([])
                ax.set_yticks([])
                right = i == text_image[q]
                for spine in ax.spines.values():
                    spine.set_color("#2ca02c" if right else "#bbbbbb")
                    spine.set_linewidth(4 if right else 1)
                ax.set_title(f"{float(scores[row, i]):.2f}", fontsize=8)
        fig.suptitle(f"{data.name}: text -> image retrieval, top 5 (green: the caption's image)")
        fig.tight_layout()
        ctx.tracker.log_figure(fig, f"eval_{data.name}_retrieval.png")
        plt.close(fig)

    @staticmethod
    def _summary(ctx: StageContext, summary: list[dict[str, Any]], average: float) -> None:
        lines = ["| dataset | task | images | main metric | value |", "|---|---|---|---|---|"]
        lines += [f"| {s['dataset']} | {s['task']} | {s['images']} | {s['main_metric']} | {s['value']:.4f} |"
                  for s in summary]
        lines.append(f"| average | | | | {average:.4f} |")
        ctx.tracker.log_text("\n".join(lines) + "\n", "eval_summary.md")
