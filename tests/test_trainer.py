"""Continuous training on a real local Ray cluster: DDP over gloo and DeepSpeed ZeRO-2 on CPU, two
workers each, publishing versions into a real registry from a real replay buffer."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from scrit.actors.registry import weight_registry_actor  # noqa: E402
from scrit.actors.replay_buffer import replay_buffer_actor  # noqa: E402
from scrit.backends.hf import load_tokenizer  # noqa: E402
from scrit.config import ResourcesConfig, RunConfig, ScritConfig, TrainConfig  # noqa: E402
from scrit.messages import TrainingExample  # noqa: E402
from scrit.checkpoints import checkpoint_checksum, version_dir  # noqa: E402
from scrit.train.trainer import deepspeed_config, run_training  # noqa: E402

try:
    from openai_server import save_tiny_model
except ImportError:  # tests/ imported as a package
    from tests.openai_server import save_tiny_model


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_session):
    """Every test here runs Ray Train on the session's local Ray."""
    return ray_session


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seed") / "model"
    save_tiny_model(str(path), seed=0)
    (path / "seed_info.json").write_text(json.dumps({"family": "test"}))  # must travel to every version
    return path


def examples(n: int, version: int) -> list[TrainingExample]:
    """n balanced examples in the critique format (content does not matter to the trainer)."""
    out = []
    for i in range(n):
        correct = i % 2 == 0
        out.append(TrainingExample(
            prompt=f"Start with {i + 2}. Add 3. What is the result?\nStep 1: {i + 2} + 3 = {i + 5 + (0 if correct else 1)}\n",
            target=f"Step 1: {'correct' if correct else 'wrong'}\nConclusion: {'correct' if correct else 'wrong at step 1'}\n",
            student_correct=correct, problem_id=f"p{i}", version=version,
        ))
    return out


def make_cfg(name: str, strategy: str, versions: int) -> ScritConfig:
    return ScritConfig(
        run=RunConfig(name=name, versions=versions, seed=0),
        train=TrainConfig(strategy=strategy, zero_stage=2, num_workers=2, lr=3e-3, batch_size=2, grad_accum=1,
                          steps_per_version=2, max_seq_len=256, bf16=True, warmup_steps=1),
        resources=ResourcesConfig(train_worker_num_cpus=0.5),
    )


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_model(path).state_dict().items()}


def wait_for_version(registry, version: int, timeout: float = 300):
    """The registry's latest version once it is >= ``version`` (None after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = ray.get(registry.latest.remote())
        if latest.version >= version:
            return latest
        time.sleep(0.2)
    return None


def check_versions(run_dir: Path, seed_dir: Path, history: list, expect: int) -> None:
    """Versions 1..expect published in order, each a complete, loadable, checksummed checkpoint whose
    weights moved away from the seed (and from the version before)."""
    assert [v.version for v in history] == list(range(expect + 1))
    assert [v.step for v in history] == [2 * n for n in range(expect + 1)]
    previous = load_state(seed_dir)
    seed_ids = load_tokenizer(seed_dir)("Step 1: 12 + 5 = 17")["input_ids"]
    for published in history[1:]:
        path = version_dir(run_dir, published.version)
        assert published.uri == str(path) and path.is_dir()
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
        assert published.checksum == checkpoint_checksum(path)
        assert json.loads((path / "seed_info.json").read_text()) == {"family": "test"}
        assert json.loads((path / "train_info.json").read_text())["version"] == published.version
        assert load_tokenizer(path)("Step 1: 12 + 5 = 17")["input_ids"] == seed_ids
        state = load_state(path)
        assert state.keys() == previous.keys()
        assert any(not torch.equal(state[k], previous[k]) for k in state), f"v{published.version} did not train"
        assert all(torch.isfinite(t).all() for t in state.values())
        previous = state
    leftovers = [p.name for p in (run_dir / "versions").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temp dirs were renamed into place, none left half-written


def test_ddp_two_workers_synchronous_rounds_and_stop(tmp_path: Path, seed_dir: Path) -> None:
    """max_staleness=0: after v1 the trainer must wait for version-1 data; a stop request ends it
    cleanly (no hang in a collective) before the configured 3 versions."""
    run_dir = tmp_path / "run"
    buffer = replay_buffer_actor(num_cpus=0.25, actor_options={"name": "buf-ddp"}, run_dir=str(run_dir),
                                 max_staleness=0, sync=False)
    registry = weight_registry_actor(run_dir, seed_dir, name="reg-ddp")
    ray.get(buffer.put.remote(examples(40, version=0)))

    observed: dict[str, object] = {}

    def producer() -> None:
        """Plays the self-play producers: version-1 data only after v1 exists, then a stop after v2."""
        wait_for_version(registry, 1)
        time.sleep(3.0)  # the trainer is now starving (v0 data is too stale)
        observed["latest_before_data"] = ray.get(registry.latest.remote()).version
        ray.get(buffer.put.remote(examples(40, version=1)))
        latest = wait_for_version(registry, 2)
        observed["v2"] = latest.version if latest else None
        ray.get(registry.request_stop.remote())

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    started = time.monotonic()
    result = run_training(make_cfg("ddp", "ddp", versions=3), run_dir, "buf-ddp", "reg-ddp")
    elapsed = time.monotonic() - started
    thread.join(timeout=60)

    assert observed["latest_before_data"] == 1  # no v2 without version-1 data: synchronous rounds
    assert observed["v2"] == 2
    history = ray.get(registry.history.remote())
    check_versions(run_dir, seed_dir, history, expect=2)  # stopped before v3
    assert result.metrics["version"] == 2 and result.metrics["step"] == 4
    assert result.metrics["loss"] > 0 and result.metrics["tokens_per_s"] > 0
    assert result.metrics["wait_s"] >= 2.0  # it really waited for the producers
    assert list(result.metrics_dataframe["version"]) == [1, 2]  # one report per published version
    with result.checkpoint.as_directory() as pointer:  # Ray's checkpoint points at the published version
        assert json.loads((Path(pointer) / "weight_version.json").read_text())["uri"] == history[2].uri
    print(f"ddp run took {elapsed:.1f}s")
    ray.kill(buffer)
    ray.kill(registry)


def test_deepspeed_config_shape() -> None:
    cfg = make_cfg("x", "deepspeed", 2).train
    import msgspec

    ds = deepspeed_config(msgspec.to_builtins(cfg), world_size=2, bf16=False)
    assert ds["train_batch_size"] == 2 * 1 * 2 and ds["zero_optimization"] == {"stage": 2}
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": False}
    stage3 = deepspeed_config({**msgspec.to_builtins(cfg), "zero_stage": 3}, world_size=1, bf16=True)
    assert stage3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.slow
def test_deepspeed_zero2_two_workers_on_cpu(tmp_path: Path, seed_dir: Path) -> None:
    """~30 s, but > 60 s on a fresh machine: DeepSpeed's CPU comm backend JIT-compiles its
    ``deepspeed_shm_comm`` op (cached in ~/.cache/torch_extensions) the first time it starts."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    buffer = replay_buffer_actor(num_cpus=0.25, actor_options={"name": "buf-ds"}, run_dir=str(run_dir),
                                 max_staleness=4, sync=False)
    registry = weight_registry_actor(run_dir, seed_dir, name="reg-ds")
    ray.get(buffer.put.remote(examples(40, version=0)))
    started = time.monotonic()
    result = run_training(make_cfg("ds", "deepspeed", versions=2), run_dir, "buf-ds", "reg-ds")
    elapsed = time.monotonic() - started
    history = ray.get(registry.history.remote())
    check_versions(run_dir, seed_dir, history, expect=2)
    assert result.metrics["version"] == 2 and result.metrics["loss"] > 0
    print(f"deepspeed run took {elapsed:.1f}s")
    ray.kill(buffer)
    ray.kill(registry)
    assert os.environ.get("DS_ACCELERATOR") in (None, "cpu")  # the driver's env was not needed


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_a_trainer_behind_its_wall_budget_publishes_smaller_versions_and_ends_its_schedule(
        tmp_path: Path, seed_dir: Path, strategy: str) -> None:
    """A deadline already past (a machine far too slow for the budget): the steps per version are
    re-planned down to MIN_STEPS_PER_VERSION, every version is still published, and the learning rate
    reaches 0 at the last one (the re-planned schedule is the one the optimizer follows)."""
    from scrit.train.budget import MIN_STEPS_PER_VERSION

    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    buffer = replay_buffer_actor(num_cpus=0.25, actor_options={"name": f"buf-budget-{strategy}"},
                                 run_dir=str(run_dir), max_staleness=10, sync=False)
    registry = weight_registry_actor(run_dir, seed_dir, name=f"reg-budget-{strategy}")
    ray.get(buffer.put.remote(examples(40, version=0)))
    cfg = make_cfg(f"budget-{strategy}", strategy, versions=2)
    cfg.train.num_workers, cfg.train.steps_per_version = 1, 12
    result = run_training(cfg, run_dir, f"buf-budget-{strategy}", f"reg-budget-{strategy}", deadline=time.time())
    history = ray.get(registry.history.remote())
    assert [v.step for v in history] == [0, MIN_STEPS_PER_VERSION, 2 * MIN_STEPS_PER_VERSION]  # not 12 and 24
    assert list(result.metrics_dataframe["steps_per_version"]) == [MIN_STEPS_PER_VERSION] * 2
    assert result.metrics["lr"] == pytest.approx(0.0)
    ray.kill(buffer)
    ray.kill(registry)


def test_published_versions_mix_in_the_seed_and_a_restart_trains_on_from_the_trained_weights(
        tmp_path: Path, seed_dir: Path) -> None:
    """train.seed_share 0.5: every published version is half the seed's weights, half the trainer's;
    the trainer's own weights stay in run_dir/trained (the latest only), and a restarted trainer loads
    those, not the published mix; a torn file there is an error that names it."""
    from safetensors.torch import load_file

    from scrit.checkpoints import trained_weights_path
    from scrit.train.trainer import _resume_trained_weights

    run_dir = tmp_path / "run"
    buffer = replay_buffer_actor(num_cpus=0.25, actor_options={"name": "buf-mix"}, run_dir=str(run_dir),
                                 max_staleness=10, sync=False)
    registry = weight_registry_actor(run_dir, seed_dir, name="reg-mix")
    ray.get(buffer.put.remote(examples(40, version=0)))
    cfg = make_cfg("mix", "ddp", versions=2)
    cfg.train.num_workers, cfg.train.seed_share = 1, 0.5
    run_training(cfg, run_dir, "buf-mix", "reg-mix")
    assert ray.get(registry.latest.remote()).version == 2
    assert not trained_weights_path(run_dir, 1).exists() and trained_weights_path(run_dir, 2).is_file()
    seed, published = load_state(seed_dir), load_state(version_dir(run_dir, 2))
    trained = load_file(str(trained_weights_path(run_dir, 2)))
    assert any(not torch.allclose(trained[k], seed[k]) for k in seed)  # it trained
    for name in seed:
        torch.testing.assert_close(published[name], 0.5 * trained[name] + 0.5 * seed[name])
    assert json.loads((version_dir(run_dir, 2) / "train_info.json").read_text())["seed_share"] == 0.5
    (stored,) = ray.get(registry.weights.remote(2))  # what subscribers load from the object store
    in_memory = ray.get(stored).tensors()
    assert in_memory.keys() == seed.keys()  # every key, tied lm_head too
    for name in seed:
        torch.testing.assert_close(in_memory[name], published[name])

    restarted = load_model(version_dir(run_dir, 2))  # what a restarted trainer loads first: the mix
    _resume_trained_weights(restarted, str(run_dir), 2)
    for name, tensor in restarted.state_dict().items():
        assert torch.equal(tensor, trained[name])
    trained_weights_path(run_dir, 2).write_bytes(b"torn")
    with pytest.raises(RuntimeError, match="v0002.safetensors"):
        _resume_trained_weights(restarted, str(run_dir), 2)
    ray.kill(buffer)
    ray.kill(registry)


def test_lr_schedule_warms_up_decays_to_zero_and_resumes_where_it_was() -> None:
    from scrit.train.trainer import lr_scheduler

    def rates(schedule: str, total: int, done: int = 0, steps: int = 0) -> list[float]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = lr_scheduler(optimizer, {"lr_schedule": schedule, "warmup_steps": 2}, total, done)
        out = [optimizer.param_groups[0]["lr"]]
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            out.append(optimizer.param_groups[0]["lr"])
        return out

    cosine = rates("cosine", total=10, steps=10)
    assert cosine[0] == 0.0 and cosine[2] == pytest.approx(1e-3) and cosine[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))  # decays after the warm-up
    assert rates("cosine", total=10, done=6)[0] == pytest.approx(cosine[6])  # a restart continues
    assert rates("constant", total=10, steps=10)[-1] == pytest.approx(1e-3)
    assert rates("linear", total=10, steps=6)[-1] == pytest.approx(1e-3 * 4 / 8)
