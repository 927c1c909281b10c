"""Hugging Face transformers backend: the default engine, on CPU or one GPU (DESIGN.md §7).

Weights are hot-swapped by loading the new checkpoint beside the old one and switching the
reference under a lock, so a ``generate`` call in flight finishes on the model it started with.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch

from scrit.backends.base import Generation, PromptTooLong, SamplingParams, refused_generation, truncate_at_stop

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(model_path: str | os.PathLike[str]) -> Path:
    """Fail early with a message naming the path (transformers would try the hub instead)."""
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {str(path)!r}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"not a Hugging Face model directory (no config.json): {str(path)!r}")
    return path


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (exact and portable), bfloat16 (or float16) on GPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


_GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint's tokenizer faithfully.

    transformers 5 ``AutoTokenizer`` ignores a generic ``tokenizer_class`` for some model types (qwen2
    among them) and builds e.g. ``Qwen2Tokenizer``, which replaces the pre-tokenizer/decoder stored in
    ``tokenizer.json``: the seed's character tokenizer then drops spaces. A directory that declares a
    generic class and ships ``tokenizer.json`` is loaded from that file as-is; anything else goes
    through ``AutoTokenizer``.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(path)
    config_file = directory / "tokenizer_config.json"
    declared = None
    if config_file.is_file():
        try:
            declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError):
            declared = None
    if declared in _GENERIC_TOKENIZER_CLASSES and (directory / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


class _StopOnStringsOrEos:
    """Per-row stopping criterion that also records how many tokens each row produced.

    Rows that already finished are not decoded again. ``lengths[i]`` is the number of new tokens up to
    and including the EOS or the token that completed a stop string (None while the row is running).
    """

    def __init__(self, tokenizer: Any, prompt_len: int, batch: int, stop: Sequence[str], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop = tuple(s for s in stop if s)
        self.eos_ids = eos_ids
        self.lengths: list[int | None] = [None] * batch
        self.hit_eos = [False] * batch

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        for row, length in enumerate(self.lengths):
            if length is not None:
                continue
            if last[row] in self.eos_ids:
                self.lengths[row] = generated
                self.hit_eos[row] = True
            elif self.stop:
                text = self.tokenizer.decode(input_ids[row, self.prompt_len :], skip_special_tokens=True)
                if any(marker in text for marker in self.stop):
                    self.lengths[row] = generated
        done = [length is not None for length in self.lengths]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFBackend:
    """Batched generation with ``AutoModelForCausalLM`` from a local checkpoint directory."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        use_chat_template: bool | Literal["auto"] = False,
        version: int = 0,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.use_chat_template = use_chat_template
        self.max_prompt_tokens = max_prompt_tokens
        self._lock = threading.RLock()  # generate() and the switch in load_weights(); see pinned()
        self.model_path = str(check_model_dir(model_path))
        self._tokenizer = self._load_tokenizer(self.model_path)
        self._model = self._load_model(self.model_path)
        self._version = int(version)

    # ------------------------------------------------------------------ loading

    def _load_tokenizer(self, path: str) -> Any:
        tokenizer = load_tokenizer(path)
        tokenizer.padding_side = "left"  # we pad by hand, but keep the tokenizer consistent for callers
        return tokenizer

    def _load_model(self, path: str) -> Any:
        from transformers import AutoModelForCausalLM

        check_model_dir(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, local_files_only=True)
        model.to(self.device)
        model.eval()
        return model

    @property
    def version(self) -> int:
        return self._version

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Keep the current weights for several ``generate`` calls: a swap waits until the block ends.

        A Serve batch with several sampling settings makes one call per setting; pinning keeps them
        all on one version (the new weights still load beside the old ones meanwhile).
        """
        with self._lock:
            yield

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def load_weights(self, version: int, path: str, weights: Mapping[str, Any] | None = None) -> None:
        """Load the new weights fully beside the old ones, then swap them in under the lock; the old model
        is freed afterwards. ``weights`` (a state dict, e.g. from Ray's object store) go into a copy of
        the current model instead of reading ``path``, which then only names the version.

        The tokenizer is reloaded too when the checkpoint carries one (training may save it).
        """
        new_tokenizer = None
        if weights is not None:
            with self._lock:
                template = self._model
            new_model = copy.deepcopy(template)
            new_model.load_state_dict({name: tensor.to(self.dtype) for name, tensor in weights.items()}, strict=True)
            checked = Path(path)
        else:
            checked = check_model_dir(path)
            new_model = self._load_model(str(checked))
            if (checked / "tokenizer_config.json").is_file() or (checked / "tokenizer.json").is_file():
                new_tokenizer = self._load_tokenizer(str(checked))
        with torch.inference_mode():  # first-call costs (allocations, kernel selection) before the switch
            start = (new_tokenizer or self._tokenizer).bos_token_id or 0
            new_model(input_ids=torch.tensor([[start]], device=self.device))
        with self._lock:
            old_model = self._model
            self._model = new_model
            if new_tokenizer is not None:
                self._tokenizer = new_tokenizer
            self._version = int(version)
            self.model_path = str(checked)
        del old_model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --------------------------------------------------------------- generation

    def _chat(self, tokenizer: Any) -> bool:
        if self.use_chat_template == "auto":
            return bool(getattr(tokenizer, "chat_template", None))
        return bool(self.use_chat_template)

    def _encode(self, tokenizer: Any, prompt: str, chat: bool) -> list[int]:
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            # Keep the end (that is where the question is), and a leading <s>: the model was trained with it.
            bos = tokenizer.bos_token_id
            head = [ids[0]] if bos is not None and ids[0] == bos and self.max_prompt_tokens > 1 else []
            ids = head + ids[len(ids) - (self.max_prompt_tokens - len(head)) :]
        if not ids:  # generate() needs at least one position to condition on
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ids = [start if start is not None else 0]
        return list(ids)

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Generation]:
        """Generate one completion per prompt, in input order; see module docstring for swap semantics."""
        prompts = list(prompts)
        if not prompts:
            return []
        with self._lock:
            model, tokenizer, version = self._model, self._tokenizer, self._version
            chat = self._chat(tokenizer)
            encoded = [self._encode(tokenizer, p, chat) for p in prompts]
            results: list[Generation | None] = [None] * len(prompts)
            context = getattr(model.config, "max_position_embeddings", None)
            for i, ids in enumerate(encoded):  # as vLLM: the prompt must leave room for a token
                if context is not None and len(ids) >= context:
                    results[i] = refused_generation(PromptTooLong(
                        f"the prompt has {len(ids)} tokens; the model's context is {context}"), version)
            # Sorting by length keeps similar prompts in one batch, so there is less padding.
            order = sorted((i for i in range(len(prompts)) if results[i] is None), key=lambda i: len(encoded[i]))
            rng = contextlib.nullcontext()
            if sampling.temperature > 0 and sampling.seed is not None:
                devices = [self.device.index or 0] if self.device.type == "cuda" else []
                rng = torch.random.fork_rng(devices=devices)  # do not disturb the caller's global RNG
            with rng, torch.inference_mode():
                if sampling.temperature > 0 and sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    outs = self._generate_batch(model, tokenizer, [encoded[i] for i in chunk], sampling, version)
                    for i, gen in zip(chunk, outs):
                        results[i] = gen
        return [r for r in results if r is not None]

    def _eos_ids(self, model: Any, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        configured = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(int(x) for x in configured)
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        return ids

    def _generate_batch(
        self, model: Any, tokenizer: Any, batch: list[list[int]], sampling: SamplingParams, version: int
    ) -> list[Generation]:
        from transformers import StoppingCriteriaList

        eos_ids = self._eos_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = min(eos_ids) if eos_ids else 0
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):  # left padding: the next token is always at the last column
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
        input_ids = input_ids.to(self.device)
        attention = attention.to(self.device)

        criterion = _StopOnStringsOrEos(tokenizer, width, len(batch), sampling.stop, eos_ids)
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": pad_id,
            "eos_token_id": sorted(eos_ids) or None,
            "stopping_criteria": StoppingCriteriaList([criterion]),
        }
        if sampling.temperature > 0:
            # top_k=0 disables transformers' default top-k of 50, matching OpenAI/vLLM semantics.
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        output = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_tokens = output[:, width:].tolist()

        generations = []
        for row, ids in enumerate(batch):
            length = criterion.lengths[row]
            if length is None:  # ran to max_new_tokens; a trailing EOS would have set a length
                length = len(new_tokens[row])
            completion = new_tokens[row][:length]
            # EOS counts as a completion token but is never text (even when it is not a special token).
            shown = completion[:-1] if criterion.hit_eos[row] else completion
            text = tokenizer.decode(shown, skip_special_tokens=True)
            text, _ = truncate_at_stop(text, sampling.stop)
            generations.append(
                Generation(text=text, prompt_tokens=len(ids), completion_tokens=len(completion), version=version)
            )
        return generations
