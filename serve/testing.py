"""Stand-in critic versions for tests and ``benchmarks/swap.py``.

``save_perturbed`` writes a checkpoint the way the trainer does (an HF directory with tokenizer and
``seed_info.json``, renamed into place atomically); ``publish`` appends it to a run's registry with
its checksum, exactly as a trainer publish does. The weights are the source model's plus small
Gaussian noise, so outputs stay in the critique format while the version really changes.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from scrit.messages import WeightVersion

__all__ = ["publish", "save_perturbed"]


def save_perturbed(source: str, target: str | os.PathLike[str], seed: int, scale: float = 0.01) -> Path:
    """Copy of checkpoint ``source`` (a spec such as ``seed``) with every floating-point weight
    tensor ``w`` replaced by ``w + scale * std(w) * N(0, 1)``; written to ``target``.

    Works on the safetensors files directly (no model is built): every other file of the checkpoint
    (config, tokenizer, ``seed_info.json``) is copied unchanged, and the directory is renamed into
    place once complete, as the trainer does.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from scrit.backends import resolve_model_path

    source_dir = Path(resolve_model_path(source))
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(source_dir.iterdir()):
        if not path.is_file():
            continue
        if path.suffix != ".safetensors":
            shutil.copy2(path, tmp / path.name)
            continue
        tensors = load_file(str(path))
        for name in sorted(tensors):
            tensor = tensors[name]
            if tensor.is_floating_point() and tensor.numel() > 1:
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensors[name] = (tensor.float() + noise * (scale * float(tensor.float().std()))).to(tensor.dtype)
        save_file(tensors, str(tmp / path.name), metadata={"format": "pt"})
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def publish(registry: object, version: int, uri: str | os.PathLike[str], checksum: str | None = None) -> WeightVersion:
    """Publish ``uri`` as ``version`` on a ``WeightRegistry``; ``checksum`` defaults to the real one
    (pass a wrong one to simulate a broken checkpoint)."""
    from scrit.checkpoints import checkpoint_checksum

    record = WeightVersion(version=version, uri=str(Path(uri).resolve()),
                           checksum=checksum if checksum is not None else checkpoint_checksum(uri),
                           created_at=time.time())
    return registry.publish(record)  # type: ignore[attr-defined]
