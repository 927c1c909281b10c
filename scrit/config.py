"""Run configuration: typed msgspec structs loaded from YAML plus ``a.b=c`` overrides.

Defaults fit a 2-core CPU laptop running the built-in ``arith`` domain with the shipped seed model
(DESIGN.md §5, §11); a cluster user overrides resources, models and sizes in a YAML file or on the
command line. Every error is a ``ConfigError`` naming the full dotted key, because a typo in a
60-line config otherwise surfaces as a crash minutes into a distributed run.
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping

import msgspec
import yaml
from msgspec import Meta

__all__ = [
    "ConfigError",
    "RunConfig",
    "DomainConfig",
    "CriticConfig",
    "SolverSpec",
    "CorrectorConfig",
    "ValidatorConfig",
    "BufferConfig",
    "TrainConfig",
    "ResourcesConfig",
    "ServeConfig",
    "MetricsConfig",
    "VLLMConfig",
    "FaultsConfig",
    "ScritConfig",
    "BACKENDS",
    "default_config",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "validate",
]

Backend = Literal["hf", "vllm", "http"]
CritiqueMode = Literal["contrastive", "direct", "bug_injection"]
DomainName = Literal["arith", "gsm8k"]
Strategy = Literal["ddp", "deepspeed"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
PromptStyle = Literal["auto", "compact", "instruct"]

# Value ranges, said once (msgspec checks them on load, on overrides and in ``validate``).
AtLeast1 = Annotated[int, Meta(ge=1)]
AtLeast0 = Annotated[int, Meta(ge=0)]
Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
Port = Annotated[int, Meta(ge=0, le=65535)]  # 0 = pick a free port
Text = Annotated[str, Meta(pattern=r"\S")]  # not empty, not only spaces

BACKENDS: tuple[str, ...] = ("hf", "vllm", "http")
SEED_MODEL = "seed"  # the project's own seed critic (DESIGN.md §5)
CARELESS_SOLVER = "careless"  # the shipped careless solver (scrit/solver_models/careless)
API_KEY_ENV = "SCRIT_API_KEY"


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key (``train.lr``) and the problem."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base: keyword-only, unknown keys rejected (a misspelt key must never be silently ignored)."""


class RunConfig(_Section):
    name: Text = "default"
    run_dir: Text = "runs/default"  # checkpoints, registry, metrics and summaries go here
    seed: int = 0
    max_wall_seconds: Positive = 840.0  # the whole run stops (cleanly) after this long
    versions: AtLeast1 = 6  # critic versions to publish after the seed (version 0)
    # Held-out EI-F1 / CC-Acc of every K-th version, the seed (version 0) and the final one. The evaluator
    # shares the critic's engine: scoring all 7 versions took ~20 % of its work on two cores, ~40 % on one
    # (docs/learning.md, tenth pass); 2 scores 0, 2, 4, 6; 1 every version.
    eval_every: AtLeast1 = 2
    heldout_eval_items: AtLeast0 = 64  # in-run held-out items per version (2-5 operations); 0 disables evaluation
    heldout_hard_items: AtLeast0 = 32  # in-run harder held-out items per version (6-8 operations)
    keep_serving: bool = False  # leave the Serve endpoint up after the last version
    problems_per_batch: AtLeast1 = 32  # problems per pipeline batch (solve -> critique -> validate -> buffer)
    # Batches in the producer pipeline at once: while the critic works on one, the solvers work on the
    # next and the validator on the previous. 1 = the old synchronous loop, one stage at a time.
    batches_in_flight: AtLeast1 = 3
    # Per problem and solver: at most this many correct and this many incorrect. 1 spreads the same
    # generation over more distinct problems, which the critic needs more than more solutions to each
    # (README, "What was tried next").
    max_per_class: AtLeast1 = 1
    # The problem's own reference solution (just a correct solution, DESIGN.md §1) joins the solvers'
    # solutions as a correct one, so weak solvers still yield correct-vs-incorrect pairs.
    reference_as_correct: bool = True
    # How a published version reaches the run's engines and Serve replicas: Ray's object store (the
    # trainer puts the weights once; subscribers on any node reload from memory) or the checkpoint each
    # subscriber reads from shared storage. The checkpoint is written either way.
    weight_transport: Literal["object_store", "disk"] = "object_store"


class DomainConfig(_Section):
    name: DomainName = "arith"
    data_path: str | None = None  # gsm8k JSONL; unused by arith
    num_problems: AtLeast1 = 5000  # training problem pool size (more distinct problems beat more passes)
    min_ops: AtLeast1 = 2  # arith: operations per problem
    max_ops: AtLeast1 = 5
    # arith: this share of the pool gets max_ops+1 .. long_max_ops operations instead, so a critic trained
    # mostly on short chains keeps what it knows of long ones (0 = none: the pool before the tenth pass;
    # 0.15: the harder held-out set well above the seed, docs/learning.md, tenth pass)
    long_share: Fraction = 0.15
    long_max_ops: AtLeast1 = 8
    heldout_seed: int = 1_000_003  # held-out problems come from a different stream than run.seed


class CriticConfig(_Section):
    model: Text = SEED_MODEL  # "seed", a checkpoint directory, or an http(s) OpenAI-compatible URL
    backend: Backend = "vllm"  # vLLM: 2.7-3.8x HF's tokens/s here (README, "Engines")
    device: str = "auto"
    dtype: DType = "auto"  # float32 on CPU; bfloat16 there: faster engines, lower acc_cor (VLLMBackend's docstring)
    batch_size: AtLeast1 = 16
    max_new_tokens: AtLeast1 = 512  # the seed tokenizer is character-level: tokens = characters
    temperature: NonNegative = 0.0  # 0 = greedy
    mode: CritiqueMode = "contrastive"
    prompt_style: PromptStyle = "auto"  # compact for seed-family checkpoints, instruct otherwise
    num_actors: AtLeast1 = 1  # critic role actors; batches are spread over them
    # Engine replicas of the evolving critic, shared by the critic, corrector, validator and evaluator
    # (each version is loaded once per replica); a cluster gives each its GPUs (resources.engine_num_gpus).
    engines: AtLeast1 = 1


class SolverSpec(_Section):
    # "careless": the shipped solver trained to slip in one step more often than not (its own sampling,
    # not edited solutions); "seed", a checkpoint directory, or an http(s) URL
    model: Text = CARELESS_SOLVER
    backend: Backend = "vllm"
    device: str = "auto"
    dtype: DType = "auto"
    temperature: NonNegative = 1.0  # sampling diversity yields both correct and incorrect solutions
    samples_per_problem: AtLeast1 = 2
    max_new_tokens: AtLeast1 = 256
    num_actors: AtLeast1 = 1  # role actors for this solver
    engines: AtLeast1 = 1  # engine replicas of this solver model


class CorrectorConfig(_Section):
    model: Text | None = None  # None = the critic continues its own output (as in the paper)
    backend: Backend = "hf"
    max_new_tokens: AtLeast1 = 256
    num_actors: AtLeast1 = 1  # corrector role actors


class ValidatorConfig(_Section):
    enabled: bool = True
    require_answer_match: bool = True  # the correction's answer must also equal the known answer
    require_verdict_match: bool = True  # the critique's conclusion must agree with the final-answer label
    # Also re-judge critiques that call a solution with the right answer correct (they correct nothing;
    # the final answer confirms them). false: only corrections are judged (cheaper, and unbiased).
    rejudge_correct: bool = False
    num_actors: AtLeast1 = 1  # validator role actors (they share the critic's engines)


class BufferConfig(_Section):
    capacity: AtLeast1 = 2048
    correct_ratio: Fraction = 0.5  # share of examples whose student solution was correct (0.5 = 1:1)
    max_staleness: AtLeast0 = 2  # versions an example may lag the trainer; 0 = synchronous rounds
    max_ahead: AtLeast1 = 160  # backpressure: producers wait while the trainer has this many never-drawn examples
    max_reuse: AtLeast0 = 5  # times an example may be drawn before it retires (0 = unlimited; 5: docs/learning.md, ninth pass)
    strict: bool = True  # a batch short of one class waits (True) or is filled from the other (False)


class TrainConfig(_Section):
    strategy: Strategy = "ddp"
    zero_stage: Literal[0, 1, 2, 3] = 2  # DeepSpeed only
    num_workers: AtLeast1 = 1
    # Elastic training: with fewer CPUs/GPUs than num_workers need (a node lost), Ray Train runs with as
    # many workers as fit, down to min_workers. None = exactly num_workers.
    min_workers: AtLeast1 | None = None
    lr: Positive = 3e-4
    batch_size: AtLeast1 = 4  # examples per micro-batch (x grad_accum = examples per optimizer step)
    grad_accum: AtLeast1 = 2  # 4 x 2: the activations of 4 examples at a time (the trainer's peak memory)
    steps_per_version: AtLeast1 = 110  # K: optimizer steps between published versions (6 x 110 fits 13 min here)
    # Fewer steps per version (steps_per_version at most) when the measured pace would not publish every
    # version inside run.max_wall_seconds (less 10 % for the final evaluation): a slow machine finishes
    # its versions and its learning-rate schedule instead of stopping part-way (train/budget.py).
    fit_wall_budget: bool = True
    max_seq_len: Annotated[int, Meta(ge=16)] = 1024
    bf16: bool = True  # bf16 autocast is ~1.6x faster than fp32 on the dev CPUs
    # Run each micro-batch one row at a time, each row cut to its own length: no compute on padding
    # (1.47x tokens/s on one core here, benchmarks/trainer.py), the same loss and gradient; auto = on CPU
    # (a GPU runs the padded batch faster). ddp only: DeepSpeed counts its own micro-steps.
    split_rows: bool | Literal["auto"] = "auto"
    weight_decay: NonNegative = 0.0
    warmup_steps: AtLeast0 = 10
    # cosine | linear: decay to 0 at versions x steps_per_version (a steady final version);
    # constant: keep the rate after the warm-up
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: Positive = 1.0
    # Loss weight per target token (train/sft.py LossWeights): the verdict words, every computed result
    # (the Y of "X op N = Y"), every token of a real correction. All 1.0 = the plain per-token mean.
    verdict_weight: Positive = 1.0
    result_weight: Positive = 3.0  # x3: measured in docs/learning.md (issue 18, second pass)
    correction_weight: Positive = 1.0
    # x on the results computed on the line the critique marks wrong (on top of result_weight): the one
    # place where copying the student's result is not right
    wrong_step_weight: Positive = 1.5  # x1.5 with seed_share 0.5: docs/learning.md, seventh and eighth pass
    # solver examples trained beside the critiques, per critique example: right-answer student solutions
    # of the batch as answers to their problems, so the critic keeps its arithmetic (0 = critiques only;
    # 0.25: CC-Acc +7 / +12 % vs +4 / +10 % without, docs/learning.md, fourth pass)
    rehearsal_share: Fraction = 0.25
    # share of the seed's weights in every published version, (1 - s) x trained + s x seed (WiSE-FT): the
    # published critic keeps what the seed could do beyond the loop's data (correct solutions called
    # correct, longer problems); the trainer trains on, and resumes from, its own weights (run_dir/trained)
    seed_share: Annotated[float, Meta(ge=0, lt=1)] = 0.5


class ResourcesConfig(_Section):
    """Ray resource sizes; fractional by default because 2 cores otherwise deadlock (DESIGN.md §11)."""

    engine_num_cpus: NonNegative = 0.25  # every engine actor (critic and solver engines do the generating)
    engine_num_gpus: NonNegative = 0.0
    engine_max_concurrency: AtLeast1 = 16  # role calls one engine serves at once (continuous batching)
    # Added to every engine actor's OS nice value: where the processes outnumber the cores, the trainer (the
    # consumer of what the engines generate) goes first, and the engines take what it leaves; with spare
    # cores it changes nothing. 0 = equal priority.
    engine_nice: Annotated[int, Meta(ge=0, le=19)] = 10
    # Replica k of every model's engine in one actor process (one copy of torch and vLLM): right for CPU
    # machines; on GPU clusters give each engine its own actor and GPUs (false).
    colocate_engines: bool = True
    actor_num_cpus: NonNegative = 0.05  # every role actor (solver, critic, corrector, validator, evaluator)
    actor_num_gpus: NonNegative = 0.0
    train_worker_num_cpus: NonNegative = 0.5
    train_worker_num_gpus: NonNegative = 0.0
    serve_replica_num_cpus: NonNegative = 0.25
    serve_replica_num_gpus: NonNegative = 0.0
    serve_replicas: AtLeast1 = 1
    state_num_cpus: NonNegative = 0.0  # the replay buffer and weight registry (light; 0 fits beside the driver on any head)
    # Engine hosts and role actors: "spread" over every node that fits them (a lost node takes only
    # its share), or "default": Ray's own placement (fill a node before the next).
    placement: Literal["spread", "default"] = "spread"


class ServeConfig(_Section):
    enabled: bool = True
    host: Text = "127.0.0.1"
    port: Port = 8000
    api_key: Text | None = None  # None: fall back to $SCRIT_API_KEY; neither set = no auth
    max_problem_chars: AtLeast1 = 4000
    max_steps: AtLeast1 = 64
    max_batch_size: AtLeast1 = 8
    batch_wait_timeout_s: NonNegative = 0.01

    def resolved_api_key(self) -> str | None:
        """The key requests must carry; read at use time so the secret never lands in dumped configs."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


class MetricsConfig(_Section):
    enabled: bool = True
    port: Port = 0  # 0 = pick a free port


class VLLMConfig(_Section):
    """Engine options for every engine whose ``backend`` is ``vllm`` (``scrit.backends.VLLMBackend``),
    running inside its engine actor or Serve replica."""

    tensor_parallel_size: AtLeast1 = 1  # GPUs per engine; give the engines as many (resources.engine_num_gpus)
    gpu_memory_utilization: Annotated[float, Meta(gt=0, le=1)] = 0.85  # share of each GPU (weights + KV cache)
    max_model_len: Annotated[int, Meta(ge=16)] | None = None  # None = the model's own context length
    kv_cache_gib: Positive | None = None  # KV cache per engine; None = 0.25 GiB on CPU, on GPU what the above leaves
    cpu_threads: AtLeast1 = 1  # CPU only: OpenMP threads per engine (1 is fastest on shared cores)
    enforce_eager: bool | None = None  # None = eager on CPU (faster start), compiled + CUDA graphs on GPU


class FaultsConfig(_Section):
    """How a long run survives crashes (README, "Failures"): restarts and retries, all bounded."""

    # stage, engine, evaluator, buffer and registry actors restart after a crash (-1 = always)
    actor_max_restarts: Annotated[int, Meta(ge=-1)] = 3
    actor_task_retries: AtLeast0 = 2  # an idempotent actor call whose actor died runs again on the restarted actor
    batch_retries: AtLeast0 = 4  # a pipeline batch whose actor died for good is sent through the pipeline again
    # seconds before the first resend, doubled for each later one (5, 10, 20, 40 s): long enough in all for
    # Ray to notice a lost node and restart its actors elsewhere (15-46 s measured, docs/multinode.md)
    batch_retry_backoff_s: Positive = 5.0
    train_max_failures: AtLeast0 = 3  # Ray Train restarts its workers this often (FailureConfig.max_failures)


class ScritConfig(_Section):
    run: RunConfig = msgspec.field(default_factory=RunConfig)
    domain: DomainConfig = msgspec.field(default_factory=DomainConfig)
    critic: CriticConfig = msgspec.field(default_factory=CriticConfig)
    solvers: Annotated[list[SolverSpec], Meta(min_length=1)] = msgspec.field(default_factory=lambda: [SolverSpec()])
    corrector: CorrectorConfig = msgspec.field(default_factory=CorrectorConfig)
    validator: ValidatorConfig = msgspec.field(default_factory=ValidatorConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    train: TrainConfig = msgspec.field(default_factory=TrainConfig)
    resources: ResourcesConfig = msgspec.field(default_factory=ResourcesConfig)
    serve: ServeConfig = msgspec.field(default_factory=ServeConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    vllm: VLLMConfig = msgspec.field(default_factory=VLLMConfig)
    faults: FaultsConfig = msgspec.field(default_factory=FaultsConfig)


# --------------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (PyYAML's YAML 1.1 rules make it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_error_text(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return problem


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file '{path}': {error}") from error
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"malformed YAML in '{path}': {_yaml_error_text(error)}") from error
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}': the top level must be a mapping of sections, got {_kind(data)}"
        )
    # A section written as a bare key (``train:``) keeps its defaults rather than failing as null.
    return {key: value for key, value in data.items() if value is not None}


# --------------------------------------------------------------------------------------------------
# Schema walking and error messages

_ROOT_INFO = msgspec.inspect.type_info(ScritConfig)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _join(path: str, key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _struct_in(info: Any) -> Any:
    """The StructType inside ``info`` (directly or as a union member), else None."""
    if isinstance(info, msgspec.inspect.StructType):
        return info
    if isinstance(info, msgspec.inspect.UnionType):
        for member in info.types:
            if isinstance(member, msgspec.inspect.StructType):
                return member
    return None


def _unknown_key(path: str, key: Any, struct: Any) -> ConfigError:
    valid = [field.name for field in struct.fields]
    dotted = _join(path, key)
    where = f"in '{path}'" if path else "(sections)"
    message = f"unknown key '{dotted}'"
    close = difflib.get_close_matches(str(key), valid, n=1)
    if close:
        message += f" (did you mean '{_join(path, close[0])}'?)"
    return ConfigError(f"{message}; valid keys {where}: {', '.join(valid)}")


def _check_keys(data: Any, info: Any, path: str = "") -> None:
    """Reject unknown keys anywhere, naming the dotted key and the section's valid keys."""
    struct = _struct_in(info)
    if struct is not None and isinstance(data, dict):
        fields = {field.name: field for field in struct.fields}
        for key, value in data.items():
            if key not in fields:
                raise _unknown_key(path, key, struct)
            _check_keys(value, fields[key].type, _join(path, key))
    elif isinstance(info, msgspec.inspect.ListType) and isinstance(data, list):
        for index, item in enumerate(data):
            _check_keys(item, info.item_type, _join(path, index))


_PATH_TOKEN = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")


def _split_msgspec_path(path: str) -> list[str | int]:
    """``$.solvers[0].temperature`` -> ['solvers', 0, 'temperature']."""
    return [name if name else int(index) for name, index in _PATH_TOKEN.findall(path.lstrip("$"))]


def _dotted(tokens: Iterable[str | int]) -> str:
    path = ""
    for token in tokens:
        path = _join(path, token)
    return path


def _lookup(data: Any, tokens: list[str | int]) -> Any:
    for token in tokens:
        try:
            data = data[token]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _type_at(tokens: list[str | int]) -> Any:
    info: Any = _ROOT_INFO
    for token in tokens:
        struct = _struct_in(info)
        if isinstance(token, str) and struct is not None:
            info = next((f.type for f in struct.fields if f.name == token), None)
        elif isinstance(token, int) and isinstance(info, msgspec.inspect.ListType):
            info = info.item_type
        else:
            return None
    return info


def _literal_values(info: Any) -> tuple[Any, ...]:
    if isinstance(info, msgspec.inspect.LiteralType):
        return info.values
    if isinstance(info, msgspec.inspect.UnionType):
        return tuple(v for member in info.types for v in _literal_values(member))
    return ()


_TYPE_WORDS = {"object": "mapping", "array": "list"}


def _translate(error: msgspec.ValidationError, data: Any) -> ConfigError:
    """Turn msgspec's ``Expected `float`, got `str` - at `$.train.lr``` into
    ``train.lr: expected float, got str 'abc'``: the dotted key a user can grep their YAML for."""
    text = str(error)
    match = re.match(r"(?s)(?P<msg>.*?)(?: - at `(?P<path>[^`]*)`)?$", text)
    assert match is not None  # the pattern matches any string
    msg, tokens = match["msg"], _split_msgspec_path(match["path"] or "$")
    key = _dotted(tokens)
    value = _lookup(data, tokens)
    shown = reprlib.repr(value)

    unknown = re.match(r"Object contains unknown field `(.*)`", msg)
    if unknown:
        struct = _struct_in(_type_at(tokens))
        if struct is not None:
            return _unknown_key(key, unknown[1], struct)
        return ConfigError(f"unknown key '{_join(key, unknown[1])}'")
    expected = re.match(r"Expected `(.*?)`, got `(.*?)`(.*)", msg)
    if expected:
        want = " | ".join(_TYPE_WORDS.get(part, part) for part in expected[1].split(" | "))
        got = _TYPE_WORDS.get(expected[2], expected[2])
        suffix = "" if value is None or isinstance(value, (dict, list)) else f" {shown}"
        return ConfigError(f"{key or 'config'}: expected {want}, got {got}{suffix}{expected[3]}")
    if msg.startswith("Invalid enum value"):
        allowed = ", ".join(repr(v) for v in _literal_values(_type_at(tokens)))
        return ConfigError(f"{key}: must be one of {allowed}, got {shown}")
    bound = re.match(r"Expected `\w+` ((?:>=|>|<=|<) \S+)$", msg)
    if bound:  # a Meta(ge=..., le=...) range
        return ConfigError(f"{key}: must be {bound[1]}, got {shown}")
    if re.match(r"Expected `str` matching regex|Expected `array` of length >= 1", msg):
        return ConfigError(f"{key}: must not be empty, got {shown}")
    # Anything else msgspec says (constraints, missing fields) still gets the dotted key.
    return ConfigError(f"{key or 'config'}: {msg[:1].lower()}{msg[1:]}")


def _convert(data: Any, source: str | None = None) -> ScritConfig:
    """Dict -> ScritConfig with readable errors (``source`` prefixes them, e.g. a file path). msgspec stops
    at a section's first problem; every section is checked, so all sections' problems are reported."""
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"the config must be a mapping of sections, got {_kind(data)}")
        _check_keys(data, _ROOT_INFO)
        sections = {field.name: field.type for field in msgspec.structs.fields(ScritConfig)}
        problems = []
        for name, value in data.items():
            try:
                msgspec.convert(value, sections[name])
            except msgspec.ValidationError as error:
                problems += _translate(_at(error, name), data).problems
        if problems:
            raise ConfigError("\n".join(problems), problems)
        try:
            return msgspec.convert(data, ScritConfig)
        except msgspec.ValidationError as error:
            raise _translate(error, data) from error
    except ConfigError as error:
        if source is None:
            raise
        raise ConfigError(f"{source}: {error}", [f"{source}: {p}" for p in error.problems]) from error


def _at(error: msgspec.ValidationError, section: str) -> msgspec.ValidationError:
    """A section's error with the section put in front of its path (``$.lr`` -> ``$.train.lr``)."""
    text = str(error)
    if " - at `$" in text:
        return msgspec.ValidationError(text.replace(" - at `$", f" - at `$.{section}", 1))
    return msgspec.ValidationError(f"{text} - at `$.{section}`")


# --------------------------------------------------------------------------------------------------
# Value checks


def _range_problems(cfg: ScritConfig) -> list[str]:
    """What single fields cannot say (their own ranges are ``Meta`` constraints on the structs): values
    that type-check and are each in range, but together would break or silently corrupt a run."""
    problems: list[str] = []

    def need(condition: bool, key: str, rule: str, value: Any) -> None:
        if not condition:
            problems.append(f"{key}: {rule}, got {value!r}")

    def model_backend(prefix: str, model: str | None, backend: str) -> None:
        if model is None:
            return
        is_url = model.startswith(("http://", "https://"))
        if backend == "http":
            need(is_url, f"{prefix}.model", "backend 'http' needs an http(s) URL", model)
        elif is_url:
            need(False, f"{prefix}.backend", f"must be 'http' for the URL model {model!r}", backend)

    need(cfg.domain.max_ops >= cfg.domain.min_ops, "domain.max_ops", f"must be >= domain.min_ops ({cfg.domain.min_ops})",
         cfg.domain.max_ops)
    need(cfg.domain.long_share == 0 or cfg.domain.long_max_ops > cfg.domain.max_ops, "domain.long_max_ops",
         f"must be > domain.max_ops ({cfg.domain.max_ops}) when domain.long_share is above 0 "
         f"(domain.long_share=0: no longer problems)", cfg.domain.long_max_ops)
    # The same seed for training and held-out problems would evaluate on the training set.
    need(cfg.domain.heldout_seed != cfg.run.seed, "domain.heldout_seed", "must differ from run.seed",
         cfg.domain.heldout_seed)
    model_backend("critic", cfg.critic.model, cfg.critic.backend)
    for index, solver in enumerate(cfg.solvers):
        model_backend(f"solvers[{index}]", solver.model, solver.backend)
    model_backend("corrector", cfg.corrector.model, cfg.corrector.backend)
    if cfg.train.min_workers is not None:
        need(cfg.train.min_workers <= cfg.train.num_workers, "train.min_workers",
             f"must be <= train.num_workers ({cfg.train.num_workers})", cfg.train.min_workers)
    need(not (cfg.train.split_rows is True and cfg.train.strategy == "deepspeed"), "train.split_rows",
         "true needs train.strategy ddp (DeepSpeed counts its own micro-steps); use auto or false",
         cfg.train.split_rows)
    # The trainer draws whole batches; a smaller buffer could never supply one.
    need(cfg.buffer.capacity >= cfg.train.batch_size, "buffer.capacity",
         f"must be >= train.batch_size ({cfg.train.batch_size})", cfg.buffer.capacity)
    return problems


def validate(cfg: ScritConfig) -> ScritConfig:
    """Check types (also for configs built in code, which msgspec does not check) and value ranges.

    Returns ``cfg`` unchanged; raises ConfigError listing every problem, one ``key: problem`` per line.
    """
    if not isinstance(cfg, ScritConfig):
        raise ConfigError(f"expected a ScritConfig, got {type(cfg).__name__}")
    try:
        data = msgspec.to_builtins(cfg)
    except TypeError as error:  # a value of a type msgspec cannot even serialize
        raise ConfigError(f"config holds a value of an unsupported type: {error}") from error
    _convert(data)  # type check: structs built directly are not validated by msgspec
    problems = _range_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems), problems)
    return cfg


# --------------------------------------------------------------------------------------------------
# Public API


def default_config() -> ScritConfig:
    """The laptop defaults (arith + seed model, fractional CPUs)."""
    return ScritConfig()


def config_from_dict(data: Mapping[str, Any]) -> ScritConfig:
    """A (possibly partial) nested dict -> validated config; missing keys keep their defaults."""
    return validate(_convert(dict(data)))


def config_to_dict(cfg: ScritConfig, *, redact: bool = False) -> dict[str, Any]:
    """Plain builtins for summaries and logging.

    ``redact`` drops the API key, so a reloaded copy falls back to $SCRIT_API_KEY.
    """
    data = msgspec.to_builtins(cfg)
    if redact and data["serve"].get("api_key") is not None:
        data["serve"]["api_key"] = None
    return data


def dump_yaml(cfg: ScritConfig, *, redact: bool = True) -> str:
    """YAML that ``load_config`` reads back; redacts the API key by default since dumps land in run dirs."""
    return yaml.safe_dump(config_to_dict(cfg, redact=redact), sort_keys=False, default_flow_style=False)


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> ScritConfig:
    """Defaults, updated by the YAML file at ``path`` (may be partial), then by ``overrides``; validated."""
    if path is None:
        cfg = default_config()
    else:
        cfg = _convert(_read_yaml(Path(path)), source=str(path))
    return apply_overrides(cfg, overrides)


def _parse_override(item: str) -> tuple[list[str | int], str, Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"malformed override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    normalized = re.sub(r"\[(\d+)\]", r".\1", key)  # solvers[0].temperature == solvers.0.temperature
    parts = normalized.split(".")
    if not key or any(not part for part in parts):
        raise ConfigError(f"malformed override {item!r}: the key must be dotted names like train.lr")
    tokens: list[str | int] = [int(p) if p.isdigit() else p for p in parts]
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as error:
        problem = _yaml_error_text(error)
        raise ConfigError(f"override '{key}': cannot parse value {raw!r}: {problem}") from error
    return tokens, raw.strip(), value


def _accepts_str(info: Any) -> bool:
    if isinstance(info, msgspec.inspect.StrType):
        return True
    if isinstance(info, msgspec.inspect.LiteralType):
        return any(isinstance(v, str) for v in info.values)
    if isinstance(info, msgspec.inspect.UnionType):
        return any(_accepts_str(member) for member in info.types)
    return False


def _accepts_scalar(info: Any, value: Any) -> bool:
    kinds = {bool: msgspec.inspect.BoolType, int: msgspec.inspect.IntType, float: msgspec.inspect.FloatType}
    wanted = kinds.get(type(value))
    members = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return wanted is not None and any(isinstance(m, wanted) for m in members)


def _deep_merge(old: Any, new: Any) -> Any:
    """Mapping values merge into the existing section (``train={lr: 1}`` keeps other train keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        merged = dict(old)
        for key, value in new.items():
            merged[key] = _deep_merge(old.get(key), value)
        return merged
    return new


def _set_path(data: dict[str, Any], tokens: list[str | int], value: Any) -> None:
    node: Any = data
    for depth, token in enumerate(tokens):
        here = _dotted(tokens[:depth])
        last = depth == len(tokens) - 1
        if isinstance(node, dict):
            if token not in node:
                struct = _struct_in(_type_at(tokens[:depth])) or _struct_in(_ROOT_INFO)
                raise _unknown_key(here, token, struct)
            if last:
                node[token] = _deep_merge(node[token], value)
            else:
                node = node[token]
        elif isinstance(node, list):
            if not isinstance(token, int):
                raise ConfigError(f"{here}: is a list; index it with a number, e.g. {here}[0]")
            if not 0 <= token < len(node):
                raise ConfigError(f"{_join(here, token)}: index out of range ({here} has {len(node)} items)")
            if last:
                node[token] = _deep_merge(node[token], value)
            else:
                node = node[token]
        else:
            raise ConfigError(f"{here}: is a value, not a section; cannot set '{_dotted(tokens)}'")


def apply_overrides(cfg: ScritConfig, overrides: Iterable[str]) -> ScritConfig:
    """A new validated config with each ``a.b=value`` applied (values use YAML scalar rules).

    ``cfg`` is not modified. A value for a string field keeps its literal text (``run.name=2024``).
    """
    if isinstance(overrides, str):  # a lone "a=b" would otherwise be iterated character by character
        overrides = [overrides]
    data = msgspec.to_builtins(cfg)
    for item in overrides:
        tokens, raw, value = _parse_override(item)
        info = _type_at(tokens)
        if (
            isinstance(value, (bool, int, float))
            and _accepts_str(info)
            and not _accepts_scalar(info, value)
        ):
            value = raw
        _set_path(data, tokens, value)
    return validate(_convert(data))
