"""In-process vLLM engine (optional extra, GPU only; DESIGN.md §7).

vLLM is imported lazily so that the core package imports without it. Weight updates:

* ``enable_lora=True``: each ``load_weights`` registers the adapter directory as a new
  ``LoRARequest`` (vLLM loads it on first use, the base weights stay put).
* full weights: the safetensors files of the new checkpoint are streamed into the running model
  through ``LLM.collective_rpc`` (runs on every worker, so tensor parallelism works; vLLM >= 0.8),
  falling back to the V0-engine attribute path
  ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights``, and finally to
  rebuilding the ``LLM`` on the new directory (slow, but always correct).

Testing status: none of these paths could be exercised where this was written (vLLM cannot be
installed on the CPU-only development machines, see DESIGN.md §11); the test module runs them
when vLLM is importable.
"""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path
from typing import Any, Literal, Sequence

from scrit.backends.base import Generation, SamplingParams, truncate_at_stop
from scrit.backends.hf import check_model_dir

log = logging.getLogger(__name__)

VLLM_MISSING = "vLLM is not installed; pip install 'scrit[vllm]' on a GPU machine"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(VLLM_MISSING) from exc
    return vllm


def _safetensors_weights(path: str):
    """Yield (name, tensor) from every ``*.safetensors`` file of a checkpoint directory."""
    from safetensors.torch import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def _load_into_model(model: Any, path: str) -> None:
    model.load_weights(_safetensors_weights(path))


def _worker_load_weights(worker: Any, path: str) -> bool:
    """Runs inside each vLLM worker via ``collective_rpc``; must stay a picklable module-level function."""
    runner = worker.model_runner
    model = runner.model if hasattr(runner, "model") else runner.get_model()
    _load_into_model(model, path)
    try:  # quantized or fused layers need their post-load pass; absent in old releases
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        device = next(model.parameters()).device
        process_weights_after_loading(model, runner.model_config, device)
    except ImportError:
        pass
    return True


class VLLMBackend:
    """Batched generation with ``vllm.LLM``; see the module docstring for weight swapping."""

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "auto",
        enable_lora: bool = False,
        max_model_len: int | None = None,
        version: int = 0,
        use_chat_template: bool | Literal["auto"] = False,
        **llm_kwargs: Any,
    ) -> None:
        """``llm_kwargs`` go to ``vllm.LLM`` unchanged (e.g. ``max_lora_rank``, ``enforce_eager``)."""
        self._vllm = _import_vllm()
        self.model_path = str(check_model_dir(model_path))
        self.enable_lora = enable_lora
        self.use_chat_template = use_chat_template
        self._llm_options: dict[str, Any] = dict(
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enable_lora=enable_lora,
            **llm_kwargs,
        )
        if max_model_len is not None:
            self._llm_options["max_model_len"] = max_model_len
        self._lock = threading.Lock()
        self._llm = self._vllm.LLM(model=self.model_path, **self._llm_options)
        self._lora: Any = None
        self._version = int(version)

    @property
    def version(self) -> int:
        return self._version

    def _prompt_text(self, prompt: str) -> str:
        tokenizer = self._llm.get_tokenizer()
        use = self.use_chat_template
        if use == "auto":
            use = bool(getattr(tokenizer, "chat_template", None))
        if not use:
            return prompt
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Generation]:
        """One ``LLM.generate`` call for the whole batch; vLLM schedules it itself."""
        prompts = list(prompts)
        if not prompts:
            return []
        params = self._vllm.SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            include_stop_str_in_output=True,  # scrit keeps the stop string in the text
        )
        with self._lock:
            texts = [self._prompt_text(p) for p in prompts]
            kwargs: dict[str, Any] = {"use_tqdm": False}
            if self._lora is not None:
                kwargs["lora_request"] = self._lora
            outputs = self._llm.generate(texts, params, **kwargs)
            version = self._version
        generations = []
        for out in outputs:
            completion = out.outputs[0]
            text, _ = truncate_at_stop(completion.text, sampling.stop)
            generations.append(
                Generation(
                    text=text,
                    prompt_tokens=len(out.prompt_token_ids or ()),
                    completion_tokens=len(completion.token_ids),
                    version=version,
                )
            )
        return generations

    def load_weights(self, version: int, path: str) -> None:
        """Switch to the adapter or full checkpoint at ``path``; generate() waits while weights change."""
        checked = Path(path).expanduser()
        if not checked.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {str(checked)!r}")
        if self.enable_lora:
            from vllm.lora.request import LoRARequest

            # lora_int_id must be positive and unique per adapter, so it cannot be the version itself.
            request = LoRARequest(f"v{version}", int(version) + 1, str(checked))
            with self._lock:
                self._lora = request
                self._version = int(version)
            return
        check_model_dir(checked)
        with self._lock:
            self._load_full_weights(str(checked))
            self.model_path = str(checked)
            self._version = int(version)

    def _load_full_weights(self, path: str) -> None:
        try:
            self._llm.collective_rpc(_worker_load_weights, args=(path,))
            return
        except Exception as exc:  # noqa: BLE001 - older vLLM or a model without load_weights
            log.warning("vLLM collective_rpc weight update failed (%s); trying the V0 path", exc)
        try:
            model = self._llm.llm_engine.model_executor.driver_worker.model_runner.model
            _load_into_model(model, path)
            return
        except Exception as exc:  # noqa: BLE001
            log.warning("vLLM in-place weight update failed (%s); rebuilding the engine", exc)
        old, self._llm = self._llm, None
        del old
        gc.collect()
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
        self._llm = self._vllm.LLM(model=path, **self._llm_options)
