"""The train stage: loss and gradients across workers, accumulation, checkpoints, worker loss, MLflow."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import tests.support.sources  # noqa: F401  (registers the demo_curated source stage)
from pipelines import configschema, spec
from pipelines.models import ModelRef, create
from pipelines.runner import StageFailed, run_job
from pipelines.stages.train import checkpoint, engine, parallel
from pipelines.stages.train.config import TrainConfig
from pipelines.stages.train.stage import plan_steps
from tests.conftest import mlflow_runs, write_job
from tests.support.net import free_port

BATCH = 8  # global batch of the equality checks


def _model(loss: str = "clip") -> torch.nn.Module:
    kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if loss == "siglip" else {}
    return create(ModelRef(arch="clip-tiny", seed=0), output_dict=True, **kwargs)[0].train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 64, 64, generator=g), torch.randint(1, 1000, (BATCH, 32), generator=g)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in engine.unwrap(model).named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[n] = g.detach().clone()
    return out


def _micro(images: torch.Tensor, texts: torch.Tensor, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n = len(images) // accum
    return [(images[i * n:(i + 1) * n], texts[i * n:(i + 1) * n]) for i in range(accum)]


CASES = [("clip", 1, "ddp"), ("clip", 2, "ddp"), ("siglip", 1, "ddp"), ("siglip", 2, "ddp"), ("clip", 1, "fsdp")]


def reference(loss: str, accum: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, the whole global batch: the numbers the workers must reproduce together."""
    model = _model(loss)
    opt = engine.optimizer(model, 0.0, 0.0, (0.9, 0.98), 1e-6)
    value = engine.step(model, engine.make_loss(loss, 0, 1), opt, _micro(*_batch(), accum))
    return value, _grads(model)


def _equality_worker(config: dict[str, Any]) -> None:
    """Each rank takes its slice of the global batch and runs the stage's own step and wrapping."""
    import ray.train
    from safetensors.torch import save_file

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    images, texts = _batch()
    per = BATCH // world
    images, texts = images[rank * per:(rank + 1) * per], texts[rank * per:(rank + 1) * per]
    for loss, accum, strategy in CASES:
        cfg = configschema.build(TrainConfig, {"loss": loss, "strategy": strategy})
        model = parallel.wrap(_model(loss), cfg, world, torch.device("cpu"))
        opt = engine.optimizer(engine.unwrap(model), 0.0, 0.0, (0.9, 0.98), 1e-6)
        value = engine.step(model, engine.make_loss(loss, rank, world), opt, _micro(images, texts, accum))
        grads = _grads(model)
        if rank == 0:
            name = f"{loss}-{accum}-{strategy}"
            save_file({k: v.contiguous() for k, v in grads.items()}, os.path.join(config["out"], f"{name}.safetensors"))
        Path(config["out"], f"{loss}-{accum}-{strategy}-loss-{rank}").write_text(repr(value))


def test_the_placement_group_cleaner_runs_only_where_the_state_api_answers(ray_local):
    """Local Ray has no dashboard: the cleaner's liveness poll could never answer, and its stop held every run's
    end for 12 s, so the trainer leaves it out; where the dashboard's address accepts connections it stays."""
    import socket

    from ray._private import ray_constants
    from ray.experimental import internal_kv
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from pipelines.stages.train.stage import state_api_available, trainer_class

    def callbacks(cls: type) -> list[type]:
        from ray.train import ScalingConfig

        return [type(c) for c in cls(lambda: None, scaling_config=ScalingConfig(num_workers=1))
                ._create_default_callbacks()]

    assert not state_api_available()
    local = trainer_class()
    assert issubclass(local, TorchTrainer) and PlacementGroupCleanerCallback not in callbacks(local)
    key, ns = ray_constants.DASHBOARD_ADDRESS, ray_constants.KV_NAMESPACE_DASHBOARD
    before = internal_kv._internal_kv_get(key, namespace=ns)
    with socket.create_server(("127.0.0.1", 0)) as server:  # a dashboard's port, as a cluster's head has one
        try:
            internal_kv._internal_kv_put(key, f"127.0.0.1:{server.getsockname()[1]}", namespace=ns)
            assert state_api_available() and trainer_class() is TorchTrainer
            assert PlacementGroupCleanerCallback in callbacks(TorchTrainer)
        finally:
            if before is None:
                internal_kv._internal_kv_del(key, namespace=ns)
            else:
                internal_kv._internal_kv_put(key, before, namespace=ns)


@pytest.mark.slow
def test_two_workers_give_the_loss_and_gradients_of_one_process_on_the_global_batch(tmp_path, ray_local):
    """Local loss with features gathered with gradients (ClipLoss, SigLipLoss), DDP and FSDP, with and
    without accumulation: the mean of the ranks' losses and the all-reduced gradients equal one process's."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from safetensors.torch import load_file

    from pipelines.stages.train.stage import trainer_class

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = trainer_class()(_equality_worker, train_loop_config={"out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="eq"))
    trainer.fit()
    for loss, accum, strategy in CASES:
        name = f"{loss}-{accum}-{strategy}"
        want_loss, want = reference(loss, accum)
        got_loss = sum(float(Path(tmp_path, f"{name}-loss-{r}").read_text()) for r in range(2)) / 2
        assert got_loss == pytest.approx(want_loss, rel=1e-5), name
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert set(got) == set(want) and len(want) > 20, name
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_accumulation_gives_the_step_of_the_whole_batch(loss):
    """Two micro-batches of 4 with cached features: the loss and every gradient of one batch of 8
    (the logit scale and bias included: they enter the loss once, not once per micro-batch)."""
    want_loss, want = reference(loss, 1)
    got_loss, got = reference(loss, 2)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_checkpoint_restores_model_optimizer_and_schedule_bit_for_bit(tmp_path):
    images, texts = _batch()
    model = _model()
    opt = engine.optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    sched = engine.scheduler(opt, 2, 10)
    loss_fn = engine.make_loss("clip", 0, 1)
    for _ in range(3):
        engine.step(model, loss_fn, opt, [(images, texts)])
        sched.step()
    msd, osd = checkpoint.full_state(model, opt)
    checkpoint.save(str(tmp_path / "ck"), msd, osd, sched, {"step": 3, "epoch": 0, "step_in_epoch": 3, "mlflow_run_id": "r"})

    other = create(ModelRef(arch="clip-tiny", seed=7), output_dict=True)[0].train()
    opt2 = engine.optimizer(other, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    sched2 = engine.scheduler(opt2, 2, 10)
    state = checkpoint.load(str(tmp_path / "ck"), other, opt2, sched2)
    assert state == {"step": 3, "epoch": 0, "step_in_epoch": 3, "mlflow_run_id": "r"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert sched2.last_epoch == sched.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
    # and the next step is the same step
    engine.step(model, loss_fn, opt, [(images, texts)])
    engine.step(other, loss_fn, opt2, [(images, texts)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_an_asynchronous_evaluation_logs_its_step_once_and_a_failed_one_is_named_with_its_cause(tmp_path):
    """Ray Train's validation function, called as its task calls it, on a checkpoint directory: the scores of
    the checkpoint's weights are logged at its step and kept under evals/; called again (a restarted
    validation) it logs nothing twice; a set that cannot load leaves its error for the driver, which names it."""
    import ray.train
    from mlflow import MlflowClient

    from pipelines.evaluation.config import EvalSet
    from pipelines.evaluation.live import LiveEvaluator
    from pipelines.stages.train import validate
    from pipelines.tracking import WorkerTracker

    model = _model()
    opt = engine.optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    msd, osd = checkpoint.full_state(model, opt)
    checkpoint.save(str(tmp_path / "ck"), msd, osd, engine.scheduler(opt, 2, 10), {"step": 7})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    tracker = WorkerTracker(uri, run_id, "j", "train", str(tmp_path / "spool"))
    held = EvalSet(name="held", builtin="demo_heldout", limit=12, tasks=["zeroshot"])
    evals = str(tmp_path / "out" / "evals")
    fn = validate.CheckpointEvaluator([held], "clip-tiny", 8, 1, False, tracker, evals)
    ckpt = ray.train.Checkpoint.from_directory(str(tmp_path / "ck"))
    threads = torch.get_num_threads()
    try:
        scores = fn(ckpt)
        assert scores == LiveEvaluator([held], "clip-tiny", 8, torch.device("cpu"))(model.eval())
        assert fn(ckpt) == scores
    finally:
        torch.set_num_threads(threads)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/held/acc1")] == \
        [(7, scores["eval/held/acc1"])]

    broken = EvalSet(name="gone", path=str(tmp_path / "missing.parquet"), tasks=["zeroshot"], classnames=["a", "b"])
    checkpoint.save(str(tmp_path / "ck9"), msd, osd, engine.scheduler(opt, 2, 10), {"step": 9})
    with pytest.raises(FileNotFoundError, match="dataset gone: no file matches .*missing.parquet"):
        validate.CheckpointEvaluator([broken], "clip-tiny", 8, 1, False, tracker, evals)(
            ray.train.Checkpoint.from_directory(str(tmp_path / "ck9")))
    torch.set_num_threads(threads)
    got, failed = validate.collect(evals, validate.eval_steps(10, 3))
    assert validate.eval_steps(10, 3) == [3, 6, 9, 10]
    assert got == []  # 7 is not one of the steps of that plan
    assert set(failed) == {3, 6, 9, 10} and failed[9].startswith("FileNotFoundError: dataset gone")
    assert failed[3].startswith("never run")
    assert validate.collect(evals, [7]) == ([7], {})


def test_gradient_checkpointing_and_bf16_autocast_run_the_same_step():
    images, texts = _batch()
    want_loss, want = reference("clip", 1)
    model = _model()
    model.set_grad_checkpointing(True)
    opt = engine.optimizer(model, 0.0, 0.0, (0.9, 0.98), 1e-6)
    loss = engine.step(model, engine.make_loss("clip", 0, 1), opt, [(images, texts)])
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, want[k], rtol=1e-5, atol=1e-7, msg=k)
    model = _model()
    opt = engine.optimizer(model, 0.0, 0.0, (0.9, 0.98), 1e-6)
    loss = engine.step(model, engine.make_loss("clip", 0, 1), opt, [(images, texts)],
                       autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert loss == pytest.approx(want_loss, rel=0.05) and loss != want_loss  # bf16 matmuls: close, not equal


@pytest.mark.slow
def test_a_compiled_model_takes_the_same_step():
    """torch.compile (inductor on CPU: about 40 s to compile here) is an option of the stage."""
    want_loss, want = reference("clip", 1)
    compiled = torch.compile(_model())
    assert engine.unwrap(compiled) is compiled._orig_mod
    opt = engine.optimizer(engine.unwrap(compiled), 0.0, 0.0, (0.9, 0.98), 1e-6)
    loss = engine.step(compiled, engine.make_loss("clip", 0, 1), opt, [_batch()])
    assert loss == pytest.approx(want_loss, rel=1e-4)
    for k, g in _grads(compiled).items():
        torch.testing.assert_close(g, want[k], rtol=1e-3, atol=1e-5, msg=k)


def test_a_checkpoint_that_carries_objects_is_refused(tmp_path):
    model = _model()
    opt = engine.optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    sched = engine.scheduler(opt, 2, 10)
    msd, osd = checkpoint.full_state(model, opt)
    checkpoint.save(str(tmp_path), msd, osd, sched, {"step": 0})
    torch.save({"state": {}, "param_groups": [], "evil": threading.Lock}, tmp_path / checkpoint.OPTIM_FILE)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        checkpoint.load(str(tmp_path), model, opt, sched)


def test_gains_biases_and_logit_scale_get_no_weight_decay():
    model = _model()
    opt = engine.optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    decayed = {id(p) for p in opt.param_groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 0.2
    assert "logit_scale" not in names and not any(n.endswith(".bias") or ".ln_" in n for n in names)
    assert "visual.conv1.weight" in names and "text_projection" in names
    assert len(names) + len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine_to_zero():
    f = [engine.lr_factor(s, 4, 20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(f[4:])) and f[-1] < 0.01


def test_too_little_data_for_one_step_is_a_clear_error():
    cfg = configschema.build(TrainConfig, {"workers": 2, "batch_size": 64})
    assert plan_steps(cfg, 1000) == (7, 7)
    assert plan_steps(configschema.build(TrainConfig, {"workers": 2, "batch_size": 64, "epochs": 3}), 1000) == (7, 21)
    with pytest.raises(ValueError, match="100 curated rows over 2 workers give no full step of batch_size 64"):
        plan_steps(cfg, 100)


def test_an_mlflow_model_cannot_initialise_training_and_says_so(tmp_path):
    with pytest.raises(Exception, match="stages.train.with.*model.model_uri cannot initialise training yet; give "
                                        "model.arch and model.checkpoint"):
        spec.load(train_job(tmp_path, model={"model_uri": "models:/x@y"}))


# ---- the stage, end to end on Ray ---------------------------------------------------------------------------


def train_job(tmp_path: Path, rows: int = 512, **train: Any) -> Path:
    with_ = {"workers": 2, "cpus_per_worker": 0.5, "batch_size": 32, "warmup": 2, "lr": 2e-3,
             "system_metrics": False, **train}
    return write_job(tmp_path, {"data": {"uses": "demo_curated", "with": {"rows": rows}},
                                "train": {"uses": "train", "needs": ["data"], "with": with_}},
                     ray={"address": "local"})


def train_run(store: Path) -> Any:
    runs = [r for r in mlflow_runs(store) if r.data.tags.get("clipline.stage") == "train"]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def history(store: Path, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# The job of one uninterrupted run, which two tests read: 40 steps (5 epochs of 8: 512 rows / 2 workers / 32),
# checkpoints every 5, a fixed data seed, the rows log, and an evaluation every 10 steps. The worker-kill test
# runs the same training (without the evaluation, which trains no row) and compares its rows with this run's.
WHOLE = {"steps": 40, "checkpoint_every": 5, "seed": 3, "log_rows": True}
HELD = {"name": "held", "builtin": "demo_heldout", "limit": 36}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, ray_local) -> tuple[Path, dict[str, Any]]:
    """(its directory, its outcomes by stage)"""
    root = tmp_path_factory.mktemp("whole")
    job = spec.load(train_job(root, eval_every=10, eval_datasets=[HELD], **WHOLE))
    return root, {o.stage: o for o in run_job(job, progress=False)}


@pytest.mark.slow
def test_two_workers_lower_the_loss_and_the_registered_model_loads_back(whole):
    from mlflow import MlflowClient

    root, outcomes = whole
    m = outcomes["train"].manifest
    assert m.counts["steps"] == 40 and m.counts["samples"] == 40 * 64
    store = root / "store"
    run = train_run(store)
    losses = [v for _, v in history(store, run.info.run_id)]
    assert len(losses) == 40
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    for key in ("train/lr", "train/logit_scale", "train/samples_per_s", "train/samples_per_s_per_worker",
                "train/worker_1/samples_per_s", "train/data_wait_fraction", "train/flops_per_s"):
        assert [s for s, _ in history(store, run.info.run_id, key)] == list(range(1, 41)), key
    assert "train/mfu" not in run.data.metrics  # no known peak on CPU
    assert run.data.params["plan.planned_steps"] == "40"

    # the published weights, and the registered model loaded by alias, give the same embeddings
    info = m.extra["model"]
    assert info["registry_uri"] == "models:/t-train@candidate"
    local, _, tok = create(ModelRef(arch="clip-tiny", checkpoint=os.path.join(m.location, info["weights"])))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    try:
        loaded, _, _ = create(ModelRef(model_uri=info["registry_uri"]))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    images, _ = _batch()
    text = tok(["a red circle at the left on a black background"])
    with torch.no_grad():
        assert torch.equal(local.encode_image(images), loaded.encode_image(images))
        assert torch.equal(local.encode_text(text), loaded.encode_text(text))
    config = json.loads(Path(m.location, info["config"]).read_text())
    assert config["arch"] == "clip-tiny" and config["embed_dim"] == 64

    # evaluation while training, asynchronously (Ray Train's validation of the checkpoint of each step): every 10
    # steps, the last one included; the ranks trained on while each ran (the loss of the step after it was logged
    # before its scores); the last equals the evaluate stage's own scoring of the published weights
    assert [s for s, _ in history(store, run.info.run_id, "eval/held/acc1")] == [10, 20, 30, 40]
    assert m.counts["evaluations"] == 4 and "clipline.train.evaluations_failed" not in run.data.tags
    logged = {k: {mm.step: mm.timestamp for mm in MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
                  .get_metric_history(run.info.run_id, k)} for k in ("train/loss", "eval/held/acc1")}
    assert all(logged["eval/held/acc1"][s] > logged["train/loss"][s + 1] for s in (10, 20, 30)), logged
    assert sorted(p.name for p in Path(m.location, "evals").iterdir()) == [f"step-{s:08d}.json" for s in (10, 20, 30, 40)]
    from pipelines.evaluation import datasets
    from pipelines.evaluation.embed import Embedder
    from pipelines.evaluation.tasks import score, texts

    data = datasets.builtin("demo_heldout", 64, 36)
    prompts, captions = texts(data, ["zeroshot", "retrieval"])
    threads = torch.get_num_threads()
    try:
        embedder = Embedder(ModelRef(arch="clip-tiny", checkpoint=os.path.join(m.location, info["weights"])))
        img, txt = (torch.from_numpy(embedder.embed(k, v)) for k, v in (("image", data.images),
                                                                        ("text", prompts + captions)))
    finally:
        torch.set_num_threads(threads)
    want = score(data, ["zeroshot", "retrieval"], img, txt)
    for task, key in (("zeroshot", "acc1"), ("zeroshot", "mean_per_class_recall"),
                      ("retrieval", "text_retrieval_recall@5")):
        got = history(store, run.info.run_id, f"eval/held/{key.replace('@', '_at_')}")[-1]
        assert got == (40, pytest.approx(want[task][key], abs=1e-6)), key


def _train_workers() -> list[int]:
    import psutil

    pids = []
    # this test process's own (Ray's processes descend from the driver that started them): another test process
    # of the suite may be training too
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:  # gone, or a zombie, since the listing
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(p.pid)
    return pids


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # replaced between the listing and the read
        return ""


def _kill_a_worker_after(store: Path, step: int, outcome: dict[str, Any], deadline: float = 240) -> None:
    """Wait (polling with a deadline) until Ray Train's controller has registered the checkpoint of `step`,
    then SIGKILL one training worker.

    A checkpoint on disk is not enough: the controller registers what the workers report when it next polls
    them, and writes `checkpoint_manager_snapshot.json` when it does; a kill before that restarts the group from
    the checkpoint before, or from none when training runs a few steps a second."""
    end = time.monotonic() + deadline
    name = f"checkpoint-{step:08d}"
    while time.monotonic() < end and "done" not in outcome:
        if any(name in _text(p) for p in store.glob("t/train/*/ray/train/checkpoint_manager_snapshot.json")):
            pids = _train_workers()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                outcome["killed"] = pids[-1]
                return
        time.sleep(0.05)


def _run_in_thread(job: Any) -> dict[str, Any]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = run_job(job, progress=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc
        finally:
            outcome["done"] = True

    outcome["thread"] = threading.Thread(target=target)
    outcome["thread"].start()
    return outcome


@pytest.mark.slow
def test_training_with_mlflow_down_spools_every_step_once_and_the_replay_sends_the_run(tmp_path, ray_local):
    """`tracking.required: false` and no server: the workers get an offline handle, spool their steps (no
    system metrics, no model logged), and the replay gives the train run each step once."""
    from mlflow import MlflowClient

    from pipelines import spool

    with_ = {"workers": 2, "cpus_per_worker": 0.5, "batch_size": 32, "warmup": 2, "lr": 2e-3, "steps": 6,
             "checkpoint_every": 3, "log_every": 4}
    path = write_job(tmp_path, {"data": {"uses": "demo_curated", "with": {"rows": 256}},
                                "train": {"uses": "train", "needs": ["data"], "with": with_}},
                     ray={"address": "local"}, tracking={"uri": f"http://127.0.0.1:{free_port()}", "required": False})
    m = {o.stage: o for o in run_job(spec.load(path), progress=False)}["train"].manifest
    assert m.counts["steps"] == 6 and m.extra["model"]["model_uri"] is None
    assert (Path(m.location) / m.extra["model"]["weights"]).is_file()
    uri = f"sqlite:///{tmp_path}/replayed.db"
    spool.replay(spool.default_dir(str(tmp_path / "store")), uri)
    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "t"]
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("clipline.stage") == "train"]
    assert run.info.status == "FINISHED" and run.data.params["plan.planned_steps"] == "6"
    for key in ("train/loss", "train/lr"):
        assert sorted(x.step for x in client.get_metric_history(run.info.run_id, key)) == list(range(1, 7)), key
    assert not any(k.startswith("system/") for k in run.data.metrics)


def _assert_one_continuous_run(store: Path, steps: int) -> Any:
    run = train_run(store)
    for key in ("train/loss", "train/lr"):
        assert [s for s, _ in history(store, run.info.run_id, key)] == list(range(1, steps + 1)), key
    return run


def _trained(manifest: Any, workers: int, steps: int, batch: int) -> Any:
    """The rows log of a `log_rows` run: each rank's every step once, with a full batch."""
    from pipelines.stages.train import data

    rows = data.trained_rows(manifest.extra["rows_log"])
    per_step = rows.groupby(["rank", "step"]).size()
    assert per_step.index.tolist() == [(r, s) for r in range(workers) for s in range(1, steps + 1)]
    assert set(per_step) == {batch}
    return rows


@pytest.mark.slow
def test_a_worker_killed_mid_run_restarts_from_the_last_checkpoint_and_trains_the_rows_of_an_uninterrupted_run(
        tmp_path, whole):
    """Exact resume: the restarted group trains, step by step and rank by rank, the rows (in the batches)
    that the same job trains uninterrupted (the `whole` run)."""
    job = spec.load(train_job(tmp_path, max_failures=2, **WHOLE))
    outcome = _run_in_thread(job)
    _kill_a_worker_after(tmp_path / "store", 10, outcome)
    outcome["thread"].join(timeout=600)
    assert "killed" in outcome, "no training worker was found to kill"
    assert "error" not in outcome, outcome.get("error")
    m = {o.stage: o for o in outcome["result"]}["train"].manifest
    assert m.counts["steps"] == 40
    run = _assert_one_continuous_run(tmp_path / "store", 40)
    restored = int(run.data.tags["clipline.train.restored_from_step"])
    assert 5 <= restored < 40 and restored % 5 == 0

    killed_rows, whole_rows = _trained(m, 2, 40, 32), _trained(whole[1]["train"].manifest, 2, 40, 32)
    assert killed_rows.equals(whole_rows)
    # 512 rows over 2 ranks: 8 steps of 32 an epoch; within an epoch the 2 ranks train 512 distinct rows
    first_epoch = whole_rows[whole_rows.step <= 8]
    assert first_epoch.row.nunique() == 512 and set(first_epoch.row) == set(range(512))


@pytest.mark.slow
def test_rerunning_a_job_whose_training_crashed_resumes_it_in_the_same_run(tmp_path, ray_local):
    """No worker-group restarts allowed: the kill fails the stage; the re-run resumes from the checkpoint
    (FSDP this time, so its sharded state goes through the checkpoint too)."""
    path = train_job(tmp_path, steps=30, checkpoint_every=5, max_failures=0, strategy="fsdp", log_rows=True,
                     eval_mode="inline", eval_datasets=[{"name": "held", "builtin": "demo_heldout", "limit": 12, "tasks": ["zeroshot"]}])
    outcome = _run_in_thread(spec.load(path))
    _kill_a_worker_after(tmp_path / "store", 10, outcome)
    outcome["thread"].join(timeout=600)
    assert "killed" in outcome and isinstance(outcome.get("error"), StageFailed), outcome
    assert "train" in str(outcome["error"])
    first = train_run(tmp_path / "store")
    assert first.info.status == "FAILED"

    outcomes = {o.stage: o for o in run_job(spec.load(path), progress=False)}
    assert outcomes["data"].state == "cached" and outcomes["train"].state == "ran"
    assert outcomes["train"].manifest.counts["steps"] == 30
    run = _assert_one_continuous_run(tmp_path / "store", 30)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["clipline.attempts"] == "2"
    losses = [v for _, v in history(tmp_path / "store", run.info.run_id)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses  # FSDP's sharded parameters do train
    assert int(run.data.tags["clipline.train.restored_from_step"]) >= 5
    # the end-of-training evaluation ran inline, through FSDP's sharded forward on both ranks
    assert [s for s, _ in history(tmp_path / "store", run.info.run_id, "eval/held/acc1")] == [30]
    # the seed drawn by the first attempt came back with its checkpoint: every step trained its planned rows
    from pipelines.stages.train import data

    m = outcomes["train"].manifest
    stream = data.Stream(urls=outcomes["data"].manifest.shard_urls(), rows=[s["rows"] for s in outcomes["data"].manifest.shards],
                         passes=4, seed=m.extra["data_seed"], fixed_order=False, window=256)
    rows = _trained(m, 2, 30, 32)
    for rank in range(2):
        planned = [i for item in data.rank_stream(stream, rank, 2) for _, ids in data.windows(item, stream.seed, 256, 64)
                   for i in ids.tolist()]
        assert rows[rows["rank"] == rank].row.tolist() == planned[:30 * 32]
