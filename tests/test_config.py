import subprocess
import sys
from dataclasses import dataclass

import pytest

from pipeline.config import CONFIG_DIR, ROOT, ConfigError, F, StageConfig, help_text, load_config, to_dict, to_yaml

def _config_class(stage):
    from pipeline import registry

    return registry.config_class(stage)


@pytest.mark.parametrize("path", sorted(p for p in CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_stage_yaml_loads_against_its_schema(path):
    cls = _config_class(path.stem)
    cfg = load_config(cls, [], base=path)
    assert cfg.stage == path.stem
    # every field has its one-line help
    assert all(h for h in help_text(cls).values()), [k for k, h in help_text(cls).items() if not h]


def test_every_accelerate_file_is_valid_yaml():
    import yaml

    names = {p.stem for p in (CONFIG_DIR / "accelerate").glob("*.yaml")}
    assert {"cpu", "gpu", "ddp", "fsdp", "zero2", "zero3"} <= names
    for p in (CONFIG_DIR / "accelerate").glob("*.yaml"):
        assert "distributed_type" in yaml.safe_load(p.read_text())


@dataclass
class _Inner:
    lr: float = F(1e-3, "learning rate")
    name: str = F("x", "a name")


@dataclass
class _Cfg(StageConfig):
    inner: _Inner = F(_Inner(), "inner section")
    steps: int = F(10, "steps")
    stage = ""


def test_precedence_defaults_file_overlay_cli(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 20\ninner:\n  lr: 0.5\n")
    overlay = tmp_path / "over.yaml"
    overlay.write_text("steps: 30\n")
    cfg = load_config(_Cfg, [str(overlay), "inner.name=hello", "inner.lr=1e-4"], base=base)
    assert cfg.steps == 30 and cfg.inner.lr == 1e-4 and cfg.inner.name == "hello" and cfg.seed == 0
    assert isinstance(cfg.inner.lr, float)


def test_unknown_keys_and_bad_types_reported_at_once(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("stepz: 20\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Cfg, ["inner.lrr=1", "steps=abc", "seed=1.5"], base=base)
    msg = str(e.value)
    assert len(e.value.problems) == 4
    assert "stepz: unknown key" in msg and "did you mean 'steps'" in msg and str(base) in msg
    assert "inner.lrr: unknown key" in msg and "valid keys: lr, name" in msg
    assert "steps" in msg and "expected int" in msg
    assert "seed" in msg


def test_choice_spelled_like_a_yaml_boolean(tmp_path):
    """YAML 1.1 reads `no` as false: `precision=no` (command line or file) still means the choice."""
    from stages.ppo.config import PPOConfig

    base = tmp_path / "base.yaml"
    base.write_text("precision: no\n")
    assert load_config(PPOConfig, [], base=base).precision == "no"
    assert load_config(PPOConfig, ["precision=no"]).precision == "no"
    with pytest.raises(ConfigError, match="precision"):
        load_config(PPOConfig, ["precision=yes"])  # no choice is spelled like true


def test_bad_key_exits_2_with_clear_message():
    proc = subprocess.run([sys.executable, "-m", "stages.pretrain", "optim.lrr=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.lrr: unknown key" in proc.stderr and "valid keys: lr," in proc.stderr


def test_validate_cross_field():
    from stages.pretrain import PretrainConfig

    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, ["batch.size=0", "batch.micro=16", "data.source=files"])
    assert len(e.value.problems) == 2
    with pytest.raises(ConfigError, match="world.abstain_demos: needs world.strangers"):
        load_config(PretrainConfig, ["world.abstain_demos=0.5"])
    assert load_config(PretrainConfig, ["world.abstain_demos=0.5", "world.strangers=8"]).world.abstain_demos == 0.5


def test_resolved_config_round_trips(tmp_path):
    import yaml

    from pipeline.config import from_dict
    from stages.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, ["steps=7"])
    again = from_dict(PretrainConfig, yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_rm_world_evaluates_on_test_or_valid_prompts():
    """The rm stage reports on the test prompts; `data.eval_split=valid` measures a choice of
    settings on the valid prompts instead. Nothing else names a held-out split of the world."""
    from stages.rm import RMConfig

    assert load_config(RMConfig, []).data.eval_split is None  # = test
    assert load_config(RMConfig, ["data.eval_split=valid"]).data.eval_split == "valid"
    with pytest.raises(ConfigError, match="data.eval_split"):
        load_config(RMConfig, ["data.eval_split=train"])
    assert load_config(RMConfig, ["data.source=files", "data.files=[x.jsonl]", "data.eval_split=test_prefs"])


def test_every_number_of_every_stage_is_bounded_and_a_bad_one_is_one_line():
    """Each int/float key of every stage config (nested sections and number lists included)
    declares its bounds; `objective.kl_coef=-1` then stops with one line naming the key."""
    import dataclasses
    import importlib
    import typing

    import pytest

    from pipeline.config import ConfigError, _dataclass_type, _hints, _union_args, load_config

    def numbers(cls, prefix=""):
        for f in dataclasses.fields(cls):
            t = _hints(cls)[f.name]
            sub = _dataclass_type(t)
            if sub is not None:
                yield from numbers(sub, f"{prefix}{f.name}.")
                continue
            kinds = list(_union_args(t)) + (list(typing.get_args(t)) if typing.get_origin(t) is list else [])
            if any(k in (int, float) for k in kinds):
                yield f"{prefix}{f.name}", f.metadata.get("bounds")

    unbounded = []
    for module, name in (("stages.pretrain", "PretrainConfig"), ("stages.sft", "SFTConfig"), ("stages.rm", "RMConfig"),
                         ("stages.ppo.config", "PPOConfig")):
        cls = getattr(importlib.import_module(module), name)
        unbounded += [f"{name}.{key}" for key, bounds in numbers(cls) if not bounds]
    assert not unbounded, unbounded
    from stages.ppo.config import PPOConfig

    with pytest.raises(ConfigError) as e:
        load_config(PPOConfig, ["objective.kl_coef=-1"])
    assert str(e.value) == "invalid configuration: objective.kl_coef: must be >= 0, got -1.0"
    with pytest.raises(ConfigError, match=r"ema.decay: must be < 1, got 1.5(.|\n)*eval.best_of: must be >= 1, got 0"):
        load_config(PPOConfig, ["ema.decay=1.5", "eval.best_of=[0,4]"])


@pytest.mark.parametrize("gpu", [True, False])
@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_flash_attention_only_for_16_bit_compute_where_it_imports(monkeypatch, gpu, flash, precision):
    import torch

    from pipeline import models
    from pipeline.config import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(models, "flash_attention_available", lambda: flash)
    got = models.attn_implementation("auto", precision)
    if gpu:
        assert got == ("flash_attention_2" if flash and precision != "no" else "sdpa")
    else:
        assert got == ("eager" if precision == "bf16" else "sdpa")
    assert models.attn_implementation("sdpa", precision) == "sdpa"
    if precision == "no":
        with pytest.raises(InputError, match="16-bit tensors only"):
            models.attn_implementation("flash_attention_2", precision)


def test_a_model_that_runs_in_fp32_leaves_flash_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models import fp32_attention

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    model.config._attn_implementation = "flash_attention_2"   # as loaded for a bf16 stage on a GPU
    assert fp32_attention(model).config._attn_implementation == "sdpa"


def _set_keys(data: dict, schema: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(schema.get(key), dict):
            out += _set_keys(value, schema[key], f"{prefix}{key}.")
        else:
            out.append((prefix + key, value, schema.get(key)))
    return out


@pytest.mark.parametrize("path", sorted(p for p in CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_stage_yaml_sets_only_what_differs_from_the_schema(path):
    """A YAML that restates a default drifts from it the day the schema changes: the files hold
    only the settings that differ, and `--help` documents the rest."""
    import yaml

    schema = to_dict(load_config(_config_class(path.stem), [], base=""))
    restated = [key for key, value, default in _set_keys(yaml.safe_load(path.read_text()) or {}, schema)
                if value == default]
    assert restated == []


def test_setting_one_key_of_a_section_keeps_the_sections_own_defaults():
    """A stage gives a section defaults of its own (dpo: `OptimConfig(lr=1.5e-5, ...)`); setting one
    of its keys must not bring back the section class's defaults for the others."""
    from stages.dpo import DPOConfig

    own = DPOConfig()
    cfg = load_config(DPOConfig, ["optim.warmup_steps=9", "eval.num_prompts=3"], base="")
    assert cfg.optim.warmup_steps == 9 and cfg.eval.num_prompts == 3
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.eval.every, cfg.eval.best_of) == \
        (own.optim.lr, own.optim.weight_decay, own.eval.every, own.eval.best_of) == (1.5e-5, 0.0, 20, [])
    nested = load_config(DPOConfig, ["world.strangers=4"], base="")
    assert nested.world.strangers == 4 and nested.optim == own.optim
