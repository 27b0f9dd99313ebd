"""The floors in pyproject.toml tell the truth.

* The installed packages satisfy the declared ranges (fast, always runs).
* Every keyword argument the code passes to a class of transformers / trl / peft (`TRLSFTConfig(...)`,
  `RewardConfig(...)`, `LoraConfig(...)`, `SFTTrainer(...)`, ...) is accepted by that class in the FLOOR
  release: a dataclass field (its own or a base's, e.g. TrainingArguments') or an `__init__` parameter.
  The floor's wheel is downloaded once with `pip download` (cached in ~/.cache/alignment-pipeline/wheels)
  and its source parsed with `ast`; nothing from it is imported. Classes taking **kwargs are not checked.
* The floors agree with what the floor releases themselves require (Python, sibling packages).
Without network (and an empty cache) the wheel-based tests are skipped.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pipeline", "stages", "reward_model")
CHECKED = ("transformers", "trl", "peft")  # libraries whose classes the code calls with keywords
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignment-pipeline" / "wheels"


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: bool = False) -> dict[str, Requirement]:
    p = project()
    reqs = list(p["dependencies"])
    if extras:
        reqs += [r for group in p.get("optional-dependencies", {}).values() for r in group]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def floors() -> dict[str, Version]:
    out = {}
    for name, req in requirements(extras=True).items():
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        if lows:
            out[name] = max(lows)
    return out


# ---------------------------------------------------------------- installed versions (fast)

def test_installed_versions_satisfy_the_declared_ranges():
    assert platform.python_version() in SpecifierSet(project()["requires-python"])
    bad = []
    for name, req in requirements().items():
        if req.marker and not req.marker.evaluate():
            continue
        installed = importlib.metadata.version(name)
        if not req.specifier.contains(installed, prereleases=True):
            bad.append(f"{name} {installed} not in {req.specifier}")
    assert not bad, bad


def test_every_dependency_has_a_floor_and_majors_are_capped():
    p = project()
    for req in map(Requirement, p["dependencies"]):
        assert any(s.operator == ">=" for s in req.specifier), f"{req} has no floor"
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers"):
        assert any(s.operator == "<" for s in requirements()[name].specifier), f"{name} has no upper bound"
    assert "deepspeed" in p["optional-dependencies"] and "dev" in p["optional-dependencies"]


# ---------------------------------------------------------------- the code's config calls

def config_calls(sources=SOURCES) -> list[tuple[str, int, str, str, list[str]]]:
    """(file, line, package, class, keyword names) for every call of a class imported from CHECKED."""
    out = []
    for path in sorted(p for d in sources for p in (ROOT / d).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        imported = {}  # local name -> (package, class)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in CHECKED:
                for a in node.names:
                    if a.name[:1].isupper():
                        imported[a.asname or a.name] = (node.module.split(".")[0], a.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
                kws = [k.arg for k in node.keywords if k.arg]
                if kws:
                    out.append((str(path.relative_to(ROOT)), node.lineno, *imported[node.func.id], kws))
    return out


def test_the_scan_finds_the_trl_configs():
    found = {(f, cls) for f, _, _, cls, _ in config_calls()}
    assert ("stages/sft.py", "SFTConfig") in found and ("reward_model/trl_pairwise.py", "RewardConfig") in found


# ---------------------------------------------------------------- floor wheels, read with ast

def wheel(package: str, version: Version) -> Path:
    """The wheel of `package==version`, from the cache or `pip download`; skips the test without network."""
    w, why = _download(package, version)
    if w is None:
        pytest.skip(f"cannot download {package}=={version}: {why}")
    return w


@functools.cache  # one try per session: without network, the next tests skip at once
def _download(package: str, version: Version) -> tuple[Path | None, str]:
    def cached():
        for w in CACHE.glob("*.whl"):
            name, ver = w.name.split("-")[:2]
            if canonicalize_name(name) == canonicalize_name(package) and Version(ver) == version:
                return w

    if w := cached():
        return w, ""
    CACHE.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        "--timeout", "30", "--retries", "1", "-d", str(CACHE), f"{package}=={version}"],
                       capture_output=True, text=True)
    return cached(), (r.stderr or r.stdout).strip()[-300:]


class Wheels:
    """The sources in the wheels of the given package versions (fetched on first use), searched with ast."""

    def __init__(self, versions: dict[str, Version]):
        self.versions = versions

    @functools.cache
    def files(self, package: str) -> zipfile.ZipFile | None:
        return zipfile.ZipFile(wheel(package, self.versions[package])) if package in self.versions else None

    @functools.cache
    def module(self, dotted: str) -> tuple[ast.Module, bool] | None:
        """(parsed source, is it a package?) of module `dotted`, None if not in the wheels."""
        z = self.files(dotted.split(".")[0])
        base = dotted.replace(".", "/")
        for name, is_pkg in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
            if z and name in z.namelist():
                return ast.parse(z.read(name)), is_pkg
        return None

    def find(self, dotted: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef] | None:
        """(module, class node) of `name` as seen from module `dotted`, following re-exports (also the
        ones under `if TYPE_CHECKING:` that lazy packages such as transformers and trl use)."""
        if depth > 8 or (found := self.module(dotted)) is None:
            return None
        tree, is_pkg = found
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return dotted, node
        here = dotted.split(".") if is_pkg else dotted.split(".")[:-1]  # the package relative imports start from
        for node in ast.walk(tree):
            for a in node.names if isinstance(node, ast.ImportFrom) else ():
                if (a.asname or a.name) == name:
                    start = here[:len(here) - node.level + 1] if node.level else []
                    if found := self.find(".".join(start + ([node.module] if node.module else [])), a.name, depth + 1):
                        return found
        return None

    def grep(self, package: str, name: str) -> tuple[str, ast.ClassDef] | None:
        """The class found by its text, for names re-exported with `import *` (transformers' models)."""
        z = self.files(package)
        for path in sorted((n for n in z.namelist() if n.endswith(".py")), key=len):
            if f"\nclass {name}(".encode() in z.read(path):
                return self.find(path[:-3].removesuffix("/__init__").replace("/", "."), name)
        return None

    def accepts(self, package: str, cls: str) -> set[str] | None:
        """The keywords `cls(...)` accepts in this release, None where that is open (**kwargs) or unknown."""
        found = self.find(package, cls) or self.grep(package, cls)
        assert found, f"{cls} not found in {package}=={self.versions[package]}"
        return self._accepts(*found)

    def _accepts(self, mod: str, node: ast.ClassDef) -> set[str] | None:
        decorators = [ast.unparse(d) for d in node.decorator_list]
        if any("accept_kwargs=True" in d for d in decorators):
            return None
        init = next((b for b in node.body if isinstance(b, ast.FunctionDef) and b.name == "__init__"), None)
        if init:  # a hand-written __init__ (it wins over the dataclass one)
            return None if init.args.kwarg else {a.arg for a in init.args.args[1:] + init.args.kwonlyargs}
        bases = [self.find(mod, b.id) if isinstance(b, ast.Name) else None for b in node.bases]
        if not any(re.fullmatch(r"(dataclasses\.)?dataclass(\(.*\))?", d, re.S) for d in decorators):
            return self._accepts(*bases[0]) if bases and bases[0] else None  # __init__ from the first base
        names = set()  # a dataclass: its fields and those of its dataclass bases
        for b in node.body:
            if isinstance(b, ast.AnnAssign) and isinstance(b.target, ast.Name):
                no_init = isinstance(b.value, ast.Call) and any(
                    k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in b.value.keywords)
                if not ast.unparse(b.annotation).startswith(("ClassVar", "typing.ClassVar")) and not no_init:
                    names.add(b.target.id)
        for base in filter(None, bases):
            if any("dataclass" in ast.unparse(d) for d in base[1].decorator_list):
                if (more := self._accepts(*base)) is None:
                    return None
                names |= more
        return names


def unknown_keywords(versions: dict[str, Version], sources=SOURCES) -> list[str]:
    """`file:line Class(kw=...)` for every keyword the code passes that these releases do not accept."""
    wheels, out = Wheels(versions), []
    for path, line, package, cls, kws in config_calls(sources):
        if package in versions and (accepted := wheels.accepts(package, cls)) is not None:
            out += [f"{path}:{line} {cls}({kw}=...) is not accepted by "
                    + ", ".join(f"{p}=={v}" for p, v in versions.items()) for kw in kws if kw not in accepted]
    return out


def test_config_keywords_exist_in_the_floor_releases():
    f = floors()
    assert not unknown_keywords({p: f[p] for p in CHECKED})


def test_the_check_catches_a_field_newer_than_the_floor():
    # transformers 5.22 has no TrainingArguments.activation_checkpointing (added in 5.23): both stages pass it.
    missing = unknown_keywords({"transformers": Version("5.22.2"), "trl": floors()["trl"]},
                               sources=("stages", "reward_model"))
    assert any("sft.py" in m and "activation_checkpointing" in m for m in missing), missing
    assert any("trl_pairwise.py" in m and "activation_checkpointing" in m for m in missing), missing


def test_floors_meet_what_the_floor_releases_require():
    """A floor below what another floor needs is never installed: e.g. trl 1.16 needs Python 3.11."""
    f, p = floors(), project()
    ours = SpecifierSet(p["requires-python"])
    envs = [default_environment() | {"extra": e} for e in ("", "torch", "deepspeed")]  # the extras we use
    bad = []
    for package in CHECKED:
        meta = zipfile.ZipFile(wheel(package, f[package]))
        text = next(meta.read(n).decode() for n in meta.namelist() if n.endswith(".dist-info/METADATA"))
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == "Requires-Python":
                lowest = min((Version(s.version) for s in ours if s.operator == ">="), default=Version("0"))
                if lowest not in SpecifierSet(value):
                    bad.append(f"{package}=={f[package]} needs Python {value}, requires-python says {ours}")
            elif key == "Requires-Dist":
                req = Requirement(value)
                name = canonicalize_name(req.name)
                if name in f and (not req.marker or any(map(req.marker.evaluate, envs))) \
                        and not req.specifier.contains(f[name], prereleases=True):
                    bad.append(f"{package}=={f[package]} needs {req}, our floor is {name}>={f[name]}")
    assert not bad, bad
