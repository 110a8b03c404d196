"""The train stage's driver: plan the steps, start Ray Train's TorchTrainer, publish the final model.

Ray Train keeps checkpoints under `<stage output>/ray/train/`.  A worker group lost mid-run restarts from
the latest of them (`FailureConfig`); a re-run of the job finds them there too (same fingerprint, same
directory, same run name), and Ray Train V2 restores from its snapshot.  At the end the final weights are
written beside the manifest and logged to MLflow with their open_clip config, then registered with an alias.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from pipelines import layout, storage
from pipelines.manifest import Manifest
from pipelines.models import CONFIG_FILE, WEIGHTS_FILE, arch_name, log_model, model_config
from pipelines.spool import unreachable
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.train import checkpoint, data, validate
from pipelines.stages.train.config import TrainConfig
from pipelines.stages.train.loop import Plan, train_loop
from pipelines.tracking import run_link


def plan_steps(cfg: TrainConfig, rows: int) -> tuple[int, int]:
    """(steps per epoch, planned steps): each worker gets rows // workers rows and drops its last partial batch."""
    per_worker = rows // cfg.workers
    steps_per_epoch = per_worker // cfg.batch_size // cfg.accum_freq
    if steps_per_epoch == 0:
        raise ValueError(f"train: {rows} curated rows over {cfg.workers} workers give no full step of "
                         f"batch_size {cfg.batch_size} x accum_freq {cfg.accum_freq} per worker; lower batch_size")
    return steps_per_epoch, cfg.steps or cfg.epochs * steps_per_epoch


def version_tags(ctx: StageContext, source: Manifest, state: dict[str, Any]) -> dict[str, str]:
    """A registered version's tags: the job, the train run, the dataset version it was trained on (the curated
    output's job/stage@fingerprint, digest and location) and the final loss; evaluate adds the scores."""
    return {"clipline.job": ctx.job, "clipline.train_run": ctx.tracker.run_id,
            "clipline.dataset": f"{source.job}/{source.stage}@{source.fingerprint}",
            "clipline.dataset_digest": source.digest, "clipline.dataset_path": source.location,
            "clipline.dataset_rows": str(source.rows), "train/final_loss": f"{state['loss']:.4f}"}


def version_description(ctx: StageContext, arch: str, source: Manifest, state: dict[str, Any]) -> str:
    return (f"open_clip `{arch}` trained by clipline job `{ctx.job}` (stage `{ctx.stage}`, run "
            f"[{ctx.tracker.run_id}]({run_link(ctx.tracker.run_id)})) for {state['step']} steps ({state['samples']} "
            f"samples) on `{source.job}/{source.stage}@{source.fingerprint}` ({source.rows} rows, {source.location}); "
            f"final loss {state['loss']:.4f}. The evaluate stage tags its scores (eval/...) on this version.")


def state_api_available() -> bool:
    """Whether Ray's state API can answer on this cluster: the dashboard serves it, at the address the GCS
    holds. A local instance started by clipline runs none (the GCS still names 127.0.0.1:8265, where nothing
    listens), so a connection to that address tells."""
    import socket

    import ray
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return False
    addr = internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    if not addr:
        return False
    host, _, port = addr.decode().rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        return False
    return True


def trainer_class() -> type:
    """Ray Train's `TorchTrainer`, without its placement-group cleaner where the state API cannot answer.

    The cleaner is a detached actor that removes the workers' placement group if the controller dies; it
    polls the controller's liveness through the state API.  Without a dashboard that call blocks on its own
    address lookup, and the controller's shutdown waited out the cleaner's 12 s stop timeout after every
    run (with a GetTimeoutError traceback in the log).  The cleaner could never have seen a dead controller
    there, and a local instance's placement groups end with the instance the runner stops; on a cluster
    with a dashboard the cleaner stays."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    if state_api_available():
        return TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    return LocalTorchTrainer


@register
class TrainStage(Stage):
    kind = "train"
    Config = TrainConfig
    dependencies = ("open_clip_torch", "torch", "pillow", "pyarrow")

    def run(self, ctx: StageContext, upstream: dict[str, Manifest]) -> StageResult:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, ValidationConfig

        cfg: TrainConfig = self.config
        if len(upstream) != 1:
            raise ValueError(f"train reads exactly one curated dataset; needs: lists {len(upstream)} "
                             f"({', '.join(upstream)})")
        (source,) = upstream.values()
        arch = arch_name(cfg.model.arch)
        steps_per_epoch, planned = plan_steps(cfg, source.rows)
        global_batch = cfg.batch_size * cfg.accum_freq * cfg.workers
        ctx.log.info("training %s on %d rows: %d steps (%d per epoch), global batch %d over %d %s workers",
                     arch, source.rows, planned, steps_per_epoch, global_batch, cfg.workers,
                     "GPU" if cfg.use_gpu else "CPU")
        ctx.tracker.log_params({"plan": {"rows": source.rows, "steps_per_epoch": steps_per_epoch,
                                         "planned_steps": planned, "global_batch": global_batch}})
        # each rank builds its own Ray Data stream from this (data.rank_dataset); a seed drawn here is kept in
        # every checkpoint, so a resumed run replays the same plan
        stream = data.Stream(urls=source.shard_urls(), rows=[int(s["rows"]) for s in source.shards],
                             passes=data.passes_needed(planned, steps_per_epoch),
                             seed=cfg.seed if cfg.seed is not None else secrets.randbits(63),
                             fixed_order=cfg.seed is not None, window=cfg.shuffle_buffer)
        rows_dir = storage.join(storage.resolve(ctx.output), "rows") if cfg.log_rows else None

        resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
        if cfg.use_gpu:
            resources["GPU"] = 1
        ray_dir = storage.join(storage.resolve(ctx.output), "ray")
        evals_dir = storage.join(storage.resolve(ctx.output), "evals")
        validation = None
        if cfg.eval_datasets and cfg.eval_mode == "async":
            validation = ValidationConfig(
                fn=validate.CheckpointEvaluator(cfg.eval_datasets, cfg.model.arch, cfg.eval_batch_size,
                                                max(1, int(cfg.eval_cpus)), cfg.eval_gpus > 0,
                                                ctx.tracker.for_worker(), evals_dir),
                ray_remote_kwargs={"num_cpus": cfg.eval_cpus, "num_gpus": cfg.eval_gpus})
        trainer = trainer_class()(
            train_loop,
            train_loop_config={"cfg": cfg, "plan": Plan(arch=cfg.model.arch, steps_per_epoch=steps_per_epoch,
                                                        planned_steps=planned, tracker=ctx.tracker.for_worker(),
                                                        stream=stream, rows_dir=rows_dir)},
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name="train", storage_path=ray_dir,
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
            validation_config=validation,
        )
        result = trainer.fit()  # returns once the last evaluation has ended too
        evaluated = self._check_evaluations(ctx, evals_dir, validate.eval_steps(planned, cfg.eval_every)) \
            if validation is not None else None
        if result.checkpoint is None:
            raise RuntimeError(f"train: Ray Train finished without a checkpoint under {ray_dir}")
        with result.checkpoint.as_directory() as d:
            with open(os.path.join(d, checkpoint.STATE_FILE)) as f:
                state = json.load(f)
            if state["step"] != planned:
                raise RuntimeError(f"train: the last checkpoint is at step {state['step']}, planned {planned}")
            shards, model_info = self._publish(ctx, cfg, d, arch, source, state)
        return StageResult(
            shards=shards,
            counts={"steps": state["step"], "samples": state["samples"], "epochs_started": state["epoch"],
                    **({"evaluations": evaluated} if evaluated is not None else {})},
            metrics={"final_loss": state["loss"]},
            extra={"model": model_info, "checkpoints": storage.join(ray_dir, "train"), "data_seed": state["data_seed"],
                   **({"rows_log": rows_dir} if rows_dir else {})},
        )

    @staticmethod
    def _check_evaluations(ctx: StageContext, evals_dir: str, steps: list[int]) -> int:
        """The asynchronous evaluations Ray Train ran: each failed or missing one said on the console and tagged on
        the run (the model is trained all the same; Ray Train only logs a failed validation). Returns how many
        succeeded."""
        done, failed = validate.collect(evals_dir, steps)
        for step, why in failed.items():
            ctx.log.warning("train: the evaluation at step %d failed, its eval/ metrics are missing: %s", step, why)
        if failed:
            ctx.tracker.set_tag("clipline.train.evaluations_failed", ",".join(str(s) for s in failed))
        return len(done)

    @staticmethod
    def _publish(ctx: StageContext, cfg: TrainConfig, ckpt_dir: str, arch: str, source: Manifest,
                 state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Write the final weights and config beside the manifest; log and register the model in MLflow."""
        from pipelines.models import ModelRef, create

        weights = os.path.join(ckpt_dir, checkpoint.MODEL_FILE)
        model, _, _ = create(ModelRef(arch=cfg.model.arch, checkpoint=weights))
        name = arch_name(cfg.model.arch)
        config = {"arch": name, **model_config(cfg.model.arch)}
        if getattr(model, "logit_bias", None) is not None:
            config["init_logit_bias"] = float(model.logit_bias)
        files = {WEIGHTS_FILE: Path(weights).read_bytes(), CONFIG_FILE: json.dumps(config, indent=2).encode()}
        shards = []
        for fname, blob in files.items():
            storage.atomic_write(storage.join(ctx.output, fname), blob)
            shards.append(layout.shard_record(fname, 0, blob))
        reg = cfg.register
        registered = (reg.name or f"{ctx.job}-{ctx.stage}") if reg.enabled else None
        out: dict[str, Any] = {"arch": name, "weights": WEIGHTS_FILE, "config": CONFIG_FILE, "model_uri": None}
        tracker = ctx.tracker
        if not tracker.offline:
            try:
                info = log_model(model, cfg.model.arch, name="model", registered_model_name=registered,
                                 run_id=tracker.run_id, tracking_uri=tracker.uri)
                out["model_uri"] = info.model_uri
            except Exception as exc:  # noqa: BLE001 - a server that is down is reported below; others raise
                if not unreachable(exc):
                    raise
                tracker.go_offline(f"logging the model: {str(exc)[:300]}")
        if tracker.offline:
            ctx.log.warning("MLflow is offline: the model is not logged%s (models are not spooled); its weights "
                            "and config are in %s, and a later --force run of this stage logs it",
                            f" nor registered as {registered}" if registered else "", ctx.output)
            return shards, out
        if registered:
            version = str(info.registered_model_version)
            tracker.set_model_alias(registered, reg.alias, version)
            tracker.annotate_model_version(registered, version, version_tags(ctx, source, state),
                                           description=version_description(ctx, name, source, state))
            out.update(registered_model=registered, version=version, alias=reg.alias,
                       registry_uri=f"models:/{registered}@{reg.alias}")
            ctx.log.info("registered the model as models:/%s@%s (version %s)", registered, reg.alias, version)
        return shards, out
