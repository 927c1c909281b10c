"""Structure of the cluster deployment files: deploy/runtime_env.yaml and the KubeRay manifests.

Nothing here needs Kubernetes or a GPU: the manifests are read with PyYAML and checked against what
KubeRay (ray.io/v1) expects and against the scrit config they run, so that a renamed config, a Ray
upgrade or a resized cluster that no longer fits the config fails here rather than on the cluster.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from scrit.config import ScritConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFESTS = {"rayjob": DEPLOY / "kuberay" / "rayjob.yaml", "raycluster": DEPLOY / "kuberay" / "raycluster.yaml"}
SCRIT_METRICS_PORT = 8080


def _ray_major_minor() -> str:
    import ray

    return ".".join(ray.__version__.split(".")[:2])


def _load(name: str) -> dict:
    return yaml.safe_load(MANIFESTS[name].read_text())


def _cluster_spec(name: str) -> dict:
    doc = _load(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _ray_container(group: dict) -> dict:
    containers = group["template"]["spec"]["containers"]
    assert containers, "a pod template without containers"
    return containers[0]  # KubeRay runs Ray in the first container


def _gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _entrypoint_config() -> tuple[list[str], Path]:
    argv = shlex.split(_load("rayjob")["spec"]["entrypoint"])
    assert argv[:2] == ["scrit", "run"], argv
    config = REPO / argv[argv.index("--config") + 1]
    return argv, config


# --- deploy/runtime_env.yaml ------------------------------------------------------------------------


def test_runtime_env_is_valid_for_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    RuntimeEnv(**data)  # raises on unknown fields or wrong types
    assert "working_dir" not in data  # `ray job submit --working-dir .` supplies it
    env = data["env_vars"]
    assert all(isinstance(v, str) for v in env.values())  # Ray rejects non-string env values
    assert env["HF_HUB_OFFLINE"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert "OMP_NUM_THREADS" not in env  # Ray sets it per actor from its CPUs
    assert not any(k.startswith("RAY_AUTH") for k in env)  # never ship the cluster's token in a file
    assert ".git/" in data["excludes"] and "runs/" in data["excludes"]


# --- KubeRay manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_is_a_ray_io_v1_resource(name: str) -> None:
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"rayjob": "RayJob", "raycluster": "RayCluster"}[name]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # a DNS-1123 label
    spec = _cluster_spec(name)
    assert spec["rayVersion"].startswith(_ray_major_minor() + "."), "rayVersion must match the installed Ray"
    assert spec["authOptions"]["mode"] == "token"  # Ray token auth stays on, as on the dev machines


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_head_and_gpu_workers(name: str) -> None:
    spec = _cluster_spec(name)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # jobs API reachable through the service
    head_container = _ray_container(head)
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265, 10001}
    assert _gpus(head_container) == 0 and head["rayStartParams"].get("num-gpus") == "0"

    workers = spec["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = _ray_container(group)
        assert _gpus(container) >= 1
        requests = container["resources"]["requests"]
        assert int(requests["nvidia.com/gpu"]) == _gpus(container)  # extended resources: requests == limits
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)

    images = set()
    for _, group in _groups(spec):
        container = _ray_container(group)
        assert container["image"] and ":" in container["image"]  # a pinned tag, never an implicit latest
        images.add(container["image"])
        limits = container["resources"]["limits"]
        assert limits["cpu"] and limits["memory"]
    assert len(images) == 1  # head and workers must run the same Ray and scrit
    (image,) = images
    assert f"ray{spec['rayVersion']}" in image


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_prometheus_annotations(name: str) -> None:
    spec = _cluster_spec(name)
    for group_name, group in _groups(spec):
        annotations = group["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        ray_port = group["rayStartParams"]["metrics-export-port"]
        assert annotations["scrit.dev/ray-metrics-port"] == ray_port
        ports = {p["name"]: p["containerPort"] for p in _ray_container(group)["ports"]}
        assert ports["metrics"] == int(ray_port)  # KubeRay's name for Ray's metrics port
        if group_name == "head":  # scrit's driver exporter (metrics.port) runs on the head
            assert annotations["prometheus.io/port"] == str(SCRIT_METRICS_PORT)
            assert ports["scrit-metrics"] == SCRIT_METRICS_PORT
            assert int(ray_port) != SCRIT_METRICS_PORT
        else:
            assert annotations["prometheus.io/port"] == ray_port


def test_rayjob_and_raycluster_describe_the_same_cluster() -> None:
    job, cluster = _cluster_spec("rayjob"), _cluster_spec("raycluster")
    assert job == cluster


# --- the config the RayJob runs ----------------------------------------------------------------------


def test_rayjob_entrypoint_runs_a_config_from_the_repo() -> None:
    _, config = _entrypoint_config()
    assert config.is_file(), f"{config} does not exist"
    assert config.parent == REPO / "configs"
    assert isinstance(load_config(config), ScritConfig)
    runtime_env = yaml.safe_load(_load("rayjob")["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"  # where deploy/Dockerfile puts the repository
    assert "WORKDIR /app" in (DEPLOY / "Dockerfile").read_text()
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_the_config_fits_the_cluster() -> None:
    _, config_path = _entrypoint_config()
    cfg = load_config(config_path)
    spec = _cluster_spec("rayjob")
    res = cfg.resources
    engines = cfg.critic.engines + sum(s.engines for s in cfg.solvers) + (1 if cfg.corrector.model else 0)
    needed = engines * res.engine_num_gpus + cfg.train.num_workers * res.train_worker_num_gpus
    if cfg.serve.enabled:
        needed += res.serve_replicas * res.serve_replica_num_gpus
    available = sum(g["replicas"] * _gpus(_ray_container(g)) for g in spec["workerGroupSpecs"])
    assert 0 < needed <= available, f"config needs {needed} GPUs, the cluster has {available}"
    # Whole GPUs on a cluster (fractions are for laptops), and a vLLM engine gets its tensor-parallel GPUs.
    for value in (res.engine_num_gpus, res.train_worker_num_gpus):
        assert value >= 1 and float(value).is_integer()
    assert res.engine_num_gpus >= cfg.vllm.tensor_parallel_size and res.actor_num_gpus == 0
    assert cfg.critic.backend == "vllm" and cfg.train.strategy == "deepspeed" and cfg.train.zero_stage == 3
    assert cfg.domain.name == "gsm8k"
    assert cfg.metrics.enabled and cfg.metrics.port == SCRIT_METRICS_PORT


def test_the_config_paths_are_on_the_mounted_volumes() -> None:
    _, config_path = _entrypoint_config()
    cfg = load_config(config_path)
    for _, group in _groups(_cluster_spec("rayjob")):
        mounts = {m["mountPath"]: m for m in _ray_container(group)["volumeMounts"]}
        for path, writable in ((cfg.run.run_dir, True), (cfg.critic.model, False),
                               (cfg.domain.data_path, False), *((s.model, False) for s in cfg.solvers)):
            assert path.startswith("/"), f"{path}: cluster paths must be absolute"
            mount = next((m for p, m in mounts.items() if path == p or path.startswith(p + "/")), None)
            assert mount is not None, f"{path} is not on a volume mounted in every pod"
            if writable:
                assert not mount.get("readOnly", False), f"{path} must be writable"
