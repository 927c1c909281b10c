"""The checkpoint and registry format (``scrit.checkpoints``) and the one version subscriber.

``VersionFollower`` is what every critic-following role and every Serve replica uses, so its one
behaviour is tested here once, with a backend that records what it loads: newest version first, a
checkpoint that fails its checksum or does not load is rejected for good, and the backend keeps what
it has.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest

from scrit.actors.registry import WeightRegistry
from scrit.checkpoints import (
    RegistryError,
    RegistryTail,
    VersionFollower,
    checkpoint_checksum,
    read_registry,
    registry_path,
    remove_unpublished_checkpoints,
)
from scrit.messages import WeightVersion
from scrit.weights import PackedWeights, mix_with_seed


def _checkpoint(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "config.json").write_text("{}")
    return path


def _line(version: int) -> bytes:
    return msgspec.json.encode(WeightVersion(version=version, uri=f"/ckpt/v{version}", checksum="x", created_at=1.0)) + b"\n"


class Recording:
    """A backend that loads by reading the checkpoint's weights file; ``fail`` makes loads raise."""

    def __init__(self) -> None:
        self.version = 0
        self.loaded: list[int] = []
        self.fail: set[int] = set()

    def load_weights(self, version: int, path: str, weights: dict | None = None) -> None:
        if version in self.fail:
            raise OSError(f"corrupt safetensors in {path}")
        if weights is None:
            (Path(path) / "model.safetensors").read_bytes()
        self.loaded.append(version)
        self.from_memory = weights is not None
        self.version = version


class InProcessWeights:
    """A WeightSource over an in-process ``WeightRegistry`` (the Ray actor's ``ObjectStoreWeights``
    does the same through Ray's object store)."""

    name = "object_store"

    def __init__(self, registry: WeightRegistry) -> None:
        self.registry = registry

    def fetch(self, version: WeightVersion) -> dict | None:
        held = self.registry.weights(version.version)
        return held[0].tensors() if held else None


def test_registry_tail_reads_appends_waits_for_torn_lines_and_rereads_a_cut_file(tmp_path: Path) -> None:
    tail = RegistryTail(tmp_path)
    assert tail.poll() == []  # no file yet
    path = registry_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(_line(1))
    assert [v.version for v in tail.poll()] == [1]
    assert tail.poll() == []
    with path.open("ab") as handle:
        handle.write(_line(2)[:10])
    assert tail.poll() == []  # half a line: wait for the rest
    with path.open("ab") as handle:
        handle.write(_line(2)[10:] + b"not json\n" + _line(3))
    assert [v.version for v in tail.poll()] == [2, 3]
    assert tail.bad_lines == 1
    path.write_bytes(_line(1))  # a resumed run cut the file: read it again
    assert [v.version for v in tail.poll()] == [1]


def test_registry_tail_resolves_relative_uris(tmp_path: Path) -> None:
    (tmp_path / "versions" / "v0001").mkdir(parents=True)
    registry_path(tmp_path).write_bytes(
        msgspec.json.encode(WeightVersion(version=1, uri="elsewhere/v0001", checksum="")) + b"\n")
    assert RegistryTail(tmp_path).poll()[0].uri == str((tmp_path / "versions" / "v0001").resolve())


def test_read_registry_cuts_a_torn_tail_and_names_corruption(tmp_path: Path) -> None:
    path = registry_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(_line(1) + _line(2) + _line(3)[:15])
    assert [v.version for v in read_registry(tmp_path)] == [1, 2]
    assert path.read_bytes() == _line(1) + _line(2)  # the torn line is gone, the rest untouched
    path.write_bytes(_line(1) + b"garbage\n" + _line(2))
    with pytest.raises(RegistryError, match=rf"{path}: byte {len(_line(1))}"):
        read_registry(tmp_path)
    path.write_bytes(_line(2) + _line(1))
    with pytest.raises(RegistryError, match="version 1 does not follow 2"):
        read_registry(tmp_path)


def test_follower_takes_the_newest_version_that_loads_and_never_retries_a_bad_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    registry = WeightRegistry(run, _checkpoint(tmp_path / "seed", b"seed"))
    backend = Recording()
    follower = VersionFollower(run, backend, "critic")
    assert not follower.poll() and backend.version == 0

    def publish(version: int, weights: bytes, checksum: str | None = None) -> Path:
        path = _checkpoint(run / "versions" / f"v{version:04d}", weights)
        registry.publish(WeightVersion(version=version, uri=str(path), checksum=checksum or checkpoint_checksum(path)))
        return path

    publish(1, b"one")
    publish(2, b"two")
    assert follower.poll() and backend.loaded == [2]  # the newest, not every version in turn
    publish(3, b"three", checksum="sha256:" + "0" * 64)  # bytes that do not match the published checksum
    assert not follower.poll() and backend.version == 2
    missing = publish(4, b"four")
    (missing / "model.safetensors").unlink()  # a checkpoint that lost its weights file
    backend.fail.add(5)
    publish(5, b"five")  # verifies, but the backend cannot load it
    assert not follower.poll() and backend.version == 2
    assert follower.stats()["swap_errors"] == 3 and follower.stats()["rejected"] == [3, 4, 5]
    publish(6, b"six")
    publish(7, b"seven", checksum="sha256:bad")
    assert follower.poll() and backend.version == 6  # 7 fails, so the next newest that loads
    assert not follower.poll()  # nothing is retried
    assert backend.loaded == [2, 6] and follower.swaps == 2 and follower.stats()["rejected"] == [3, 4, 5, 7]


def test_open_builds_on_the_newest_version_that_loads_then_follows(tmp_path: Path) -> None:
    """How every subscriber starts (and a restarted one rejoins): the newest published version that
    verifies and builds, else the base; the versions that failed are rejected for good."""
    run = tmp_path / "run"
    seed = _checkpoint(tmp_path / "seed", b"seed")
    registry = WeightRegistry(run, seed)
    built: list[int] = []

    def build(version: WeightVersion) -> Recording:
        if version.version == 3:
            raise OSError("cannot build version 3")
        built.append(version.version)
        backend = Recording()
        backend.version = version.version
        return backend

    base = WeightVersion(version=0, uri=str(seed), checksum="")
    assert VersionFollower(run, None, "critic-engine").open(build, base).version == 0  # nothing published yet
    for version, checksum in ((1, None), (2, "sha256:bad"), (3, None)):
        path = _checkpoint(run / "versions" / f"v{version:04d}", f"v{version}".encode())
        registry.publish(WeightVersion(version=version, uri=str(path), checksum=checksum or checkpoint_checksum(path)))
    follower = VersionFollower(run, None, "critic-engine")
    backend = follower.open(build, base)
    assert backend.version == 1 and follower.backend is backend and built == [0, 1]
    assert follower.stats()["rejected"] == [2, 3] and follower.swap_errors == 2
    path = _checkpoint(run / "versions" / "v0004", b"v4")
    registry.publish(WeightVersion(version=4, uri=str(path), checksum=checkpoint_checksum(path)))
    assert follower.poll() and backend.version == 4  # then it follows, in place
    with pytest.raises(OSError, match="version 3"):  # the base itself failing has nothing to fall back to
        VersionFollower(tmp_path / "other", None, "x").open(build, WeightVersion(version=3, uri="b", checksum=""))


def test_unpublished_checkpoints_are_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    registry = WeightRegistry(run, _checkpoint(tmp_path / "seed", b"seed"))
    v1 = _checkpoint(run / "versions" / "v0001", b"one")
    registry.publish(WeightVersion(version=1, uri=str(v1), checksum=checkpoint_checksum(v1)))
    _checkpoint(run / "versions" / ".v0002.tmp-1234abcd", b"half")  # killed mid-write
    _checkpoint(run / "versions" / "v0002", b"two")  # renamed into place, never published
    assert sorted(remove_unpublished_checkpoints(run)) == [".v0002.tmp-1234abcd", "v0002"]
    assert sorted(p.name for p in (run / "versions").iterdir()) == ["registry.jsonl", "v0001"]


def test_follower_takes_versions_from_memory_and_reads_the_checkpoint_only_when_they_are_not(tmp_path: Path) -> None:
    """The transport is a detail behind the one follower: a version whose weights the registry holds in
    memory swaps even with its checkpoint gone; one it does not hold is read (and verified) from disk."""
    import torch

    run = tmp_path / "run"
    registry = WeightRegistry(run, _checkpoint(tmp_path / "seed", b"seed"))
    backend = Recording()
    follower = VersionFollower(run, backend, "critic", weights=InProcessWeights(registry))

    def publish(version: int, in_memory: bool) -> Path:
        path = _checkpoint(run / "versions" / f"v{version:04d}", f"v{version}".encode())
        weights = PackedWeights.pack({"w": torch.full((2,), float(version))}) if in_memory else None
        registry.publish(WeightVersion(version=version, uri=str(path), checksum=checkpoint_checksum(path)), weights)
        return path

    publish(1, in_memory=True).joinpath("model.safetensors").unlink()  # nobody may read it
    assert follower.poll() and backend.version == 1 and backend.from_memory
    publish(2, in_memory=False)
    assert follower.poll() and backend.version == 2 and not backend.from_memory
    publish(3, in_memory=True)
    publish(4, in_memory=True)
    assert registry.weights(3) == [] and len(registry.weights(4)) == 1  # only the newest stays in memory
    assert follower.poll() and backend.version == 4 and backend.from_memory
    assert follower.stats()["transports"] == {"object_store": 2, "disk": 1}
    assert [swap["transport"] for swap in follower.history] == ["object_store", "disk", "object_store"]
    for version in (3, 4):
        shutil.rmtree(run / "versions" / f"v{version:04d}")

    def build(version: WeightVersion) -> Recording:
        started = Recording()
        started.version = version.version
        return started

    rejoined = VersionFollower(run, None, "critic", weights=InProcessWeights(registry))  # a restarted subscriber
    backend = rejoined.open(build, WeightVersion(version=0, uri=str(tmp_path / "seed"), checksum=""))
    assert backend.version == 4 and backend.from_memory and rejoined.stats()["transports"] == {"object_store": 1}


def test_packed_weights_round_trip_dtypes_and_tied_tensors() -> None:
    import torch

    embed = torch.randn(5, 3)
    state = {"embed": embed, "head": embed, "norm": torch.randn(3).to(torch.bfloat16), "step": torch.tensor([7])}
    packed = PackedWeights.pack(state)
    assert packed.aliases == {"head": "embed"} and packed.bfloat16 == {"norm"}
    assert packed.nbytes == 5 * 3 * 4 + 3 * 2 + 8  # the tied tensor travels once
    back = packed.tensors()
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


def test_mix_with_seed_weighs_each_tensor_keeps_dtypes_and_tied_tensors() -> None:
    import torch

    embed = torch.full((4, 2), 4.0)
    trained = {"embed": embed, "head": embed, "norm": torch.full((2,), 2.0, dtype=torch.bfloat16),
               "positions": torch.tensor([3, 4])}
    seed = {"embed": torch.zeros(4, 2), "head": torch.zeros(4, 2), "norm": torch.ones(2), "positions": torch.tensor([0, 0])}
    mixed = mix_with_seed(trained, seed, 0.25)
    assert torch.equal(mixed["embed"], torch.full((4, 2), 3.0))  # 0.75 x 4 + 0.25 x 0
    assert mixed["head"] is mixed["embed"]  # still tied: saved and packed once
    assert mixed["norm"].dtype == torch.bfloat16 and torch.equal(mixed["norm"].float(), torch.full((2,), 1.75))
    assert torch.equal(mixed["positions"], trained["positions"])  # integer buffers are not averaged
    assert torch.equal(trained["embed"], torch.full((4, 2), 4.0))  # the trained weights are left as they were
    with pytest.raises(ValueError, match="'norm'"):
        mix_with_seed(trained, {**seed, "norm": torch.ones(3)}, 0.25)
