"""Config loading, overrides and error messages (every error must name the dotted key)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from scrit.config import (
    ConfigError,
    ScritConfig,
    SolverSpec,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    default_config,
    dump_yaml,
    load_config,
    validate,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -------------------------------------------------------------------------------------


def test_defaults_are_valid_and_laptop_sized() -> None:
    cfg = default_config()
    assert validate(cfg) is cfg
    assert cfg.domain.name == "arith" and cfg.critic.model == "seed" and cfg.critic.backend == "vllm"
    assert 0 < cfg.resources.actor_num_cpus < 1 and 0 < cfg.resources.train_worker_num_cpus < 1
    assert cfg.buffer.correct_ratio == 0.5
    assert cfg.domain.heldout_seed != cfg.run.seed
    assert len(cfg.solvers) == 1 and cfg.solvers[0].temperature == 1.0
    assert cfg.solvers[0].model == "careless" and cfg.solvers[0].backend == "vllm"
    assert cfg.corrector.model is None and cfg.validator.enabled and cfg.validator.require_answer_match


def test_default_configs_are_independent() -> None:
    first, second = default_config(), default_config()
    first.solvers.append(SolverSpec(temperature=0.3))
    first.train.lr = 0.5
    assert len(second.solvers) == 1 and second.train.lr != 0.5


def test_load_none_gives_defaults() -> None:
    assert load_config(None) == default_config()


# --- YAML files -----------------------------------------------------------------------------------


def test_partial_yaml_keeps_other_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 1e-3\n  batch_size: 4\nbuffer:\n  correct_ratio: 0.25\n")
    cfg = load_config(path)
    defaults = default_config()
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 4
    assert cfg.train.steps_per_version == defaults.train.steps_per_version
    assert cfg.buffer.correct_ratio == 0.25 and cfg.buffer.capacity == defaults.buffer.capacity
    assert cfg.critic == defaults.critic and cfg.serve == defaults.serve


def test_empty_file_and_bare_section_keep_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == default_config()
    assert load_config(write(tmp_path, "train:\n", "bare.yaml")) == default_config()


def test_yaml_solvers_list_fills_spec_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "solvers:\n  - temperature: 0.7\n  - model: /ckpt/a\n    samples_per_problem: 2\n")
    cfg = load_config(path)
    assert [s.temperature for s in cfg.solvers] == [0.7, 1.0]
    assert cfg.solvers[1].model == "/ckpt/a" and cfg.solvers[1].samples_per_problem == 2
    assert cfg.solvers[0].samples_per_problem == SolverSpec().samples_per_problem


def test_file_then_overrides(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.01\n"), ["train.lr=0.02", "run.versions=2"])
    assert cfg.train.lr == 0.02 and cfg.run.versions == 2


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), ScritConfig)


def test_shipped_configs_exist() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"default.yaml", "tiny-test.yaml", "gsm8k-smollm2.yaml", "cluster-7b.yaml", "long.yaml"} <= names


def test_default_yaml_matches_default_config() -> None:
    assert load_config(CONFIGS / "default.yaml") == default_config()


def test_long_config_is_the_default_recipe_longer() -> None:
    """configs/long.yaml is the far end of the default run's scaling curve: only length may differ."""
    cfg, defaults = load_config(CONFIGS / "long.yaml"), default_config()
    assert cfg.run.max_wall_seconds >= 3 * defaults.run.max_wall_seconds
    assert cfg.run.versions * cfg.train.steps_per_version >= 3 * defaults.run.versions * defaults.train.steps_per_version
    assert cfg.domain.num_problems > defaults.domain.num_problems
    for section in ("critic", "solvers", "validator", "buffer", "resources", "vllm"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    longer = {"steps_per_version"}
    assert {k: v for k, v in msgspec.structs.asdict(cfg.train).items() if k not in longer} == \
        {k: v for k, v in msgspec.structs.asdict(defaults.train).items() if k not in longer}


def test_tiny_test_config_is_small() -> None:
    cfg = load_config(CONFIGS / "tiny-test.yaml")
    defaults = default_config()
    assert cfg.run.versions == 1
    assert cfg.domain.num_problems < defaults.domain.num_problems
    assert cfg.train.steps_per_version < defaults.train.steps_per_version


# --- overrides ------------------------------------------------------------------------------------


def test_overrides_nested_scalars() -> None:
    cfg = apply_overrides(
        default_config(),
        ["train.lr=1e-4", "train.batch_size=3", "validator.enabled=false", "buffer.max_staleness=0",
         "critic.mode=direct", "serve.port=9001", "corrector.model=null"],
    )
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 3 and isinstance(cfg.train.batch_size, int)
    assert cfg.validator.enabled is False
    assert cfg.buffer.max_staleness == 0
    assert cfg.critic.mode == "direct"
    assert cfg.serve.port == 9001
    assert cfg.corrector.model is None


def test_override_int_into_float_field() -> None:
    cfg = apply_overrides(default_config(), ["run.max_wall_seconds=60"])
    assert cfg.run.max_wall_seconds == 60.0 and isinstance(cfg.run.max_wall_seconds, float)


def test_override_does_not_mutate_input() -> None:
    cfg = default_config()
    apply_overrides(cfg, ["train.lr=0.5", "solvers[0].temperature=0.1"])
    assert cfg == default_config()


def test_override_list_of_solvers() -> None:
    override = "solvers=[{model: seed, temperature: 0.7}, {samples_per_problem: 2}]"
    cfg = apply_overrides(default_config(), [override])
    assert len(cfg.solvers) == 2
    assert cfg.solvers[0].temperature == 0.7 and cfg.solvers[1].samples_per_problem == 2
    assert all(isinstance(s, SolverSpec) for s in cfg.solvers)


def test_override_list_element_by_index() -> None:
    for key in ("solvers[0].temperature", "solvers.0.temperature"):
        cfg = apply_overrides(default_config(), [f"{key}=0.25"])
        assert cfg.solvers[0].temperature == 0.25


def test_override_section_mapping_merges() -> None:
    cfg = apply_overrides(default_config(), ["train.batch_size=4", "train={lr: 0.5}"])
    assert cfg.train.lr == 0.5 and cfg.train.batch_size == 4


def test_override_string_field_keeps_literal_text() -> None:
    cfg = apply_overrides(default_config(), ["run.name=2024", "critic.model=runs/x/v3", "serve.api_key=yes"])
    assert cfg.run.name == "2024" and cfg.critic.model == "runs/x/v3" and cfg.serve.api_key == "yes"


def test_override_http_model() -> None:
    cfg = apply_overrides(default_config(), ["critic.model=http://10.0.0.1:8000/v1", "critic.backend=http"])
    assert cfg.critic.model == "http://10.0.0.1:8000/v1" and cfg.critic.backend == "http"


def test_single_string_override_accepted() -> None:
    assert apply_overrides(default_config(), "train.lr=0.3").train.lr == 0.3  # type: ignore[arg-type]


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_key_override_names_key_and_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(default_config(), ["train.lrr=1"])
    message = str(info.value)
    assert "unknown key 'train.lrr'" in message
    assert "steps_per_version" in message and "lr" in message


def test_unknown_section() -> None:
    with pytest.raises(ConfigError, match="unknown key 'trian'") as info:
        apply_overrides(default_config(), ["trian.lr=1"])
    assert "train" in str(info.value)


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 0.1\n  lrr: 0.2\n")
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_unknown_key_in_solver_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'solvers\[1\]\.temprature'"):
        load_config(write(tmp_path, "solvers:\n  - temperature: 0.5\n  - temprature: 0.5\n"))


def test_wrong_type_override() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(default_config(), ["train.lr=abc"])
    assert "train.lr: expected float, got str 'abc'" in str(info.value)


def test_wrong_type_in_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"validator\.enabled: expected bool, got str 'maybe'"):
        load_config(write(tmp_path, "validator:\n  enabled: maybe\n"))


def test_wrong_type_in_list_element() -> None:
    with pytest.raises(ConfigError, match=r"solvers\[0\]\.samples_per_problem: expected int"):
        apply_overrides(default_config(), ["solvers[0].samples_per_problem=many"])


def test_section_given_a_scalar() -> None:
    with pytest.raises(ConfigError, match="train: expected mapping, got int"):
        apply_overrides(default_config(), ["train=5"])


def test_bad_enum_value() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(default_config(), ["critic.backend=tgi"])
    message = str(info.value)
    assert message.startswith("critic.backend:") and "'tgi'" in message and "'vllm'" in message


@pytest.mark.parametrize("item", ["trainlr", "train.lr", "=3", "train..lr=1", ".lr=1"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match="malformed override"):
        apply_overrides(default_config(), [item])


def test_unparseable_override_value() -> None:
    with pytest.raises(ConfigError, match="override 'solvers'"):
        apply_overrides(default_config(), ["solvers=[{"])


def test_override_into_scalar_and_out_of_range_index() -> None:
    with pytest.raises(ConfigError, match="train.lr"):
        apply_overrides(default_config(), ["train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"solvers\[3\]"):
        apply_overrides(default_config(), ["solvers[3].temperature=1"])


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 0.1\n  batch_size: [1, 2\nbuffer: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "line " in message


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("text", ["- train\n- buffer\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("buffer.correct_ratio=1.5", "buffer.correct_ratio"),
        ("buffer.correct_ratio=-0.1", "buffer.correct_ratio"),
        ("buffer.max_staleness=-1", "buffer.max_staleness"),
        ("buffer.max_ahead=0", "buffer.max_ahead"),
        ("buffer.max_reuse=-1", "buffer.max_reuse"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.lr=0", "train.lr"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.steps_per_version=0", "train.steps_per_version"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("critic.batch_size=0", "critic.batch_size"),
        ("critic.temperature=-1", "critic.temperature"),
        ("solvers[0].samples_per_problem=0", "solvers[0].samples_per_problem"),
        ("solvers=[]", "solvers"),
        ("domain.max_ops=1", "domain.max_ops"),
        ("domain.long_share=1.5", "domain.long_share"),
        ("domain.num_problems=0", "domain.num_problems"),
        ("domain.heldout_seed=0", "domain.heldout_seed"),
        ("run.versions=0", "run.versions"),
        ("run.max_wall_seconds=0", "run.max_wall_seconds"),
        ("resources.actor_num_cpus=-0.5", "resources.actor_num_cpus"),
        ("resources.serve_replicas=0", "resources.serve_replicas"),
        ("serve.port=70000", "serve.port"),
        ("serve.max_batch_size=0", "serve.max_batch_size"),
        ("metrics.port=-1", "metrics.port"),
        ("critic.backend=http", "critic.model"),
        ("critic.model=https://example.org/v1", "critic.backend"),
        ("buffer.capacity=3", "buffer.capacity"),
    ],
)
def test_range_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(default_config(), [override])
    assert any(problem.startswith(f"{key}:") for problem in info.value.problems), str(info.value)


def test_long_problems_need_more_operations_than_the_rest() -> None:
    with pytest.raises(ConfigError, match="domain.long_max_ops: must be > domain.max_ops"):
        apply_overrides(default_config(), ["domain.long_share=0.2", "domain.long_max_ops=5"])


def test_split_rows_takes_auto_or_a_bool_and_not_deepspeed() -> None:
    assert default_config().train.split_rows == "auto"
    assert apply_overrides(default_config(), ["train.split_rows=false"]).train.split_rows is False
    assert apply_overrides(default_config(), ["train.split_rows=auto", "train.strategy=deepspeed"]).train.strategy == "deepspeed"
    with pytest.raises(ConfigError, match="train.split_rows: true needs train.strategy ddp"):
        apply_overrides(default_config(), ["train.split_rows=true", "train.strategy=deepspeed"])
    with pytest.raises(ConfigError, match="train.split_rows"):
        apply_overrides(default_config(), ["train.split_rows=sometimes"])


def test_long_share_sets_the_pools_share_of_long_problems() -> None:
    from scrit.problems import ProblemSource

    def operations(cfg) -> list[int]:  # "Step k:" lines of each reference solution
        return [problem.reference.count("Step ") for problem in ProblemSource(cfg).pool]

    short = operations(apply_overrides(default_config(), ["domain.num_problems=2000", "domain.long_share=0"]))
    mixed = operations(apply_overrides(default_config(), ["domain.num_problems=2000", "domain.long_share=0.2"]))
    assert set(short) == {2, 3, 4, 5}
    assert set(mixed) == {2, 3, 4, 5, 6, 7, 8}
    assert 0.16 < sum(n > 5 for n in mixed) / len(mixed) < 0.24


def test_range_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(default_config(), ["buffer.correct_ratio=2", "train.batch_size=0"])
    message = str(info.value)
    assert "buffer.correct_ratio" in message and "train.batch_size" in message


def test_range_error_from_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="buffer.correct_ratio"):
        load_config(write(tmp_path, "buffer:\n  correct_ratio: 3\n"))


def test_overrides_can_fix_a_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "domain:\n  min_ops: 6\n"), ["domain.max_ops=7"])
    assert (cfg.domain.min_ops, cfg.domain.max_ops) == (6, 7)


def test_validate_catches_wrong_types_set_in_code() -> None:
    cfg = default_config()
    cfg.train.lr = "fast"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        validate(cfg)
    cfg = default_config()
    cfg.buffer.correct_ratio = 7.0
    with pytest.raises(ConfigError, match="buffer.correct_ratio"):
        validate(cfg)


# --- round trips ----------------------------------------------------------------------------------


def test_dict_and_yaml_round_trip(tmp_path: Path) -> None:
    cfg = apply_overrides(default_config(), ["train.lr=3e-5", "solvers=[{temperature: 0.5}, {model: x}]"])
    data = config_to_dict(cfg)
    assert isinstance(data, dict) and data["train"]["lr"] == pytest.approx(3e-5)
    assert isinstance(data["solvers"], list) and data["solvers"][1]["model"] == "x"
    assert config_from_dict(data) == cfg
    assert msgspec.convert(data, ScritConfig) == cfg
    assert load_config(write(tmp_path, dump_yaml(cfg))) == cfg


def test_config_from_partial_dict() -> None:
    cfg = config_from_dict({"train": {"lr": 0.2}})
    assert cfg.train.lr == 0.2 and cfg.buffer == default_config().buffer
    with pytest.raises(ConfigError, match="unknown key 'train.x'"):
        config_from_dict({"train": {"x": 1}})


def test_api_key_redacted_in_dump_and_env_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = apply_overrides(default_config(), ["serve.api_key=s3cret"])
    assert "s3cret" not in dump_yaml(cfg)
    assert config_to_dict(cfg)["serve"]["api_key"] == "s3cret"
    assert config_to_dict(cfg, redact=True)["serve"]["api_key"] is None
    assert cfg.serve.resolved_api_key() == "s3cret"
    monkeypatch.setenv("SCRIT_API_KEY", "from-env")
    assert default_config().serve.resolved_api_key() == "from-env"
    monkeypatch.delenv("SCRIT_API_KEY")
    assert default_config().serve.resolved_api_key() is None
