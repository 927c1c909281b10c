"""A critic version's weights in memory, in the form they travel through Ray's object store (DESIGN.md §8).

The trainer publishes each version twice: a checkpoint on disk (durability, ``--resume``, processes
outside the run) and, once, its state dict in Ray's object store, from which every subscriber of the
run (engine hosts, the evaluator's engine, the run's Serve replicas) reloads in place on any node,
without reading the checkpoint (``scrit.checkpoints.VersionFollower`` takes whichever it gets).

``PackedWeights`` holds the tensors as numpy arrays: Ray serialises numpy arrays out of band (pickle
protocol 5), so the bytes are copied once into the object store and a reader on the same node maps
them without a copy, where pickled torch tensors would be copied through ``torch.save`` bytes on both
sides. bfloat16, which numpy lacks, travels as its int16 bits; a tensor that shares its storage with
an earlier one (tied embeddings) travels once, as an alias. Ray-free: tests and the benchmark use it
in-process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

__all__ = ["PackedWeights", "mix_with_seed"]


def _storage_key(tensor: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
    """Equal for two names of one tensor (tied embeddings), so it is packed or mixed once."""
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))


@dataclass(frozen=True)
class PackedWeights:
    """A state dict as numpy arrays (see the module docstring); ``tensors()`` gives it back."""

    arrays: dict[str, np.ndarray]
    bfloat16: frozenset[str]  # names whose int16 array holds bfloat16 bits
    aliases: dict[str, str]  # name -> the earlier name whose tensor it shares

    @classmethod
    def pack(cls, state: Mapping[str, torch.Tensor]) -> PackedWeights:
        """``state``'s tensors on the CPU, contiguous, as arrays (no copy for CPU tensors that already are)."""
        import torch

        arrays: dict[str, Any] = {}
        bfloat16: set[str] = set()
        aliases: dict[str, str] = {}
        seen: dict[tuple[int, torch.dtype, tuple[int, ...]], str] = {}
        for name, tensor in state.items():
            key = _storage_key(tensor)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
            cpu = tensor.detach().to("cpu").contiguous()
            if cpu.dtype == torch.bfloat16:
                bfloat16.add(name)
                cpu = cpu.view(torch.int16)
            arrays[name] = cpu.numpy()
        return cls(arrays=arrays, bfloat16=frozenset(bfloat16), aliases=aliases)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state dict, viewing the arrays' memory (read-only when they come from the object store:
        backends copy them into their own parameters)."""
        import warnings

        import torch

        out: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings():  # torch warns that an object-store array is not writable; nobody writes
            warnings.simplefilter("ignore", UserWarning)
            for name, array in self.arrays.items():
                tensor = torch.from_numpy(array)
                out[name] = tensor.view(torch.bfloat16) if name in self.bfloat16 else tensor
        for name, target in self.aliases.items():
            out[name] = out[target]
        return out

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in self.arrays.values())


def mix_with_seed(trained: Mapping[str, torch.Tensor], seed: Mapping[str, torch.Tensor],
                  seed_share: float) -> dict[str, torch.Tensor]:
    """``(1 - seed_share) x trained + seed_share x seed``, tensor by tensor (``train.seed_share``).

    Why: averaging a fine-tuned model's weights with the model it started from (WiSE-FT, Wortsman et
    al. 2022) keeps much of the fine-tuning's gain and most of what the start model could do that the
    fine-tuning data did not ask for; here, correct solutions called correct and problems longer than
    the loop's (docs/learning.md, seventh pass). Sums in float32 and returns each tensor in its trained
    dtype; tensors that share storage (tied embeddings) stay shared; integer buffers are the trained ones.
    """
    import torch

    mixed: dict[str, torch.Tensor] = {}
    done: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    for name, tensor in trained.items():
        key = _storage_key(tensor)
        if key in done:
            mixed[name] = done[key]
            continue
        value = tensor.detach()
        if tensor.is_floating_point():
            if name not in seed or tuple(seed[name].shape) != tuple(tensor.shape):
                raise ValueError(f"train.seed_share: the seed has no tensor {name!r} of shape {tuple(tensor.shape)}; "
                                 "mixing needs the seed's architecture")
            base = seed[name].detach().to(device=tensor.device, dtype=torch.float32)
            value = (value.float() * (1.0 - seed_share) + base * seed_share).to(tensor.dtype)
        done[key] = mixed[name] = value
    return mixed
