"""The documentation's most error-prone claims kept honest: every config key that README.md,
docs/*.md and the comments of configs/*.yaml name is a real field, every ``--set key=value`` they
show is accepted by the config loader, and every relative link (file or ``#anchor``) resolves.
Only names shaped like ``section.key`` are read, so prose never fails the test."""

import dataclasses
import re
from pathlib import Path

import pytest

from siasam_fast.config import _SECTIONS, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# `train.py`, `model.py`, `train.jsonl`: file names, not keys
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "md", "csv", "sh", "log", "png", "txt"}
KEY = re.compile(r"(?<![\w./-])(" + "|".join(_SECTIONS) + r")\.([a-z_][a-z0-9_]*)\b(?!\.\w)")
SET = re.compile(r"--set\s+((?:" + "|".join(_SECTIONS) + r")\.[a-z_0-9]+=[^\s`\])]+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".yaml":  # only the comments: the keys themselves are loaded elsewhere
        text = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    return text


def _fields() -> set[str]:
    return {f"{section}.{f.name}" for section, cls in _SECTIONS.items()
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("path", DOCS + CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_config_keys_exist(path):
    known = _fields()
    wrong = sorted({f"{m.group(1)}.{m.group(2)}" for m in KEY.finditer(_text(path))
                    if m.group(2) not in FILE_SUFFIXES} - known)
    assert not wrong, f"{path.name} names config keys that do not exist: {wrong}"


@pytest.mark.parametrize("path", DOCS + CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shown_overrides_are_accepted(path):
    for override in SET.findall(_text(path)):
        if "$" in override:  # a shell variable
            continue
        try:
            load_config(None, [override])
        except ValueError as err:
            pytest.fail(f"{path.name}: --set {override}: {err}")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (code blocks skipped)."""
    found, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchor, n = slug, 1
            while anchor in found:
                anchor, n = f"{slug}-{n}", n + 1
            found.add(anchor)
    return found


@pytest.mark.parametrize("path", DOCS + sorted((ROOT / "benchmarks" / "measured").glob("*.md")),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{path.name}: links that point nowhere: {broken}"


CLIPBERT_SET = "model.visual=weights/clipbert-visual"


@pytest.mark.parametrize("path", DOCS + CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_clipbert_commands_carry_its_input(path):
    """Every command or comment that starts from the converted ClipBERT folders also gives
    ClipBERT's input (README, "ClipBERT's checkpoint": data.frame_fit=pad at data.image_size=448);
    without them a run trains it on centre-cropped 224 px frames."""
    text = _text(path)
    for m in re.finditer(re.escape(CLIPBERT_SET), text):
        near = text[max(0, m.start() - 300): m.end() + 300]
        assert "data.frame_fit=pad" in near and "data.image_size=448" in near, (
            f"{path.name}: --set {CLIPBERT_SET} without data.frame_fit=pad and "
            f"data.image_size=448 near it")
