"""The documentation keeps its promises: a short README, links that resolve, options that exist,
and no dated lab notes outside benchmarks/results and CHANGELOG.md."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from sqexport.toolchain.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260
# written in parallel on another branch; once it exists, its links are checked like any other
# options of other tools that the README's install section shows (pip)
FOREIGN_OPTIONS = {"--no-deps"}

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
DATED = re.compile(r"\b20\d\d-\d\d-\d\d\b|load average|\bload ~?\d|this (?:2-core )?host at")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return [m.group(1) for m in LINK.finditer(text)]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the details belong in docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    broken = []
    for link in _links(doc):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading with that anchor")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def _help_options() -> set[str]:
    runner = CliRunner()
    texts = [runner.invoke(cli, ["--help"]).output]
    texts += [runner.invoke(cli, [name, "--help"]).output for name in cli.commands]
    return {m.group(1) for text in texts for m in OPTION.finditer(text)}


@pytest.mark.parametrize("doc", ["docs/user-guide.md", "README.md"])
def test_documented_options_exist(doc):
    known = _help_options()
    assert "--max-accuracy-drop" in known and "--arch" in known  # the help texts were read
    text = re.sub(r"\]\([^)]*\)", "]", (ROOT / doc).read_text(encoding="utf-8"))  # link targets are not options
    mentioned = {m.group(1) for m in OPTION.finditer(text)}
    unknown = sorted(mentioned - known - FOREIGN_OPTIONS)
    assert not unknown, f"{doc} documents options no command has: {', '.join(unknown)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_dated_narratives(doc):
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
            if DATED.search(line)]
    assert not hits, f"{doc.name}: measurements with dates belong in benchmarks/results/, history in " \
                     "CHANGELOG.md:\n" + "\n".join(hits)


def test_results_files_say_where_and_when():
    """Every hand-written or script-written results page names its commit and date near the top."""
    missing = []
    for page in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        head = text[:1500]
        if not re.search(r"\b20\d\d-\d\d-\d\d", text) or not re.search(r"`[0-9a-f]{7}`|revision [0-9a-f]{7}", head):
            missing.append(page.name)
    assert not missing, "results files without a commit or date: " + ", ".join(missing)
