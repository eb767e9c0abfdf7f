"""The README and docs/ hold together: every relative link lands on a file (and a heading), every `health-mlops`
command a code block shows exists, the configuration page is what its script generates, and the README stays an
overview of at most 300 lines."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer.main
from typer.testing import CliRunner

import health_mlops.cli  # noqa: F401 - registers every command on the app
from health_mlops.cli.app import app
from scripts.configuration_doc import CONFIGURATION_PAGE, REGENERATE, configuration_page

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOC_PAGES]
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*```")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$")
# [text](target) and ![alt](target), with an optional "title"; link text may hold code spans but no brackets.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# health-mlops as a command (also as .venv/bin/health-mlops), not .health-mlops/ nor health-mlops-fresh.
COMMAND = re.compile(r"(?<![\w.-])health-mlops(?=\s)")
COMMAND_WORD = re.compile(r"[a-z][a-z0-9-]*")


def shown_name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose_and_code(path: Path) -> tuple[list[str], list[str]]:
    """The page's lines outside fenced code blocks, and those inside them."""
    prose: list[str] = []
    code: list[str] = []
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif in_code:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation other than '-' and '_' removed (backticks too), spaces to
    '-'."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids GitHub gives the page's headings; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    ids = set()
    for line in prose_and_code(path)[0]:
        heading = HEADING.match(line)
        if heading is None:
            continue
        anchor = github_anchor(heading.group(1))
        ids.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return ids


def broken_links(page: Path) -> list[str]:
    broken = []
    for line in prose_and_code(page)[0]:
        for target in LINK.findall(line):
            if re.match(r"(https?|mailto):", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{target} (no file {linked})")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{target} (no heading #{anchor} in {shown_name(linked)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=shown_name)
def test_every_relative_link_lands_on_a_file_and_heading(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{shown_name(page)}: broken links: {'; '.join(broken)}"


def command_paths(line: str, cli: click.Group) -> list[tuple[str, ...]]:
    """Each `health-mlops <command> [<subcommand>]` on a line: the words up to the first option, placeholder, path
    or assignment; a subcommand only where the command is a group."""
    paths = []
    for match in COMMAND.finditer(line):
        words = []
        for word in line[match.end():].split():
            if word.startswith(("-", "[")) or "/" in word or "=" in word:
                break
            name = COMMAND_WORD.match(word.strip("`'\"(),;:"))
            if name is None:
                break
            words.append(name.group())
            if len(words) == 2 or not isinstance(cli.commands.get(words[0]), click.Group):
                break
        if words:
            paths.append(tuple(words))
    return paths


def shown_commands() -> dict[tuple[str, ...], list[str]]:
    """Every distinct command path the pages' code blocks show, with the pages that show it."""
    cli = typer.main.get_command(app)
    assert isinstance(cli, click.Group)
    shown: dict[tuple[str, ...], list[str]] = {}
    for page in PAGES:
        for line in prose_and_code(page)[1]:
            for path in command_paths(line, cli):
                pages = shown.setdefault(path, [])
                if shown_name(page) not in pages:
                    pages.append(shown_name(page))
    return shown


def test_every_command_in_a_code_block_exists() -> None:
    shown = shown_commands()
    assert ("data", "validate") in shown, f"the README's usage was not read: found only {sorted(shown)}"
    runner = CliRunner()
    missing = []
    for path, pages in shown.items():
        result = runner.invoke(app, [*path, "--help"])
        if result.exit_code != 0:
            missing.append(f"{', '.join(pages)}: health-mlops {' '.join(path)} (--help exited {result.exit_code})")
    assert not missing, "commands shown that do not exist:\n" + "\n".join(missing)


def test_the_configuration_page_is_what_the_settings_generate() -> None:
    assert CONFIGURATION_PAGE.read_text(encoding="utf-8") == configuration_page(), (
        f"{shown_name(CONFIGURATION_PAGE)} is stale: run {REGENERATE}")


def test_the_readme_is_an_overview_and_docs_holds_the_pages() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move text to docs/"
    assert len(DOC_PAGES) >= 4, f"docs/ holds {len(DOC_PAGES)} Markdown pages: {[p.name for p in DOC_PAGES]}"
