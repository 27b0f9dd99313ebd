"""References a reader can follow: code, configs and docs cite the repository's own design notes
(`docs/ppo.md §N`, a section that exists) or papers, never a file outside the repository."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ppo.md"
# Only on some machine: the design notes' former home, and its old citation forms.
OUTSIDE = [re.compile(p) for p in (r"/work/", r"shared/design", r"(?<!docs/)\bPPO\.md", r"\bchecklist (item )?\d")]
CITATION = re.compile(r"docs/ppo\.md((?:\s*(?:,|-|–|and|to)?\s*§\d+)+)")
ANCHOR_LINK = re.compile(r"docs/ppo\.md#s(\d+)")


def tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
        files = [ROOT / f for f in out.stdout.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every such file but the venv's
        files = [p for pat in patterns for p in ROOT.rglob(pat) if ".venv" not in p.parts]
    return [f for f in files if f.exists() and f.resolve() != Path(__file__).resolve()]


def sections(doc: str) -> list[int]:
    """Section numbers of docs/ppo.md: each an `<a id="sN">` anchor followed by a `### §N` heading."""
    found = re.findall(r'<a id="s(\d+)"></a>\n### §(\d+) ', doc)
    assert all(a == h for a, h in found), found
    return [int(a) for a, _ in found]


def cited(text: str) -> list[int]:
    """Every docs/ppo.md section a text cites: `docs/ppo.md §4, §19`, `§1-§12`, `docs/ppo.md#s8`."""
    nums = [int(n) for m in CITATION.finditer(text) for n in re.findall(r"§(\d+)", m.group(1))]
    return nums + [int(n) for n in ANCHOR_LINK.findall(text)]


def test_citation_parser():
    assert cited("x (docs/ppo.md §14, §19). y docs/ppo.md §1-§12 and docs/ppo.md#s8; InstructGPT §3.5") == [14, 19, 1, 12, 8]
    assert cited("docs/ppo.md, nothing else") == []
    assert [bool(p.search("design: /work/shared/design/PPO.md")) for p in OUTSIDE] == [True, True, True, False]
    assert not any(p.search("see docs/ppo.md §3") for p in OUTSIDE)
    assert any(p.search("(design checklist 24)") for p in OUTSIDE)


def test_design_notes_are_numbered_without_gaps():
    numbers = sections(DOC.read_text())
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 30, numbers


def test_code_cites_only_sections_that_exist_and_no_path_outside_the_repository():
    have = set(sections(DOC.read_text()))
    files = tracked("*.py", "*.yaml", "*.yml", "*.md", "*.toml", "Makefile")
    assert any(f.name == "functional.py" for f in files)
    problems, n_cited = [], 0
    for f in files:
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            where = f"{f.relative_to(ROOT)}:{i}"
            problems += [f"{where}: {p.pattern!r} is not in this repository: {line.strip()}" for p in OUTSIDE
                         if p.search(line)]
            nums = cited(line)
            n_cited += len(nums)
            problems += [f"{where}: docs/ppo.md has no §{n}: {line.strip()}" for n in nums if n not in have]
    assert not problems, "\n".join(problems)
    assert n_cited >= 20  # the code does cite the notes: the scan found them
