"""The import direction of the project's layers (README, Architecture): tools -> stages -> RL pieces
-> core, never back up. A module imports its own layer and the layers below it only."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {f"pipeline.{m}" for m in ("driver", "launch", "chat", "report", "plan", "gpu_smoke", "bench", "bootstrap", "study",
                                   "overopt", "rm_curve",
                                   "__main__")}
RANK = {"core": 0, "rl": 1, "stages": 2, "tools": 3}


def layer(module: str) -> str | None:
    if module in TOOLS or module.startswith("pipeline.__main__"):
        return "tools"
    if module.startswith("pipeline"):
        return "core"
    if module.startswith("reward_model") or module == "stages.ppo.functional":
        return "rl"
    if module.startswith("stages"):
        return "stages"
    return None  # third-party or the standard library


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project's packages in `path`, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)]
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if layer(f"{node.module}.{a.name}") != layer(node.module)]  # `from pipeline import report`
    return out


def violations() -> list[str]:
    found = []
    for package in ("pipeline", "stages", "reward_model"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            here = layer(name)
            for line, target in imports(path):
                there = layer(target)
                if there is not None and RANK[there] > RANK[here]:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {here} module imports {target} ({there})")
    return found


def test_no_module_imports_a_layer_above_its_own():
    assert violations() == []


def test_the_check_sees_an_import_against_the_direction(tmp_path, monkeypatch):
    bad = ROOT / "pipeline" / "_layer_probe.py"
    bad.write_text("from stages.sft import SFTConfig\n")
    try:
        assert violations() == ["pipeline/_layer_probe.py:1: core module imports stages.sft (stages)"]
    finally:
        bad.unlink()
