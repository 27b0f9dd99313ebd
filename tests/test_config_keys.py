"""No configuration key is accepted and ignored: every field of every stage's config (nested
sections included) is read as an attribute (`.name`) somewhere in the code the stage runs (its
module and the project modules it imports, transitively), outside the config classes' own
definitions. A key that no code of the stage reads fails here, with its dotted name."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from pipeline import registry

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "reward_model")


def _module_path(name: str) -> Path | None:
    for candidate in (ROOT / Path(*name.split(".")).with_suffix(".py"), ROOT / Path(*name.split(".")) / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def closure(module: str) -> set[Path]:
    """The files of `module` and of every project module it imports, at any depth."""
    seen, todo = set(), [module]
    while todo:
        path = _module_path(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            todo += [n for n in names if n.split(".")[0] in PACKAGES]
    return seen


def leaf_keys(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        inner = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(inner):
            out += leaf_keys(type(inner), f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def unread(stage: str) -> list[str]:
    code = "\n".join(p.read_text() for p in closure(registry.get(stage).module) | closure(registry.get(stage).plan_module))
    return [key for key in leaf_keys(registry.config_class(stage))
            if not re.search(rf"\.{key.split('.')[-1]}\b", code)]


@pytest.mark.parametrize("stage", registry.NAMES)
def test_every_key_of_the_stage_is_read_by_its_code(stage):
    assert unread(stage) == []


def test_a_key_no_code_reads_is_caught(monkeypatch):
    from pipeline.config import F, StageConfig

    cls = registry.config_class("sft")

    @dataclasses.dataclass
    class WithAnUnreadKey(cls):
        never_read_anywhere: int = F(3, "a key nothing reads")

    monkeypatch.setattr(registry, "config_class", lambda stage: WithAnUnreadKey)
    assert unread("sft") == ["never_read_anywhere"]
    assert issubclass(WithAnUnreadKey, StageConfig)


@pytest.mark.parametrize("stage", registry.NAMES)
def test_every_stage_speaks_the_same_vocabulary(stage):
    """The same section names in every stage: `data` on the shared source base, `batch` on the
    shared batch section, `optim`, and one training length, `steps`; no other length or batch key."""
    from pipeline.config import BatchConfig, DataSource

    cls = registry.config_class(stage)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    default = cls()
    assert isinstance(default.data, DataSource) and isinstance(default.batch, BatchConfig)
    assert "optim" in fields and "steps" in fields
    assert default.batch.micro <= default.batch.size // 2  # 1 and 2 processes form the same micro-batches
    keys = leaf_keys(cls)
    stray = [k for k in keys if re.search(r"(batch_size|max_steps|iterations|_every|_blocks)$", k)
             and k not in ("save_every", "log_every", "ptx.batch_size")]
    assert stray == []
