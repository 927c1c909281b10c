"""VLLMBackend: a clear error without vLLM (runs everywhere); real generation where vLLM exists."""

from __future__ import annotations

import json
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scrit.backends import SamplingParams, make_backend


def test_clear_import_error_without_vllm(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    from scrit.backends.vllm_backend import VLLMBackend

    with pytest.raises(ImportError, match=r"vLLM is not installed; pip install 'scrit\[vllm\]'"):
        VLLMBackend(str(tmp_path))
    with pytest.raises(ImportError, match="vLLM is not installed"):
        make_backend(f"vllm:{tmp_path}")


def _tiny_llama(path: str, seed: int) -> str:
    """A tiny Llama checkpoint whose tokenizer loads the same under transformers 4 and 5."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scrit.seed.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as handle:
        data = json.load(handle)
    data["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 4 (vLLM's) lacks TokenizersBackend
    with open(config_file, "w") as handle:
        json.dump(data, handle)
    return path


def test_vllm_generate_and_swap(tmp_path) -> None:
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from scrit.backends.vllm_backend import VLLMBackend

    first = _tiny_llama(str(tmp_path / "a"), seed=0)
    second = _tiny_llama(str(tmp_path / "b"), seed=1)
    backend = VLLMBackend(first, gpu_memory_utilization=0.3, dtype="float32", enforce_eager=True)
    prompts = ["Start with 12. Add 5.", "x", "Hello"]
    greedy = SamplingParams(max_new_tokens=12)
    before = backend.generate(prompts, greedy)
    assert len(before) == 3 and all(g.version == 0 for g in before)
    assert [g.prompt_tokens for g in before] == [len(p) for p in prompts]
    assert backend.generate(prompts, greedy) == before
    backend.load_weights(1, second)
    after = backend.generate(prompts, greedy)
    assert backend.version == 1 and all(g.version == 1 for g in after)
    assert [g.text for g in after] != [g.text for g in before]
