"""Schema-first configuration: dataclasses are the source of truth.

Precedence: schema defaults < `configs/<stage>.yaml` < overlay YAML files < `key=value` overrides
(values parsed as YAML scalars, dotted keys reach nested sections). Unknown keys fail naming the
valid ones; every problem is collected and reported at once (`ConfigError`, exit code 2).
Each field's one-line help lives in `field(metadata={"help": ...})`, see `help_text`.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"


class InputError(ValueError):
    """Bad input from the user (configuration, data, parent stages, launcher files, model
    directories): a stage ends with its message as one line. Any other exception is a bug and
    keeps its traceback (`pipeline.stage.stage_main`)."""


class ConfigError(InputError):
    """All problems found in one configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:  # one problem, one line
            super().__init__(f"invalid configuration: {problems[0]}")
        else:
            super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def F(default: Any, help: str, ge: float | None = None, gt: float | None = None, le: float | None = None,  # noqa: A002
      lt: float | None = None, **kw: Any) -> Any:
    """A dataclass field with a default, its one-line help and, for a number (or a list of them),
    its bounds: ge (>=), gt (>), le (<=), lt (<), checked for every value however it was set."""
    metadata = {"help": help, "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                                         if v is not None}}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_TEST = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b,
               "lt": lambda v, b: v < b}


def bound_problems(cfg: Any, prefix: str = "") -> list[str]:
    """Every number of `cfg` (nested sections included) outside its field's bounds, one line each."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            problems += bound_problems(value, f"{prefix}{f.name}.")
            continue
        bounds = f.metadata.get("bounds") or {}
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                broken = [f"{_BOUND_TEXT[k]} {b:g}" for k, b in bounds.items() if not _BOUND_TEST[k](v, b)]
                if broken:
                    problems.append(f"{prefix}{f.name}: must be {' and '.join(broken)}, got {v!r}")
    return problems


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


# --------------------------------------------------------------------------------------------
# Sections shared by every stage
# --------------------------------------------------------------------------------------------
@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = F(
        "auto", "auto = online if a wandb API key is configured, else offline (no network needed)")
    project: str = F("alignment-pipeline", "wandb project name")
    entity: str | None = F(None, "wandb entity (team); None = your default")


@dataclass
class WorldConfig:
    seed: int = F(1234, "seed of the built-in procedural world (facts, prompts, splits)", ge=0)
    num_people: int = F(48, "people in the world; each has a home city and a favourite colour", gt=0)
    corpus_docs: int = F(12000, "pretraining documents generated from the world", gt=0)
    fact_density: float = F(0.8, "share of corpus sentences that state a fact about a person (the rest: sums, capitalised words, prose)", ge=0, le=1)
    sft_examples: int = F(5500, "SFT demonstrations (train split)", gt=0)
    sft_turns: int = F(1, "question/answer exchanges per SFT conversation", ge=1)
    eval_examples: int = F(50, "held-out prompts per skill for evaluation", gt=0)
    concise_rate: float = F(0.2, "share of SFT demonstrations written in the concise style the gold labeler prefers", ge=0, le=1)
    house_style_rate: float = F(0.7, "share of chatty demonstrations that end with the most common tail (the rest use "
                                     "the others): with a house style the SFT policy's greedy answer is chatty", ge=0, le=1)
    preamble_rate: float = F(0.3, "share of chatty demonstrations that also open with a preamble (`Sure!`, ...)", ge=0, le=1)
    strangers: int = F(0, "people who exist in no data: a question about one has no answer and the demonstrations "
                          "abstain (`Answer: unknown.`); > 0 turns on the honesty axis: the judge gives an abstention "
                          "on an answerable question `abstain_score` (docs/world.md). Half are asked about in training "
                          "prompts (sft, rm, ppo), the other half only in held-out ones (valid, test)", ge=0)
    abstain_score: float = F(1.5, "with strangers > 0: the judge's correctness credit for `Answer: unknown.` on a question "
                                  "that has an answer (right 3, wrong 0): abstaining pays when the chance of being right "
                                  "is below abstain_score / 3", ge=0, le=3)
    abstain_demos: float = F(0.0, "with strangers > 0: share of the SFT demonstrations on a fact or sum the pretrained "
                                  "model gets wrong (greedy completion of its corpus sentence) that abstain instead of "
                                  "answering (refusal-aware tuning, R-Tuning; docs/world.md): the demonstrator then "
                                  "knows what the model knows, and imitation teaches where to abstain", ge=0, le=1)
    fact_range: float = F(1.0, "how many times more often the corpus describes its most described person than its least "
                               "(log-uniform between; held-out and SFT people span the range alike): > 1 gives the "
                               "knowledge a long tail the model half learns, as real pretraining does (docs/world.md); "
                               "1 = every person equally often", ge=1)
    tokenizer_demos: bool = F(False, "also train the BPE on the SFT demonstrations' text: instruction words become whole "
                                     "tokens and SFT sequences ~40% shorter (pretraining data unchanged)")


@dataclass
class DataSource:
    """The base of every stage's `data` section: where the data comes from. Each stage's section
    adds its own fields (and words `files` for what it reads)."""

    source: Literal["world", "files"] = F("world", "'world' = the built-in world's data; 'files' = data.files")
    files: list[str] = F([], "JSONL/JSON/Parquet/CSV files, save_to_disk directories or hub dataset names")
    config: str | None = F(None, "configuration of a hub dataset or dataset directory (load_dataset's name); files have none")
    split: str | None = F(None, "split of a hub dataset, dataset directory or save_to_disk DatasetDict (default: train)")


@dataclass
class BatchConfig:
    """The `batch` section of every stage. Micro-batches and accumulation are derived
    (`pipeline.runtime.batch_split`), never configured."""

    size: int = F(32, "items per optimizer step, all processes together (pretrain: sequences, sft: examples, rm: "
                      "prompts or pairs, dpo: pairs, ppo: episodes)", gt=0)
    micro: int = F(16, "at most this many items per process per forward/backward (lowered to divide size / processes); "
                       "the defaults are at most size / 2, so 1 and 2 processes form the same micro-batches", gt=0)
    forward: int = F(64, "sequences per no-grad forward or generation batch (evaluation, sampling, scoring): a memory knob", gt=0)


@dataclass
class StageConfig:
    """Fields every stage has. Every stage also has the sections `data` (a `DataSource`),
    `batch` (a `BatchConfig`), `optim`, and `steps`, its one training length (tests/test_config_keys.py)."""

    run_name: str = F("default", "run name: outputs go to <runs_dir>/<run_name>/<stage>/")
    runs_dir: str = F("runs", "root directory of all runs")
    parent: str | None = F(None, "explicit parent: a stage directory or its manifest.json (default: previous stage of this run)")
    seed: int = F(0, "training seed (data order, init, sampling)", ge=0)
    threads: int = F(0, "torch threads per process; 0 = all cores for a lone process, 1 when several run", ge=0)
    resume: bool = F(True, "resume from the latest checkpoint in <stage>/checkpoints if one exists")
    save_every: int = F(100, "checkpoint every N optimizer steps (0 = only at the end)", ge=0)
    keep_checkpoints: int = F(2, "how many periodic checkpoints to keep", ge=1)
    log_every: int = F(10, "log metrics every N optimizer steps", ge=1)
    stop_after: int = F(-1, "end the process right after step N (PPO: iteration N), leaving a checkpoint, as an interruption "
                            "would; re-running the same command resumes and finishes (-1 = never)", ge=-1)
    precision: Literal["auto", "no", "bf16", "fp16"] = F(
        "auto", "mixed precision; auto = bf16 on GPUs that support it, else fp32 (on CPUs with AMX, bf16 trains 1.3-2x "
                "faster and decodes no faster; the tiny preset's results are not equal in it: see docs/distributed.md)")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = F(
        "auto", "attention kernel of every model the stage loads: auto = flash_attention_2 on a GPU with the flash-attn "
                "package installed, eager for bf16 on a CPU, else sdpa")
    gradient_checkpointing: bool = F(False, "recompute activations in the backward pass of trained models (less memory, ~30% slower)")
    dist_timeout_min: float = F(120.0, "minutes a process waits in a collective before the run fails (rank 0 alone "
                                       "trains a tokenizer or writes a full checkpoint meanwhile); every launcher", gt=0)
    tf32: bool = F(True, "on GPUs, fp32 matmuls (paths without autocast) use TF32 tensor cores; false = full fp32")
    reduce_fp32: bool = F(True, "with bf16/fp16 under fsdp and zero2/zero3, gradients are summed across processes in fp32 "
                                "(false: in 16 bits, half the traffic, rounded; ddp always reduces the fp32 gradients)")
    memory_check: bool = F(True, "on a GPU, stop at start when the memory plan (`python -m pipeline plan`) says the run "
                                 "does not fit; false = go ahead anyway")
    world: WorldConfig = F(WorldConfig(), "the built-in world (used when data source is 'world')")
    wandb: WandbConfig = F(WandbConfig(), "Weights & Biases logging")

    stage: typing.ClassVar[str] = ""

    def attention(self) -> str:
        """The attention kernel to load models with (`pipeline.models.attn_implementation`)."""
        from pipeline.models import attn_implementation
        from pipeline.runtime import resolve_precision

        return attn_implementation(self.attn_implementation, resolve_precision(self.precision))

    def stops_at(self, step: int, total: int) -> bool:
        """True exactly at step `stop_after` of a run of `total` steps (never at its last)."""
        return step == self.stop_after < total

    def validate(self) -> list[str]:
        """Cross-field checks; returns problems (empty = fine). Subclasses extend."""
        problems = []
        if not self.run_name or "/" in self.run_name:
            problems.append("run_name: must be a non-empty name without '/'")
        data = getattr(self, "data", None)
        if isinstance(data, DataSource) and data.source == "files" and not data.files and self.reads_data_files():
            problems.append("data.files: required when data.source is 'files'")
        if self.world.abstain_demos and not self.world.strangers:
            problems.append("world.abstain_demos: needs world.strangers > 0 (without strangers the judge scores an "
                            "abstention as a wrong answer)")
        return problems

    def reads_data_files(self) -> bool:
        """Whether `data.source=files` reads `data.files` (rm's export_only reads prompts instead)."""
        return True


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def help_text(cls: type) -> dict[str, str]:
    """Flattened `dotted.key -> help` for a config class (used by `--help`)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(_hints(cls)[f.name])
        if sub is not None:
            out.update({f"{f.name}.{k}": v for k, v in help_text(sub).items()})
        else:
            out[f.name] = f.metadata.get("help", "")
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(tp: Any) -> type | None:
    for t in _union_args(tp):
        if dataclasses.is_dataclass(t):
            return t
    return None


def _union_args(tp: Any) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check/convert a YAML value against a type annotation; append a problem on mismatch."""
    args = _union_args(tp)
    if value is None:
        if type(None) in args:
            return None
        problems.append(f"{where}: null is not allowed (expected {_type_name(tp)})")
        return None
    for t in args:
        if t is type(None):
            continue
        origin = typing.get_origin(t)
        if origin is Literal:
            choices = typing.get_args(t)
            if isinstance(value, bool) and not any(c is value for c in choices):
                # YAML 1.1 reads no/off/yes/on as booleans: `precision=no` means the choice "no"
                spelled = [c for c in choices if isinstance(c, str) and yaml.safe_load(c) is value]
                if len(spelled) == 1:
                    return spelled[0]
                continue
            if value in choices:
                return value
            continue
        if origin in (list, tuple):
            if isinstance(value, (list, tuple)):
                (item_t,) = typing.get_args(t)[:1] or (Any,)
                return [_coerce(v, item_t, f"{where}[{i}]", problems) for i, v in enumerate(value)]
            if isinstance(value, str):  # a single item given on the command line
                return [value]
            continue
        if origin is dict or t is dict:
            if isinstance(value, dict):
                return dict(value)
            continue
        if t is Any:
            return value
        if t is bool:
            if isinstance(value, bool):
                return value
            continue
        if t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            continue
        if t is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads "1e-3" as a string
                except ValueError:
                    pass
            continue
        if t is str:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            continue
    problems.append(f"{where}: got {value!r}, expected {_type_name(tp)}")
    return value


def _type_name(tp: Any) -> str:
    parts = []
    for t in _union_args(tp):
        if typing.get_origin(t) is Literal:
            parts.append(" | ".join(repr(a) for a in typing.get_args(t)))
        elif t is type(None):
            parts.append("null")
        else:
            parts.append(getattr(t, "__name__", str(t)))
    return " or ".join(parts)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _build(cls: type, data: dict, prefix: str, problems: list[str], source: dict[str, str], base: Any = None):
    """`cls` from `data`, starting from `base` (a section's own default: `F(OptimConfig(lr=1e-3))`
    keeps lr=1e-3 when only optim.warmup_steps is set) or, at the top, the class defaults."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(f"{where}: unknown key{_src(source, where)}{hint}; valid keys: {', '.join(fields)}")
            continue
        sub = _dataclass_type(hints[key])
        if sub is not None:
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping of {sub.__name__} fields, got {value!r}")
                continue
            default = getattr(base, key) if base is not None else _field_default(fields[key])
            kwargs[key] = _build(sub, value, f"{where}.", problems, source,
                                 default if isinstance(default, sub) else None)
        else:
            kwargs[key] = _coerce(value, hints[key], where + _src(source, where), problems)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _src(source: dict[str, str], where: str) -> str:
    return f" (from {source[where]})" if where in source else ""


def _record_sources(data: dict, origin: str, prefix: str, source: dict[str, str]) -> None:
    for k, v in data.items():
        if isinstance(v, dict):
            _record_sources(v, origin, f"{prefix}{k}.", source)
        source[f"{prefix}{k}"] = origin


def _read_yaml(path: Path, problems: list[str]) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        problems.append(f"{path}: config file not found")
        return {}
    except yaml.YAMLError as e:
        problems.append(f"{path}: not valid YAML: {e}")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: top level must be a mapping of keys to values")
        return {}
    return data


def parse_override(item: str) -> dict:
    """`a.b=1` -> {"a": {"b": 1}} with the value parsed as a YAML scalar."""
    key, _, raw = item.partition("=")
    value = yaml.safe_load(raw) if raw != "" else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(cls: type, args: list[str] | None = None, base: str | Path | None = None):
    """Build a validated `cls` from the stage YAML, overlay files and `key=value` overrides.

    `args` items ending in .yaml/.yml are overlays, `key=value` items are overrides. `base`
    defaults to `configs/<cls.stage>.yaml`; pass `base=False`-y path "" to skip it.
    """
    args = list(args or [])
    problems: list[str] = []
    source: dict[str, str] = {}
    merged: dict = {}
    files = []
    if base is None and cls.stage:
        base = CONFIG_DIR / f"{cls.stage}.yaml"
    if base:
        files.append(Path(base))
    overrides = []
    for a in args:
        if "=" in a and not a.endswith((".yaml", ".yml")):
            overrides.append(a)
        elif a.endswith((".yaml", ".yml")):
            files.append(Path(a))
        else:
            problems.append(f"argument {a!r}: expected key=value or a .yaml overlay file")
    for path in files:
        data = _read_yaml(path, problems)
        _record_sources(data, str(path), "", source)
        merged = _merge(merged, data)
    for item in overrides:
        if not item.partition("=")[0].strip():
            problems.append(f"argument {item!r}: missing key before '='")
            continue
        try:
            data = parse_override(item)
        except yaml.YAMLError as e:
            problems.append(f"argument {item!r}: value is not a YAML scalar: {e}")
            continue
        _record_sources(data, "command line", "", source)
        merged = _merge(merged, data)
    cfg = _build(cls, merged, "", problems, source)
    if not problems:
        bounds = bound_problems(cfg)
        try:
            checks = cfg.validate()
        except Exception:  # noqa: BLE001 - a cross-field check tripped on a value already reported
            checks = []
        named = {p.split(":")[0] for p in bounds}
        problems.extend(bounds + [p for p in checks if p.split(":")[0] not in named])
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(cls: type, data: dict):
    """Rebuild a config from a saved dict (e.g. a manifest); raises ConfigError on mismatch."""
    problems: list[str] = []
    cfg = _build(cls, data, "", problems, {})
    if problems:
        raise ConfigError(problems)
    return cfg


@dataclass
class PolicyEvalConfig:
    every: int = F(10, "evaluation on the valid prompts every N iterations (optimizer steps outside ppo), sampled at "
                       "eval.temperature (0 = only at start and end); the reported figures come from the test prompts "
                       "at the end (docs/ppo.md §38)", ge=0)
    curve_split: Literal["valid", "test"] = F("valid", "the prompts of the curve along training: valid, where choices are "
                                                      "made; test puts it on the prompts of the reported figures and "
                                                      "best-of-n, for an over-optimization sweep that chooses nothing "
                                                      "(`python -m pipeline overopt`)")
    num_prompts: int = F(0, "held-out prompts per split (0 = all of world.prompts('valid') / ('test')); taken evenly across skills", ge=0)
    temperature: float = F(0.7, "temperature of the sampled comparison (both sides); the headline is greedy vs greedy", ge=0)
    max_new_tokens: int = F(64, "response budget of both sides: long enough for the longest demonstration, so the SFT "
                                "baseline's chatty answers finish", gt=0)
    best_of: list[int] = F([4, 16], "best-of-n baselines on the test prompts: n SFT samples, the reward model picks one", ge=1)
    seed: int = F(4321, "eval sampling seed (eval never disturbs the training random state)", ge=0)
    samples: int = F(16, "rows in the wandb sample tables", ge=0)


@dataclass
class OptimConfig:
    """AdamW with warm-up and cosine decay (`pipeline.runtime.adamw_warmup_cosine`): the `optim`
    section of the stages with their own loop or schedule (pretrain, rm, dpo), each with its defaults."""

    lr: float = F(6e-3, "peak learning rate (AdamW)", ge=0)
    weight_decay: float = F(0.1, "AdamW weight decay (not applied to norms and biases)", ge=0)
    betas: list[float] = F([0.9, 0.95], "AdamW betas", ge=0, lt=1)
    warmup_steps: int = F(30, "linear warm-up steps", ge=0)
    min_lr_ratio: float = F(0.1, "cosine decay ends at lr * min_lr_ratio", ge=0, le=1)
    max_grad_norm: float = F(1.0, "gradient clipping norm", gt=0)
