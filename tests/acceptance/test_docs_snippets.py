"""The documentation's snippets work as written.

Every ```python block of README.md and docs/*.md compiles, and the complete programs among them
run. A block that is not a program of its own (it uses an ``app`` or a ``client`` declared
elsewhere, or awaits at the top) is marked by the line ``<!-- fragment -->`` right before it
(invisible once rendered): it only has to compile, top-level ``await`` allowed.

Every ``errands`` command the documentation shows, in a shell block or inline (`errands get ID`),
names a subcommand that ``errands --help`` lists and options that its own ``--help`` lists; an
option written alone (`--json`) must belong to one of the commands named in its paragraph.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.acceptance.conftest import ERRANDS

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "<!-- fragment -->"
SHELLS = frozenset({"bash", "sh", "shell", "console"})
_FENCE = re.compile(r"^```(\S*)\s*$")
_SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_OPTION = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it starts, its language, its text, and whether it is marked
    as a fragment."""

    where: str
    lang: str
    code: str
    fragment: bool


@dataclass(frozen=True)
class Command:
    """An ``errands`` command line as written: the words after ``errands``."""

    where: str
    words: tuple[str, ...]


@dataclass(frozen=True)
class Paragraph:
    """A paragraph's ``errands`` commands written inline, and its options written alone."""

    where: str
    commands: tuple[Command, ...]
    alone: tuple[str, ...]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def read_blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        code = "\n".join(lines[i + 1 : end]) + "\n"
        yield Block(f"{_name(path)}:{i + 1}", fence.group(1), code, before == FRAGMENT)
        i = end + 1


def _prose(path: Path) -> Iterator[tuple[int, str]]:
    """The paragraphs outside code blocks, with the line each starts on."""
    lines = path.read_text().splitlines()
    inside = False
    for i, line in enumerate(lines):
        if _FENCE.match(line) or (inside and line.rstrip() == "```"):
            inside = not inside
            lines[i] = ""
        elif inside:
            lines[i] = ""
    start, paragraph = 0, list[str]()
    for i, line in enumerate([*lines, ""]):
        if line.strip():
            if not paragraph:
                start = i + 1
            paragraph.append(line)
        elif paragraph:
            yield start, "\n".join(paragraph)
            paragraph = []


def _errands_words(words: list[str]) -> tuple[str, ...] | None:
    """The words after ``errands`` when ``words`` run it (``errands``, ``.venv/bin/errands``,
    ``python -m errands``, after any ``NAME=value``), else ``None``."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if words and (words[0] == "errands" or words[0].endswith("/errands")):
        return tuple(words[1:])
    if len(words) >= 3 and re.fullmatch(r"(\S*/)?python3?", words[0]) and words[1:3] == ["-m", "errands"]:
        return tuple(words[3:])
    return None


def shell_commands(block: Block) -> Iterator[Command]:
    """The ``errands`` commands of a shell block, each simple command of each line apart."""
    for number, line in enumerate(block.code.replace("\\\n", " ").splitlines()):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if set(token) <= set("();<>|&"):
                words = _errands_words(command)
                if words is not None:
                    yield Command(f"{block.where}+{number + 1}", words)
                command = []
            else:
                command.append(token)


def inline_commands(path: Path) -> Iterator[Paragraph]:
    """The paragraphs with ``errands`` commands written inline (`errands get ID`,
    `errands serve [--app m:app]`), and the options written alone (`--json`) beside them."""
    for start, text in _prose(path):
        commands: list[Command] = []
        alone: list[str] = []
        for span in _SPAN.finditer(text):
            where = f"{_name(path)}:{start + text[: span.start()].count(chr(10))}"
            words = _errands_words(span.group(1).replace("[", " ").replace("]", " ").split())
            if words:
                commands.append(Command(where, words))
            elif span.group(1).startswith("--") and span.group(1).split()[0] != "--":
                alone.append(span.group(1).split()[0].split("=")[0])
        if commands:
            yield Paragraph(f"{_name(path)}:{start}", tuple(commands), tuple(alone))


PYTHON = [b for path in DOCS for b in read_blocks(path) if b.lang == "python"]
SHELL = [c for path in DOCS for b in read_blocks(path) if b.lang in SHELLS for c in shell_commands(b)]
PARAGRAPHS = [found for path in DOCS for found in inline_commands(path)]
INLINE = [command for paragraph in PARAGRAPHS for command in paragraph.commands]


Helps = dict[tuple[str, ...], str]


def subcommands(help_text: str) -> list[str]:
    """The commands a ``--help`` lists in its Commands section (none for a plain command)."""
    lines = help_text.splitlines()
    header = next((i for i, line in enumerate(lines) if re.match(r"^\W{0,3}Commands\b", line)), None)
    found: list[str] = []
    for line in lines[header + 1 :] if header is not None else []:
        if not line.strip() or line.startswith("╰"):
            break
        listed = re.match(r"^[│|]?\s{1,2}([a-z][a-z0-9-]*)\s{2,}\S", line)
        if listed:
            found.append(listed.group(1))
    return found


@pytest.fixture(scope="module")
def helps() -> Helps:
    """What ``errands --help`` prints, and ``errands … --help`` of every command it lists (and of
    theirs), wide enough that no option is wrapped; each level's asked for at once."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    found: Helps = {}
    asked: list[tuple[str, ...]] = [()]
    while asked:
        running = {
            path: subprocess.Popen(
                [ERRANDS, *path, "--help"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for path in asked
        }
        asked = []
        for path, proc in running.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"errands {' '.join(path)} --help: {err}"
            found[path] = out
            asked += [(*path, name) for name in subcommands(out)]
    assert len(found) > 10 and ("schedules", "list") in found
    return found


def options_of(helps: Helps, words: tuple[str, ...], where: str) -> set[str]:
    """Check that ``errands words…`` names real (sub)commands; the options they take. A word
    such as ``list|set|pause`` names several alternatives, each checked."""
    path: tuple[str, ...] = ()
    options: set[str] = set()
    for word in (w for w in words if not w.startswith("-")):
        known = subcommands(helps[path])
        if not known:
            break  # a plain command: the remaining words are its arguments
        names = [name for name in word.split("|") if name]
        for name in names:
            assert name in known, f"{where}: `errands {' '.join(words)}`: no command {name!r} in {known}"
        for name in names[1:]:
            options |= set(_OPTION.findall(helps[(*path, name)]))
        path = (*path, names[0])
    assert path, f"{where}: `errands {' '.join(words)}` names no command"
    return options | set(_OPTION.findall(helps[path]))


def check(helps: Helps, command: Command) -> None:
    options = options_of(helps, command.words, command.where)
    for word in command.words:
        if word.startswith("--") and word != "--":  # a lone "--" ends the options (POSIX)
            assert word.split("=")[0] in options, f"{command.where}: {word} is not an option of it"


def test_the_docs_have_snippets_of_each_kind() -> None:
    """The collection below finds what it should: the test cannot pass by finding nothing."""
    assert len(PYTHON) >= 10 and sum(not b.fragment for b in PYTHON) >= 3
    assert any(b.where.startswith("README.md") and not b.fragment for b in PYTHON)
    assert len(SHELL) >= 2 and len(INLINE) >= 20


def test_every_fragment_mark_is_on_a_python_block() -> None:
    """A mark that lost its block (or sits before another kind) would silently mark nothing."""
    for path in DOCS:
        marks = path.read_text().count(FRAGMENT)
        marked = [b for b in read_blocks(path) if b.fragment]
        assert marks == len(marked), f"{_name(path)}: {marks} marks, {len(marked)} blocks right after one"
        assert all(b.lang == "python" for b in marked), [b.where for b in marked if b.lang != "python"]


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.where)
def test_every_python_snippet_compiles(block: Block) -> None:
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if block.fragment else 0
    compile(block.code, block.where, "exec", flags=flags, dont_inherit=True)


@pytest.mark.parametrize("block", [b for b in PYTHON if not b.fragment], ids=lambda b: b.where)
def test_every_complete_python_snippet_runs(block: Block, tmp_path: Path) -> None:
    """Run as its own program, in an empty directory, with no ERRANDS_* setting."""
    program = tmp_path / "snippet.py"
    program.write_text(block.code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERRANDS_")}
    ran = subprocess.run(
        [sys.executable, str(program)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, f"{block.where} (mark it {FRAGMENT} if it is not a program):\n{ran.stderr}"


@pytest.mark.parametrize(
    "words",
    [("serv",), ("serve", "--nope"), ("schedules", "list|sett"), ("schedules", "set", "--tz", "--when"), ()],
)
def test_the_check_refuses_what_errands_does_not_have(helps: Helps, words: tuple[str, ...]) -> None:
    with pytest.raises(AssertionError):
        check(helps, Command("made up", words))


@pytest.mark.parametrize("command", SHELL + INLINE, ids=lambda c: f"{c.where} {' '.join(c.words)}")
def test_every_errands_command_names_a_real_subcommand_and_options(helps: Helps, command: Command) -> None:
    check(helps, command)


@pytest.mark.parametrize("paragraph", [p for p in PARAGRAPHS if p.alone], ids=lambda p: p.where)
def test_every_option_written_alone_is_one_of_a_command_beside_it(helps: Helps, paragraph: Paragraph) -> None:
    """`--json` in a paragraph about `errands get ID`: an option of one of its commands."""
    options = set().union(*(options_of(helps, c.words, c.where) for c in paragraph.commands))
    for option in paragraph.alone:
        assert option in options, f"{paragraph.where}: {option} is no option of the commands beside it"
