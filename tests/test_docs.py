"""The documents a user reads (README.md and docs/*.md) against the code they describe: every `llama2 COMMAND`, its
flags and its key=value settings exist; every dotted Python name resolves; the README stays short and opens with
the two commands; relative links lead to files; nothing in the repository cites the planning notes kept outside it.

The parsing is deliberately plain: fenced code blocks (shell blocks line by line, python blocks for dotted names)
and inline backtick spans, found by regular expressions. A line or span holding a placeholder (`...`, `…`, or an
upper-case word such as STAGE or FIELD) is not a command and is skipped."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

# commands whose positional key=value items are fields listed in their --help epilog
FIELD_COMMANDS = ("pretrain", "sft", "reward", "rejection", "ppo", "gatt", "gatt-eval", "prepare", "generate", "chat")
SHELL_LANGS = ("", "bash", "sh", "shell", "console")
FILE_SUFFIXES = ("json", "jsonl", "md", "yaml", "yml", "py", "txt", "model", "safetensors", "gguf", "pth", "png")

FENCE_RE = re.compile(r"^[ \t]*```([\w+-]*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
SPAN_RE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# `llama2 CMD` at the start of a shell command: after the line start or a separator, optionally behind a path
# (.venv/bin/llama2) or as `-m llama2.cli`
CMD_RE = re.compile(r"(?:^|(?<=[\s;&|(]))(?:[\w./-]*/)?llama2(?:\.cli)?[ \t]+([a-z][\w-]*)")
DOTTED_RE = re.compile(r"(?<![\w./-])llama2(?:\.[A-Za-z_]\w*)+")
PLACEHOLDER_RE = re.compile(r"\.\.\.|…|\b[A-Z][A-Z_]{2,}\b(?!=)")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Command:
    doc: str  # file name, for messages
    text: str  # the command as written, for messages
    name: str  # the subcommand
    args: tuple[str, ...]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@lru_cache(maxsize=None)
def _split(path: Path) -> tuple[list[tuple[str, str]], str]:
    """(fenced blocks as (language, body), the text outside them)."""
    text = path.read_text(encoding="utf-8")
    blocks = [(m.group(1).lower(), m.group(2)) for m in FENCE_RE.finditer(text)]
    return blocks, FENCE_RE.sub("", text)


def _shell_lines(body: str) -> list[str]:
    """Lines of a shell block, continuations joined and comments dropped."""
    lines, cur = [], ""
    for raw in body.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        lines.append(cur + line)
        cur = ""
    if cur:
        lines.append(cur)
    return [ln for ln in lines if ln.strip()]


def _commands_in(doc: Path, text: str) -> list[Command]:
    out = []
    if PLACEHOLDER_RE.search(text):
        return out
    for m in CMD_RE.finditer(text):
        rest = re.split(r"\s(?:\||&&|;|>|2>)", text[m.end():])[0]
        try:
            args = shlex.split(rest)
        except ValueError:
            args = rest.split()
        out.append(Command(_rel(doc), text.strip(), m.group(1), tuple(args)))
    return out


def commands() -> list[Command]:
    found = []
    for doc in DOCS:
        blocks, prose = _split(doc)
        for lang, body in blocks:
            if lang in SHELL_LANGS:
                for line in _shell_lines(body):
                    found += _commands_in(doc, line)
        for span in SPAN_RE.findall(prose):
            if re.match(r"(?:[\w./-]*/)?llama2 ", span):  # a span that is a command, not prose naming one
                found += _commands_in(doc, span)
    return found


def dotted_names() -> list[tuple[str, str]]:
    """(file, name) for every dotted llama2.x.y name in backticks or in a code block (file names excluded)."""
    found = []
    for doc in DOCS:
        blocks, prose = _split(doc)
        texts = SPAN_RE.findall(prose) + [body for _, body in blocks]
        for t in texts:
            for name in DOTTED_RE.findall(t):
                if name.rsplit(".", 1)[-1] in FILE_SUFFIXES:  # llama2.json, a file
                    continue
                found.append((_rel(doc), name))
    return sorted(set(found))


# -- the parser and each command's fields ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def subcommands() -> dict[str, argparse.ArgumentParser]:
    from llama2.cli import build_parser

    parser = build_parser(None)  # every command's help complete
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def epilog_fields(sub: argparse.ArgumentParser) -> set[str]:
    """The field names a command's --help epilog lists (`  name=default  [type]`, as llama2.config.describe writes
    them), each also by its dotted group path (`optim.lr`) under a group heading (` optim (...):`)."""
    names: set[str] = set()
    group = None
    for line in (sub.epilog or "").splitlines():
        head = re.match(r"^ (\w+) \(", line)
        if head:
            group = head.group(1)
            continue
        field = re.match(r"^  ([A-Za-z_][\w.]*)=", line)
        if field:
            name = field.group(1)
            names.add(name)
            if group:
                names.add(f"{group}.{name.rsplit('.', 1)[-1]}")
    return names


def _items(cmd: Command, sub: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(flags, key=value items) of a command line; an option's value is never taken for an item."""
    flags, items, skip = [], [], False
    for tok in cmd.args:
        if skip:
            skip = False
            continue
        if tok.startswith("-") and len(tok) > 1 and not re.match(r"-\d", tok):
            flag = tok.split("=", 1)[0]
            flags.append(flag)
            action = sub._option_string_actions.get(flag)
            skip = "=" not in tok and action is not None and action.nargs != 0
        elif re.match(r"^[A-Za-z_][\w.-]*=", tok):
            items.append(tok)
    return flags, items


# -- the tests -----------------------------------------------------------------------------------------------------
def test_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n < 250, f"README.md has {n} lines; keep it under 250 (the reference belongs in docs/)"
    blocks, _ = _split(README)
    assert blocks, "README.md has no code block"
    first = blocks[0][1]
    assert "make run" in first and "make test" in first, f"README.md's first code block lacks make run / make test:\n{first}"


def test_documents_name_commands_and_flags_that_exist(subcommands):
    found = commands()
    assert len(found) > 20, f"only {len(found)} `llama2 COMMAND` lines found in {[_rel(d) for d in DOCS]}: parsing broke?"
    errors = []
    for cmd in found:
        sub = subcommands.get(cmd.name)
        if sub is None:
            errors.append(f"{cmd.doc}: `llama2 {cmd.name}` is not a command (in: {cmd.text})")
            continue
        flags, items = _items(cmd, sub)
        errors += [f"{cmd.doc}: `llama2 {cmd.name}` has no option {f} (in: {cmd.text})"
                   for f in flags if f not in sub._option_string_actions]
        takes_items = any(a.dest == "overrides" for a in sub._actions)
        if items and not takes_items:
            errors.append(f"{cmd.doc}: `llama2 {cmd.name}` takes no key=value items, got {items} (in: {cmd.text})")
    assert not errors, "\n".join(errors)


def test_documented_settings_are_fields_of_their_command(subcommands):
    errors, checked = [], 0
    for cmd in commands():
        if cmd.name not in FIELD_COMMANDS or cmd.name not in subcommands:
            continue
        sub = subcommands[cmd.name]
        known = epilog_fields(sub)
        assert known, f"`llama2 {cmd.name} --help` lists no fields: did its epilog format change?"
        for item in _items(cmd, sub)[1]:
            key = item.split("=", 1)[0].replace("-", "_")
            checked += 1
            if key not in known:
                errors.append(f"{cmd.doc}: {key}= is not a field of `llama2 {cmd.name}` (in: {cmd.text})")
    assert checked > 10, f"only {checked} key=value settings found: parsing broke?"
    assert not errors, "\n".join(errors)


def test_documented_pipeline_overrides_name_stage_fields():
    from llama2.config import ConfigError
    from llama2.pipeline import parse_overrides

    errors, checked = [], 0
    for cmd in commands():
        if cmd.name != "pipeline":
            continue
        for tok in cmd.args:
            if tok.startswith("-") or not re.match(r"^[A-Za-z_][\w.-]*=", tok):
                continue
            checked += 1
            try:
                parse_overrides([tok])
            except ConfigError as e:
                errors.append(f"{cmd.doc}: {tok}: {e} (in: {cmd.text})")
    assert checked >= 2, f"only {checked} pipeline overrides found: parsing broke?"
    assert not errors, "\n".join(errors)


def _resolve(name: str) -> object:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name and ".".join(parts[:i]).startswith(e.name) and e.name.startswith("llama2"):
                continue  # that prefix is not a module: try a shorter one
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def test_dotted_python_names_resolve():
    names = dotted_names()
    assert len(names) > 20, f"only {len(names)} dotted llama2.* names found: parsing broke?"
    errors = []
    for doc, name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            errors.append(f"{doc}: `{name}` does not resolve ({type(e).__name__}: {e})")
    assert not errors, "\n".join(errors)


def test_relative_links_lead_to_files():
    errors = []
    for doc in DOCS:
        for target in LINK_RE.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                errors.append(f"{_rel(doc)}: link ({target}) leads to no file")
    assert not errors, "\n".join(errors)


def test_nothing_in_the_repository_cites_the_planning_notes():
    banned = ["DESIGN" + ".md", "../" + "shared"]  # written split, so that this file does not cite them
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert files, "git ls-files listed nothing"
    errors = []
    for rel in files:
        if rel.startswith(".ci/"):
            continue
        path = ROOT / rel
        if not path.is_file():
            continue
        data = path.read_bytes()
        errors += [f"{rel}: mentions {b}" for b in banned if b.encode() in data]
    assert not errors, "\n".join(errors)
