"""The one inference interface every role uses (DESIGN.md §7)."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_new_tokens: int = 384
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # generation ends after the first of these strings (kept in the text)
    seed: int | None = None


class Generation(msgspec.Struct, frozen=True):
    text: str
    prompt_tokens: int
    completion_tokens: int
    version: int  # model version that produced the text
    error: str = ""  # why nothing was generated for this prompt ("" = it was); see PromptTooLong


class PromptTooLong(ValueError):
    """A prompt longer than the model's context. In a batch (``generate``) it gets an empty Generation
    with ``error`` set and the rest of the batch goes on: one over-long prompt (a long problem with a
    long critique, in the validator's prompt) must not fail a role's whole batch, and so the run. The
    Serve endpoint answers it with a 400."""


def refused_generation(error: PromptTooLong, version: int) -> Generation:
    """The empty Generation that stands in a batch for a prompt the model cannot take."""
    return Generation(text="", prompt_tokens=0, completion_tokens=0, version=version, error=str(error))


@runtime_checkable
class InferenceBackend(Protocol):
    """Batched text generation plus weight hot-swap."""

    @property
    def version(self) -> int: ...

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Generation]: ...

    def load_weights(self, version: int, path: str) -> None:
        """Switch to the checkpoint at ``path``; later generate() calls use it and report ``version``."""
        ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` right after the earliest stop string; returns (text, stopped)."""
    cut = None
    for marker in stop:
        position = text.find(marker)
        if position >= 0 and (cut is None or position + len(marker) < cut):
            cut = position + len(marker)
    if cut is None:
        return text, False
    return text[:cut], True
