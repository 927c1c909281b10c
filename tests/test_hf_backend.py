"""HFBackend on a tiny random Qwen2 model with the seed's character tokenizer."""

from __future__ import annotations

import os
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    from openai_server import save_tiny_model
except ImportError:  # tests/ imported as a package
    from tests.openai_server import save_tiny_model

from scrit.backends import Generation, InferenceBackend, SamplingParams, make_backend
from scrit.backends.hf import HFBackend

PROMPTS = [
    "Start with 12. Add 5. Multiply by 3. What is the result?",
    "x",
    "Hello world",
    "Step 1: 12 + 5 = 17",
    "What is 2+2?",
    "abc",
]
GREEDY = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run ~10x faster on one thread when the 2 cores are shared (OpenMP spin contention)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tokens_until(backend: HFBackend, prompt: str, marker: str) -> int:
    """Fewest greedy tokens whose text contains ``marker`` (a random model also emits special tokens,
    which decode to nothing, so characters and tokens differ)."""
    for k in range(1, GREEDY.max_new_tokens + 1):
        if marker in backend.generate([prompt], SamplingParams(max_new_tokens=k)).pop().text:
            return k
    raise AssertionError(f"{marker!r} not generated")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(str(root / "a"), seed=0), save_tiny_model(str(root / "b"), seed=1)


@pytest.fixture(scope="module")
def backend(model_dirs: tuple[str, str]) -> HFBackend:
    return HFBackend(model_dirs[0], device="cpu", batch_size=4)


def test_protocol_and_order(backend: HFBackend) -> None:
    assert isinstance(backend, InferenceBackend)
    out = backend.generate(PROMPTS, GREEDY)
    assert len(out) == len(PROMPTS)
    assert all(isinstance(g, Generation) and g.version == 0 for g in out)
    # Prompt lengths differ, so prompt_tokens shows each result sits at its prompt's index.
    assert [g.prompt_tokens for g in out] == [len(p) + 1 for p in PROMPTS]  # <s> + one token per character
    assert backend.generate([], GREEDY) == []


def test_tokenizer_round_trips_spaces(backend: HFBackend) -> None:
    # transformers 5 AutoTokenizer would build a Qwen2Tokenizer here and drop the spaces.
    text = "Step 1: 12 + 5 = 17\nThe answer is \\boxed{17}."
    ids = backend.tokenizer(text)["input_ids"]
    assert len(ids) == len(text) + 1 and ids[0] == backend.tokenizer.bos_token_id
    assert backend.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_greedy_batched_equals_unbatched(backend: HFBackend) -> None:
    batched = backend.generate(PROMPTS, GREEDY)
    again = backend.generate(PROMPTS, GREEDY)
    assert batched == again
    alone = [backend.generate([p], GREEDY)[0] for p in PROMPTS]
    assert batched == alone  # left padding must not change any row
    assert len({g.text for g in batched}) > 1  # the model is not degenerate


def test_sampling_reproducible_with_seed(backend: HFBackend) -> None:
    sampling = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=123)
    first = backend.generate(PROMPTS, sampling)
    assert backend.generate(PROMPTS, sampling) == first
    other = backend.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=7))
    assert [g.text for g in other] != [g.text for g in first]
    assert [g.text for g in first] != [g.text for g in backend.generate(PROMPTS, GREEDY)]


def test_stop_strings_truncate(backend: HFBackend) -> None:
    prompt = PROMPTS[0]
    free = backend.generate([prompt], GREEDY)[0]
    assert free.completion_tokens <= GREEDY.max_new_tokens and len(free.text) >= 8
    stop = free.text[4:6]  # occurs in the unconstrained output, first at index <= 4
    cut = free.text.index(stop) + len(stop)
    stopped = backend.generate([prompt, PROMPTS[1]], SamplingParams(max_new_tokens=24, stop=(stop, "@@@")))[0]
    assert stopped.text == free.text[:cut]
    assert stopped.text.endswith(stop)
    assert stopped.completion_tokens == tokens_until(backend, prompt, stop)  # up to and including the stop


def test_stop_in_one_row_does_not_stop_others(backend: HFBackend) -> None:
    free = backend.generate(PROMPTS[:2], GREEDY)
    stop = free[0].text[2:4]
    if stop in free[1].text:
        pytest.skip("stop string occurs in both rows")
    out = backend.generate(PROMPTS[:2], SamplingParams(max_new_tokens=24, stop=(stop,)))
    assert out[0].text == free[0].text[: free[0].text.index(stop) + len(stop)]
    assert out[1] == free[1]


def test_eos_ends_generation_and_is_counted(backend: HFBackend) -> None:
    # Swap the configured EOS for a character the greedy output contains, to see EOS handling.
    free = backend.generate([PROMPTS[0]], GREEDY)[0]
    char = free.text[5]
    first = free.text.index(char)
    model = backend._model
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = backend.tokenizer.convert_tokens_to_ids(char)
    try:
        out = backend.generate([PROMPTS[0], PROMPTS[2]], GREEDY)[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert out.text == free.text[:first]  # the EOS token itself is not in the text
    assert out.completion_tokens == tokens_until(backend, PROMPTS[0], char)  # ... but it is counted


def test_token_counts(backend: HFBackend) -> None:
    out = backend.generate(PROMPTS, SamplingParams(max_new_tokens=5))
    for prompt, gen in zip(PROMPTS, out):
        assert gen.prompt_tokens == len(backend.tokenizer(prompt)["input_ids"])
        assert 1 <= gen.completion_tokens <= 5
        assert len(gen.text) <= gen.completion_tokens


def test_max_prompt_tokens_keeps_the_end(model_dirs: tuple[str, str]) -> None:
    short = HFBackend(model_dirs[0], device="cpu", max_prompt_tokens=4)
    full = HFBackend(model_dirs[0], device="cpu")
    out = short.generate(["0123456789abcd"], GREEDY)[0]
    assert out.prompt_tokens == 4  # <s> kept, then the last three characters
    assert out.text == full.generate(["bcd"], GREEDY)[0].text


def test_load_weights_swaps_model(model_dirs: tuple[str, str]) -> None:
    backend = HFBackend(model_dirs[0], device="cpu", batch_size=4)
    before = backend.generate(PROMPTS, GREEDY)
    backend.load_weights(1, model_dirs[1])
    assert backend.version == 1
    after = backend.generate(PROMPTS, GREEDY)
    assert all(g.version == 1 for g in after)
    assert [g.text for g in after] != [g.text for g in before]
    assert after == HFBackend(model_dirs[1], device="cpu", version=1).generate(PROMPTS, GREEDY)


def test_load_weights_from_memory_matches_loading_the_checkpoint(model_dirs: tuple[str, str]) -> None:
    """A version from Ray's object store (``PackedWeights``, as the trainer puts it) generates exactly
    what the same version read from its checkpoint does; the path only names the version."""
    from transformers import AutoModelForCausalLM

    from scrit.weights import PackedWeights

    state = AutoModelForCausalLM.from_pretrained(model_dirs[1]).state_dict()
    backend = HFBackend(model_dirs[0], device="cpu", batch_size=4)
    backend.load_weights(1, "/gone/v0001", weights=PackedWeights.pack(state).tensors())
    assert backend.version == 1
    assert backend.generate(PROMPTS, GREEDY) == HFBackend(model_dirs[1], device="cpu", version=1).generate(PROMPTS, GREEDY)


def test_swap_during_generate_is_safe(model_dirs: tuple[str, str]) -> None:
    backend = HFBackend(model_dirs[0], device="cpu", batch_size=2)
    results: list[list[Generation]] = []
    worker = threading.Thread(target=lambda: results.append(backend.generate(PROMPTS, GREEDY)))
    worker.start()
    backend.load_weights(5, model_dirs[1])
    worker.join()
    (out,) = results
    assert len({g.version for g in out}) == 1  # one call never mixes two models
    assert backend.version == 5


def test_missing_or_bad_path(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        HFBackend(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        HFBackend(str(tmp_path / "empty"))


def test_load_weights_bad_path_keeps_old_model(backend: HFBackend, tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        backend.load_weights(9, str(tmp_path / "missing"))
    assert backend.version == 0


def test_make_backend_local_path(model_dirs: tuple[str, str]) -> None:
    backend = make_backend(model_dirs[0], device="cpu", version=3)
    assert isinstance(backend, HFBackend) and backend.version == 3


def test_chat_template_wraps_prompt(tmp_path) -> None:
    path = save_tiny_model(str(tmp_path / "chat"), seed=0)
    plain = HFBackend(path, device="cpu")
    plain.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    plain.tokenizer.save_pretrained(path)
    chat = HFBackend(path, device="cpu", use_chat_template="auto")
    wrapped = "<user>hi\n<assistant>"
    out = chat.generate(["hi"], GREEDY)[0]
    # The chat template supplies any special tokens itself, so the wrapped text is encoded as is.
    assert out.prompt_tokens == len(wrapped)
    assert chat._encode(chat.tokenizer, "hi", True) == chat.tokenizer(wrapped, add_special_tokens=False)["input_ids"]
    assert HFBackend(path, device="cpu", use_chat_template=False).generate(["hi"], GREEDY)[0].prompt_tokens == 3


def test_empty_prompt(backend: HFBackend) -> None:
    out = backend.generate(["", "abc"], SamplingParams(max_new_tokens=3))
    assert len(out) == 2 and out[0].prompt_tokens == 1 and 1 <= out[0].completion_tokens <= 3


def test_resolve_model_path_passthrough() -> None:
    from scrit.backends import resolve_model_path

    assert resolve_model_path("/some/dir") == "/some/dir"
