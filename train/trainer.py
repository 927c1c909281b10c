"""Continuous critic training on Ray Train (DESIGN.md §8): SFT from the replay buffer, a new critic
version published every ``steps_per_version`` optimizer steps.

``run_training`` starts a ``TorchTrainer`` whose workers

1. find the replay buffer and the weight registry actors by name,
2. load the registry's latest version (HF checkpoint directory) as the starting weights,
3. train with the masked SFT loss (``scrit.train.sft``) under DDP (``ray.train.torch.prepare_model``,
   gloo on CPU / NCCL on GPU) or DeepSpeed ZeRO (``DS_ACCELERATOR=cpu`` on CPU, over the process
   group Ray Train already set up),
4. every K optimizer steps: rank 0 writes ``run_dir/versions/vNNNN`` atomically (temp dir + rename,
   so a subscriber never sees a half-written checkpoint) and publishes a ``WeightVersion``; every
   rank then reports metrics through ``ray.train.report``,
5. stop once the registry holds version ``cfg.run.versions`` or the registry asks for a stop.

A worker that dies (killed, OOM, preempted, its node lost) makes Ray Train restart the worker group
(``FailureConfig``, ``faults.train_max_failures``); the loop then starts again at step 2 from the
registry's latest version, so at most the steps since the last published version are lost. A node
lost at the wrong moment can also fail Ray Train's controller itself (``ControllerError``, which its
failure policy does not retry): ``TrainerThread`` then starts training again, from the same place,
within the same budget. With ``train.min_workers`` the group is elastic and restarts on as many
workers as the remaining nodes fit.

Each published version's weights go into Ray's object store too, through the registry
(``run.weight_transport``; ``actors/registry.py``), so subscribers on any node reload from memory.

Each worker samples its own batch with ``current_version`` = the version being trained *from*, so with
``buffer.max_staleness = 0`` training after publishing version n waits until producers have made
version-n data: the paper's synchronous rounds, without any extra coordination.

Every decision that must be the same on all ranks (stop, "everyone has a batch") goes through a
small all-reduce, because a rank that leaves the loop alone, or enters backward alone, would hang
the others inside a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from scrit.checkpoints import checkpoint_checksum, trained_weights_path, version_dir
from scrit.messages import TrainingExample, WeightVersion
from scrit.train.budget import StepBudget, last_step
from scrit.weights import PackedWeights, mix_with_seed

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from scrit.config import ScritConfig

__all__ = [
    "TrainerThread",
    "run_training",
    "train_loop_per_worker",
    "build_train_loop_config",
    "deepspeed_config",
]

log = logging.getLogger(__name__)

SEED_INFO = "seed_info.json"  # marks the seed family (prompt-style detection); carried forward
TRAIN_INFO = "train_info.json"  # provenance of a published version
POLL_S = 0.5  # how long a starving worker sleeps before asking the buffer again
TRIM_EVERY = 1  # optimizer steps between handing freed memory back to the OS (scrit.memory; ~free)
REPLAN_EVERY = 5  # optimizer steps between re-planning the steps per version for the wall budget


# --------------------------------------------------------------------------------------------------
# Driver side


def build_train_loop_config(
    cfg: ScritConfig,
    run_dir: str | os.PathLike[str],
    buffer_name: str,
    registry_name: str,
    start_version: int = 0,
    *,
    namespace: str | None = None,
    chat_template: bool = False,
    deadline: float | None = None,
) -> dict[str, Any]:
    """The plain-dict ``train_loop_config`` every worker receives (plain builtins pickle anywhere).
    ``deadline``: when (``time.time()``) the last version should be out (``train/budget.py``); None:
    every version gets ``train.steps_per_version``."""
    return {
        "run_dir": str(Path(run_dir).resolve()),
        "buffer_name": buffer_name,
        "registry_name": registry_name,
        "namespace": namespace,
        "start_version": int(start_version),
        "target_version": int(cfg.run.versions),
        "seed": int(cfg.run.seed),
        "use_gpu": cfg.resources.train_worker_num_gpus > 0,
        "chat_template": bool(chat_template),
        "weight_transport": cfg.run.weight_transport,
        "train": msgspec.to_builtins(cfg.train),
        "metrics_run": cfg.run.name if cfg.metrics.enabled else None,  # rank 0 exports Prometheus metrics
        "deadline": deadline,
    }


def run_training(
    cfg: ScritConfig,
    run_dir: str | os.PathLike[str],
    buffer_name: str,
    registry_name: str,
    start_version: int = 0,
    *,
    namespace: str | None = None,
    chat_template: bool = False,
    deadline: float | None = None,
) -> Any:
    """Train until the registry holds version ``cfg.run.versions`` (or a stop is requested); blocks.

    ``start_version`` is the version the caller expects the registry's latest to be; workers refuse
    to start from an older one (that would mean the registry lost versions). It also names the Ray
    Train run, so a resumed run gets its own directory under ``run_dir/ray_train``. The buffer and
    registry actors must already exist under ``buffer_name`` / ``registry_name`` (in ``namespace``,
    default: the driver's). ``chat_template`` must match how the critic's backend wraps prompts.

    Returns Ray Train's ``Result`` (``result.metrics``: rank 0's last report). The driver runs this in
    a background thread.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = cfg.resources
    use_gpu = res.train_worker_num_gpus > 0
    resources: dict[str, float] = {"CPU": float(res.train_worker_num_cpus)}
    if use_gpu:
        resources["GPU"] = float(res.train_worker_num_gpus)
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.train.strategy == "deepspeed" and not use_gpu:
        # Must be in the worker's environment before deepspeed is first imported there.
        env_vars["DS_ACCELERATOR"] = "cpu"
    storage = Path(run_dir).resolve() / "ray_train"
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=build_train_loop_config(
            cfg, run_dir, buffer_name, registry_name, start_version,
            namespace=namespace, chat_template=chat_template, deadline=deadline,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train_workers(cfg), use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            storage_path=str(storage),
            # Unique per call: Ray Train v2 restores a run's state from a same-named directory.
            name=f"{cfg.run.name}-from-v{start_version:04d}-{time.strftime('%Y%m%d-%H%M%S')}",
            worker_runtime_env={"env_vars": env_vars},
            # A dead worker restarts the whole group, which resumes from the last published version.
            failure_config=FailureConfig(max_failures=cfg.faults.train_max_failures),
        ),
    )
    return trainer.fit()


def train_workers(cfg: ScritConfig) -> int | tuple[int, int]:
    """``ScalingConfig.num_workers``: a fixed count, or ``(min, max)`` for elastic training."""
    low = cfg.train.min_workers
    return cfg.train.num_workers if low is None or low >= cfg.train.num_workers else (low, cfg.train.num_workers)


class TrainerThread:
    """``run_training`` in a background thread of the driver (``TorchTrainer.fit`` blocks): the driver
    watches ``done`` and reads ``error`` while the pipeline keeps producing.

    A ``ControllerError`` (Ray Train's controller failed, e.g. on a worker whose node vanished while
    the group was being started or stopped) starts training again, up to ``faults.train_max_failures``
    times; each such restart is appended to ``restarts`` for the driver to report."""

    def __init__(self, cfg: ScritConfig, run_dir: str | os.PathLike[str], buffer_name: str, registry_name: str,
                 start_version: int, *, namespace: str | None = None, chat_template: bool = False,
                 deadline: float | None = None) -> None:
        import threading

        self.error: BaseException | None = None
        self.restarts: list[dict[str, Any]] = []
        self.done = threading.Event()
        self.max_restarts = cfg.faults.train_max_failures
        args = (cfg, run_dir, buffer_name, registry_name, start_version)
        options = {"namespace": namespace, "chat_template": chat_template, "deadline": deadline}
        self.thread = threading.Thread(target=self._run, args=(args, options), name="scrit-trainer", daemon=True)
        self.thread.start()

    def _run(self, args: tuple[Any, ...], options: dict[str, Any]) -> None:
        from ray.train import ControllerError

        try:
            while True:
                try:
                    run_training(*args, **options)
                    return
                except ControllerError as error:
                    if len(self.restarts) >= self.max_restarts:
                        raise
                    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    log.warning("Ray Train's controller failed (%s); training starts again", message)
                    self.restarts.append({"time": time.time(), "error": message})
        except BaseException as error:  # noqa: BLE001 - surfaced by the driver
            self.error = error
        finally:
            self.done.set()


# --------------------------------------------------------------------------------------------------
# Worker side


class _Collective:
    """The few cross-rank operations the loop needs; no-ops when training on a single process."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.device = device

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, "max")

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, "sum")

    def _reduce(self, values: list[float], op: str) -> list[float]:
        if not self.active:
            return list(values)
        import torch

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.MAX if op == "max" else self.dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()


def deepspeed_config(train: dict[str, Any], world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for ``train`` (a ``TrainConfig`` as a dict).

    ``bf16`` turns on DeepSpeed's own bf16 mode (bf16 weights, fp32 master copy in the optimizer); the
    loop asks for it on GPUs only. On CPU the engine stays fp32 and the loop autocasts to bf16 instead,
    which is what made CPU training 1.6x faster (DESIGN.md §11) and keeps published weights fp32.
    """
    zero: dict[str, Any] = {"stage": int(train["zero_stage"])}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": int(train["batch_size"]),
        "gradient_accumulation_steps": int(train["grad_accum"]),
        "train_batch_size": int(train["batch_size"]) * int(train["grad_accum"]) * world_size,
        "gradient_clipping": float(train["max_grad_norm"]),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 2**31 - 1,  # progress goes through ray.train.report, not DeepSpeed's log
        "wall_clock_breakdown": False,
    }


def lr_scheduler(optimizer: Any, train: dict[str, Any], total_steps: int, done_steps: int) -> Any:
    """The run's learning-rate schedule (transformers' schedulers) over all its optimizer steps.

    ``train.lr_schedule``: ``cosine`` (default) or ``linear`` warm up for ``warmup_steps`` and decay
    to 0 at ``total_steps`` = versions x steps_per_version, so the last versions change little and
    the final one is not a noisy snapshot; ``constant`` keeps the rate after the warm-up (open-ended
    training). A trainer that (re)starts at ``done_steps`` continues the schedule where it was.
    """
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[train["lr_schedule"]]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=int(train["warmup_steps"]),
                              num_training_steps=max(1, total_steps))
    for _ in range(min(done_steps, total_steps)):
        scheduler.step()  # LambdaLR: stepping is cheap and sets the optimizer's rate for step done_steps
    return scheduler


def _sample_batch(
    buffer: Any, registry: Any, collective: _Collective, tokenizer: Any, settings: dict[str, Any],
    version: int, stats: dict[str, float],
) -> dict[str, Any] | None:
    """Block until *every* rank holds an encoded batch (returns this rank's) or any rank sees a stop
    request (returns None on all ranks).

    A rank that got a batch keeps it while the others wait, and the ranks agree through a tiny
    all-reduce every poll, so nobody sits in a collective long enough to hit the process-group timeout
    while producers are still generating the next round.
    """
    import ray

    from scrit.train.sft import LossWeights, encode_examples, rehearsal_examples

    from scrit.memory import release_free_memory

    train = settings["train"]
    mine: dict[str, Any] | None = None
    waited_since: float | None = None
    while True:
        if mine is None:
            examples: list[TrainingExample] | None = ray.get(
                buffer.sample.remote(int(train["batch_size"]), version)
            )
            if examples:
                examples = list(examples) + rehearsal_examples(examples, float(train["rehearsal_share"]))
                encoded = encode_examples(
                    tokenizer, examples, int(train["max_seq_len"]), chat_template=settings["chat_template"],
                    weights=LossWeights.from_train_config(train),
                )
                stats["skipped"] += encoded["num_skipped"]
                if encoded["input_ids"].shape[0] > 0:
                    mine = encoded
        stop = bool(ray.get(registry.stop_requested.remote()))
        missing, any_stop = collective.max([0.0 if mine is not None else 1.0, 1.0 if stop else 0.0])
        if any_stop:
            return None
        if not missing:
            if waited_since is not None:
                stats["wait_s"] += time.monotonic() - waited_since
            return mine
        if waited_since is None:
            waited_since = time.monotonic()
            release_free_memory()  # the steps' activations, freed, go back to the OS while the trainer waits
        time.sleep(POLL_S)


def _resume_trained_weights(model: Any, run_dir: str, version: int) -> None:
    """With ``train.seed_share`` the published versions are mixes: start from the trainer's own weights
    at ``version`` (``_save_trained_weights``), or, where there are none (version 0, or a run that
    published without a mix), from the published ones already loaded."""
    from safetensors.torch import load_file

    path = trained_weights_path(run_dir, version)
    if version == 0 or not path.is_file():
        if version > 0:
            log.warning("no trained weights at %s: training on from published version %d (a mix)", path, version)
        return
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as error:  # a torn or foreign file: say which, and stop (the run's failure contract)
        raise RuntimeError(f"trained weights {path} cannot be loaded ({error}); delete the file to train on "
                           f"from published version {version}") from error


def _save_trained_weights(state: dict[str, Any], run_dir: str, version: int) -> None:
    """The trainer's own weights at ``version`` (safetensors, temp file + rename: complete or absent)."""
    from safetensors.torch import save_file

    path = trained_weights_path(run_dir, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    # clone: safetensors refuses tensors that share storage (tied embeddings)
    save_file({name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in state.items()}, str(tmp))
    os.replace(tmp, path)


def _save_version(
    model_for_saving: Any, state_dict: dict[str, Any] | None, tokenizer: Any, run_dir: str, version: int,
    source_uri: str, step: int, parent: int, seed_share: float = 0.0,
) -> Path:
    """Write the checkpoint to a temp dir beside its final place, then rename it into place.

    ``rename`` within one directory is atomic, so ``vNNNN`` either does not exist or is complete. A
    leftover ``vNNNN`` (a crash between rename and publish: never published, so nobody reads it) is
    replaced.
    """
    final = version_dir(run_dir, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    # transformers 5 always writes safetensors (its ``safe_serialization`` flag is gone).
    # a copy: save_pretrained drops tied keys (lm_head) from the dict it is given, and the caller then
    # puts the same dict into the object store, where a strict load needs every key
    model_for_saving.save_pretrained(str(tmp), state_dict=dict(state_dict) if state_dict is not None else None)
    tokenizer.save_pretrained(str(tmp))
    seed_info = Path(source_uri) / SEED_INFO
    if seed_info.is_file():
        shutil.copy2(seed_info, tmp / SEED_INFO)
    (tmp / TRAIN_INFO).write_text(
        json.dumps({"version": version, "step": step, "parent_version": parent, "parent_uri": source_uri,
                    "seed_share": seed_share}, indent=2) + "\n"
    )
    if final.exists():
        stale = final.parent / f".{final.name}.stale-{uuid.uuid4().hex[:8]}"
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, final)
    return final


def _append_train_metrics(run_dir: str, metrics: dict[str, Any]) -> None:
    """One JSON line per published version in ``run_dir/train_metrics.jsonl`` (read by the run report)."""
    line = json.dumps({"kind": "train", "time": time.time(), **metrics})
    with open(Path(run_dir) / "train_metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def _start_metrics(config: dict[str, Any], registry: Any, world: int) -> Any:
    """Rank 0's Prometheus exporter (when ``metrics.enabled``); its URL goes to the registry actor,
    from which the driver adds it to ``prometheus_targets.json``. Returns a ``TrainMeter`` or None."""
    run = config.get("metrics_run")
    if not run:
        return None
    import ray

    from scrit import telemetry

    try:
        url = telemetry.start_exporter(run=run)
        ray.get(registry.register_metrics_target.remote("trainer", url))
    except Exception as error:  # noqa: BLE001 - metrics must never stop training
        log.warning("trainer metrics exporter not started: %s", error)
    return telemetry.TrainMeter(world)


def _report(metrics: dict[str, Any], published: WeightVersion | None) -> None:
    """``ray.train.report`` on every rank (it is a barrier in Ray Train v2), with a pointer checkpoint
    from rank 0.

    Ray Train v2 keeps only metrics that come with a checkpoint (``Result.metrics`` is otherwise
    None), so rank 0 attaches a tiny one: ``weight_version.json`` naming the published version. The
    weights themselves stay in ``run_dir/versions``; this gives ``Result.metrics`` /
    ``metrics_dataframe`` one row per version, and Ray's checkpoint list points at the versions.
    """
    import tempfile

    import ray.train

    if published is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="scrit-report-") as tmp:
        (Path(tmp) / "weight_version.json").write_bytes(msgspec.json.encode(published))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_v{published.version:04d}",
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function; ``config`` comes from ``build_train_loop_config``."""
    train = config["train"]
    strategy = train["strategy"]
    if strategy == "deepspeed" and not config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported in this process

    import ray
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from scrit.backends.hf import load_tokenizer
    from scrit.memory import release_free_memory
    from scrit.train.sft import loss_denominator, sft_loss, split_rows

    from scrit.rundir import record_process

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    record_process(config["run_dir"], f"trainer.rank{rank}")  # a restarted worker group shows up again
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # fractional-CPU workers: more threads only fight each other
    elif device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL object collectives use the current device
    torch.manual_seed(int(config["seed"]) + rank)
    collective = _Collective(device)

    buffer = ray.get_actor(config["buffer_name"], namespace=config["namespace"])
    registry = ray.get_actor(config["registry_name"], namespace=config["namespace"])
    meter = _start_metrics(config, registry, world) if rank == 0 else None
    # Rank 0 decides the starting point so that every rank loads the same weights.
    latest: WeightVersion = collective.broadcast(ray.get(registry.latest.remote()) if rank == 0 else None)
    if latest.version < config["start_version"]:
        raise RuntimeError(
            f"registry's latest version is {latest.version}, older than start_version "
            f"{config['start_version']}: refusing to train from the wrong weights"
        )
    version, step = int(latest.version), int(latest.step)
    target = int(config["target_version"])
    if version >= target:
        return

    tokenizer = load_tokenizer(latest.uri)
    model = AutoModelForCausalLM.from_pretrained(latest.uri, dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    model.train()
    seed_share = float(train["seed_share"])
    seed_state: dict[str, Any] | None = None
    if seed_share > 0:
        _resume_trained_weights(model, config["run_dir"], version)
        if rank == 0:  # rank 0 publishes, so it alone needs the seed's weights
            seed_uri = ray.get(registry.get.remote(0)).uri
            seed_state = AutoModelForCausalLM.from_pretrained(
                seed_uri, dtype=torch.float32, local_files_only=True).state_dict()

    lr, ga = float(train["lr"]), max(1, int(train["grad_accum"]))
    bf16_supported = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    want_bf16 = bool(train["bf16"]) and bf16_supported
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=float(train["weight_decay"]))
    base_optimizer = optimizer  # a re-planned schedule is built on it (DeepSpeed wraps ``optimizer``)
    steps_per_version = int(train["steps_per_version"])  # re-planned to fit the wall budget (train/budget.py)
    budget = StepBudget(steps_per_version, config.get("deadline"))
    total_steps = last_step(step, 0, steps_per_version, target - version)  # = versions x steps on a fresh run
    scheduler = lr_scheduler(optimizer, train, total_steps, step)

    published: WeightVersion | None = None
    engine = None
    if strategy == "deepspeed":
        import deepspeed

        ds_bf16 = want_bf16 and device.type == "cuda"
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(train, world, ds_bf16),
        )
        autocast_bf16 = want_bf16 and not ds_bf16
        forward_model: Any = engine
    else:
        forward_model = ray.train.torch.prepare_model(model)
        autocast_bf16 = want_bf16
    # Each micro-batch one row at a time: a CPU spends as much on a pad position as on a real token
    # (train/sft.py split_rows); a GPU runs the padded batch faster, and DeepSpeed counts micro-steps itself.
    split = train["split_rows"]
    by_rows = engine is None and (split is True or (split == "auto" and device.type == "cpu"))

    def unwrapped() -> Any:
        if engine is not None:
            return engine.module
        return getattr(forward_model, "module", forward_model)

    def autocast() -> Any:
        if not autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    stats = {"skipped": 0.0, "wait_s": 0.0}
    window = {"loss_sum": 0.0, "micro": 0, "tokens": 0, "target_tokens": 0, "compute_s": 0.0}
    window_started = time.monotonic()
    grad_norm = float("nan")
    micro = 0
    local_steps = 0
    parent_uri, parent_version = latest.uri, version
    version_steps = 0  # optimizer steps since the last published version
    first_step_at: float | None = None  # the pace is measured from the first step's end (not the model load)
    while version < target:
        batch = _sample_batch(buffer, registry, collective, tokenizer, config, version, stats)
        if batch is None:
            log.info("rank %d: stop requested at version %d, step %d", rank, version, step)
            break
        started = time.monotonic()
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        boundary = (micro + 1) % ga == 0
        if engine is not None:
            with autocast():
                loss, n_target = sft_loss(engine, batch)
            engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            engine.step()  # steps the optimizer and scheduler only at an accumulation boundary
            if boundary:
                norm = engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else float("nan")
        else:
            pieces = split_rows(batch) if by_rows else [batch]
            denominator = loss_denominator(batch)  # the pieces' losses add up to the micro-batch's
            loss, n_target = 0.0, 0
            for index, piece in enumerate(pieces):
                sync = contextlib.nullcontext()
                if not (boundary and index == len(pieces) - 1) and hasattr(forward_model, "no_sync"):
                    sync = forward_model.no_sync()  # all-reduce gradients once per optimizer step
                with sync:
                    with autocast():
                        piece_loss, piece_target = sft_loss(forward_model, piece, denominator)
                    (piece_loss / ga).backward()
                loss += float(piece_loss.detach())
                n_target += piece_target
            if boundary:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(forward_model.parameters(), float(train["max_grad_norm"])))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        micro += 1
        window["loss_sum"] += float(loss)
        window["micro"] += 1
        window["tokens"] += int(batch["attention_mask"].sum())
        window["target_tokens"] += n_target
        window["compute_s"] += time.monotonic() - started
        if not boundary:
            continue
        step += 1
        local_steps += 1
        version_steps += 1
        if first_step_at is None:
            first_step_at = time.monotonic()
        elif local_steps % REPLAN_EVERY == 0:
            seconds_per_step = (time.monotonic() - first_step_at) / (local_steps - 1)
            planned = budget.plan(time.time(), seconds_per_step, target - version, version_steps)
            (negative,) = collective.max([-float(planned)])  # every rank takes the smallest plan
            if int(-negative) != steps_per_version:
                steps_per_version = int(-negative)
                total_steps = last_step(step - version_steps, version_steps, steps_per_version, target - version)
                scheduler = lr_scheduler(base_optimizer, train, max(total_steps, step + 1), step)
                if engine is not None:
                    engine.lr_scheduler = scheduler  # DeepSpeed steps the scheduler it holds
                log.info("rank %d: %d steps per version to fit the wall budget (%.2f s per step, %d versions "
                         "left)", rank, steps_per_version, seconds_per_step, target - version)
        if local_steps % TRIM_EVERY == 0:
            release_free_memory()  # bounds what freed activations of varying lengths leave resident
        if meter is not None:
            meter.step(step, window)
        if version_steps < steps_per_version:
            continue
        version_steps = 0

        # ---- publish a version -------------------------------------------------------------------
        version += 1
        state_dict = None
        if engine is not None and int(train["zero_stage"]) == 3:
            state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        if rank == 0:
            if seed_state is not None:  # publish the mix; keep training (and resume) from the trained weights
                trained = state_dict if state_dict is not None else unwrapped().state_dict()
                _save_trained_weights(trained, config["run_dir"], version)
                state_dict = mix_with_seed(trained, seed_state, seed_share)
            path = _save_version(unwrapped(), state_dict, tokenizer, config["run_dir"], version, parent_uri,
                                 step, parent_version, seed_share)
            published = WeightVersion(version=version, uri=str(path), checksum=checkpoint_checksum(path), step=step)
            in_memory = None
            if config["weight_transport"] == "object_store":  # put once; subscribers reload from memory
                in_memory = PackedWeights.pack(state_dict if state_dict is not None else unwrapped().state_dict())
            ray.get(registry.publish.remote(published, in_memory))
            del in_memory
            if seed_state is not None:
                trained_weights_path(config["run_dir"], version - 1).unlink(missing_ok=True)  # only the latest resumes
            if meter is not None:
                meter.published(version)
            log.info("published critic version %d (step %d) at %s", version, step, path)
            parent_uri = str(path)
        parent_version = version
        collective.barrier()  # nobody samples for the new version before it is published

        loss_sum, n_micro, tokens, target_tokens, compute_s, skipped = collective.sum(
            [window["loss_sum"], window["micro"], window["tokens"], window["target_tokens"],
             window["compute_s"], stats["skipped"]]
        )
        (slowest_compute,) = collective.max([window["compute_s"]])
        metrics = {
            "loss": loss_sum / max(n_micro, 1),
            "tokens_per_s": tokens / slowest_compute if slowest_compute > 0 else 0.0,
            "target_tokens": target_tokens,
            "step": step,
            "version": version,
            "lr": float(scheduler.get_last_lr()[0]) if hasattr(scheduler, "get_last_lr") else lr,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else -1.0,
            "wait_s": stats["wait_s"],
            "tokens": tokens,  # all ranks, since the previous version
            "wall_s": time.monotonic() - window_started,  # sampling, waiting, compute and publishing
            "skipped_examples": skipped,
            "steps_per_version": steps_per_version,  # as re-planned for the wall budget
        }
        if rank == 0:
            _append_train_metrics(config["run_dir"], metrics)
        _report(metrics, published if rank == 0 else None)
        window = {"loss_sum": 0.0, "micro": 0, "tokens": 0, "target_tokens": 0, "compute_s": 0.0}
        window_started = time.monotonic()
