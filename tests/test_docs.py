"""The README and docs/ say what runs: a short front page, links that resolve, commands whose flags exist.

Commands are taken from fenced code blocks (bash, sh, shell, console, or unlabelled) and from
inline code that starts like a command (`python ...`, `make ...`, `ray job submit ...`, `cmd-...`).
A command is checked when it invokes a project entrypoint:
    python jobs/X.py | python benchmarks/X.py | python -m pipelines.X | python -m cmd_model.X
    cmd-X (the pyproject.toml scripts) | make X | ray job submit ... -- <one of these>
Each --flag must be one of the entrypoint's parser's options (spelled out: argparse would accept
an abbreviation, a reader should not see one), each make target a Makefile rule, and each path
into the repository (jobs/, infra/, tests/, ...) a file that exists. The parsers are taken
in-process: argparse's parse_args is patched to hand back the parser the entrypoint's main()
built, so nothing runs and no subprocess starts.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FRONT_PAGE_WORDS = 1500
SHELL_LABELS = {"", "bash", "sh", "shell", "console"}
REPO_DIRS = ("jobs/", "benchmarks/", "pipelines/", "cmd_model/", "infra/", "tests/", "docs/")
FENCE = re.compile(r"^([ \t]*)```([\w-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")  # may wrap a line, never a paragraph
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s+(\S+)", re.M)


@dataclass(frozen=True)
class Command:
    page: str  # the file the command is in, relative to the repository
    text: str  # the command as one line (continuations joined, comment dropped)


# --- reading the pages ---------------------------------------------------------------------


def strip_comment(line: str) -> str:
    """The line up to an unquoted `#` that starts a word (bash's rule)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_lines(block: str) -> list[str]:
    """A block's commands: backslash continuations joined, comments dropped, `$ ` prompts removed."""
    lines, pending = [], ""
    for raw in block.splitlines():
        line = strip_comment(raw).strip()
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = pending + line
        pending = ""
        if line.startswith("$ "):
            line = line[2:]
        if line:
            lines.append(line)
    if pending.strip():
        lines.append(pending.strip())
    return lines


def without_code(text: str) -> str:
    """The prose of a page: fenced blocks and inline code removed (links in code are not links)."""
    return INLINE.sub("", FENCE.sub("", text))


def commands(page: str, text: str) -> list[Command]:
    """Every command of a page: each line of its shell blocks, and inline code that reads as a command."""
    found = []
    for match in FENCE.finditer(text):
        if match.group(2).lower() in SHELL_LABELS:
            found += [Command(page, line) for line in shell_lines(match.group(3))]
    for match in INLINE.finditer(FENCE.sub("", text)):
        code = " ".join(match.group(1).split())
        if re.match(r"(\.venv/bin/)?python3? |make |ray job submit |cmd-[a-z-]+( |$)", code):
            found.append(Command(page, code))
    return found


# --- the project's entrypoints ---------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _options(parser: argparse.ArgumentParser) -> frozenset[str]:
    return frozenset(s for action in parser._actions for s in action.option_strings)


def _import(module: str):
    if module.startswith("benchmarks."):  # a folder of scripts, not a package
        path = ROOT / (module.replace(".", "/") + ".py")
        spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


@functools.cache
def entrypoint_flags(module: str, stage: str | None = None) -> frozenset[str]:
    """The options of the parser `module`'s main() builds, taken in-process when it parses."""
    if module == "jobs.tune":  # the sweep's own flags, then the trials' training flags of --stage
        from jobs.tune import sweep_parser
        from pipelines.training.cli import build_parser
        from pipelines.training.config import STAGES

        stages = [stage] if stage in STAGES else list(STAGES)
        return _options(sweep_parser()).union(*(_options(build_parser(s)) for s in stages)) | {"-h", "--help"}
    main = _import(module).main

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", capture),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture),
    ):
        try:
            main([]) if main.__code__.co_argcount else main()
        except _Parsed as parsed:
            return _options(parsed.parser)
    raise AssertionError(f"{module}.main() returned without parsing its arguments")


@functools.cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(t for t in re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.M) if not t.startswith("."))


@functools.cache
def scripts() -> dict[str, str]:
    """cmd-* command -> its module (pyproject.toml's [project.scripts])."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in table.items()}


def entrypoint(tokens: list[str]) -> tuple[str | None, list[str], str | None]:
    """(kind or module, the arguments, a problem): kind 'make' for make; (None, [], None): not ours."""
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # FOO=bar before the command
        tokens = tokens[1:]
    if not tokens:
        return None, [], None
    head, args = tokens[0], tokens[1:]
    if head == "make":
        return "make", args, None
    if head in scripts():
        return scripts()[head], args, None
    if head.startswith("cmd-"):
        return None, [], f"{head} is not a [project.scripts] command of pyproject.toml"
    if head == "ray" and args[:2] == ["job", "submit"]:
        if "--" not in args:
            return None, [], None
        return entrypoint(args[args.index("--") + 1 :])
    if re.fullmatch(r"(\S*/)?python3?(\.\d+)?", head) and args:
        if args[0] == "-m" and len(args) > 1:
            module = args[1]
            if module.split(".")[0] in ("pipelines", "cmd_model"):
                path = ROOT / module.replace(".", "/")
                if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
                    return None, [], f"python -m {module}: no such module"
                return module, args[2:], None
            return None, [], None
        script = args[0]
        if re.fullmatch(r"(jobs|benchmarks)/\w+\.py", script) and (ROOT / script).is_file():  # else: no such path
            return script[:-3].replace("/", "."), args[1:], None
    return None, [], None


def split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote: prose in a block, not a command
        return text.split()


def check_command(cmd: Command) -> list[str]:
    """What is wrong with one command, as readable lines (none: it is right or not the project's)."""
    tokens = split(cmd.text)
    where = f"{cmd.page}: `{cmd.text}`"
    problems = [
        f"{where}: {token} does not exist"
        for token in tokens
        if token.startswith(REPO_DIRS)
        and not re.search(r"[<>*{}$]|\.\.\.", token)
        and not (ROOT / token.split("::")[0]).exists()
    ]
    module, args, problem = entrypoint(tokens)
    if problem:
        return [*problems, f"{where}: {problem}"]
    if module is None:
        return problems
    if module == "make":
        return problems + [
            f"{where}: make target {arg!r} is not in the Makefile"
            for arg in args
            if not arg.startswith("-") and "=" not in arg and arg not in make_targets()
        ]
    stage = args[args.index("--stage") + 1] if "--stage" in args[:-1] else None
    known = entrypoint_flags(module, stage)
    flags = [arg.split("=")[0] for arg in args if arg.startswith("--") and arg != "--"]
    return problems + [f"{where}: {flag} is not a flag of {module}" for flag in flags if flag not in known]


# --- links ----------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.M):
        base = slug(heading)
        seen[base if base not in seen else f"{base}-{seen[base]}"] = 0
        seen[base] = seen.get(base, 0) + 1
    return set(seen)


def check_links(page: Path, text: str) -> list[str]:
    problems = []
    prose = without_code(text)
    for target in LINK.findall(prose) + REF_LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}: link ({target})"
        if not file.exists():
            problems.append(f"{where}: {path} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"{where}: {file.name} has no heading #{anchor}")
    return problems


# --- the tests ------------------------------------------------------------------------------


def test_front_page_is_short():
    words = len(README.read_text().split())  # as `wc -w`
    assert words <= FRONT_PAGE_WORDS, f"README.md has {words} words; the front page keeps to {FRONT_PAGE_WORDS}"


def test_front_page_leads_to_every_page():
    """Each docs/ page and the demo's picture are one link away from the front page."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(without_code(README.read_text()))}
    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "docs" / "demo_contact_sheet.gif"]
    unlinked = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link: {', '.join(unlinked)}"


def test_every_link_resolves():
    problems = [p for page in PAGES for p in check_links(page, page.read_text())]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_documented_command_exists_as_written():
    found = [c for page in PAGES for c in commands(str(page.relative_to(ROOT)), page.read_text())]
    checked = [c for c in found if entrypoint(split(c.text))[0]]
    assert len(checked) >= 20, f"only {len(checked)} project commands found in the docs: is the parser broken?"
    problems = [p for c in found for p in check_command(c)]
    assert not problems, "commands in the docs that would not run as written:\n" + "\n".join(problems)


def test_the_checks_catch_what_they_should():
    """Ablation: a made-up flag, make target, script, path and link are each reported; comments,
    ray's own flags and continuation lines are not mistaken for the job's."""
    page = """
```bash
ray job submit --working-dir . -- python jobs/train_motion.py --preset tiny --name m \\
    --max-steps 3 --no-such-flag 1   # --not-a-flag-in-a-comment
python jobs/tune.py --stage motion --search infra/sweeps/motion.yaml --name s --latents x --made-up-sweep
make demo no-such-target
python -m pipelines.demo --mode latent --steps=5 --classes-typo 3
python jobs/no_such_job.py --preset tiny
cmd-train-motion --preset tiny --unknown-too
python jobs/evaluate.py --preset tiny --real infra/no-such-file.yaml
```
Run `python benchmarks/learning.py --modes pixel --not-a-learning-flag`; see [x](docs/nowhere.md) and
[y](README.md#no-such-heading), not `[z](in/code.md)`.
"""
    problems = "\n".join(p for c in commands("synthetic.md", page) for p in check_command(c))
    for expected in (
        "--no-such-flag is not a flag of jobs.train_motion",
        "--made-up-sweep is not a flag of jobs.tune",
        "make target 'no-such-target' is not in the Makefile",
        "--classes-typo is not a flag of pipelines.demo",
        "jobs/no_such_job.py does not exist",
        "--unknown-too is not a flag of jobs.train_motion",
        "infra/no-such-file.yaml does not exist",
        "--not-a-learning-flag is not a flag of benchmarks.learning",
    ):
        assert expected in problems, f"not reported: {expected}\n{problems}"
    for silent in ("--not-a-flag-in-a-comment", "--working-dir", "--max-steps", "--steps", "--latents", "--stage"):
        assert f": {silent} is not a flag" not in problems, f"{silent} wrongly reported:\n{problems}"
    assert "'demo'" not in problems, problems
    assert problems.count("\n") == 7, problems  # the eight above and nothing else
    links = "\n".join(check_links(README, page))
    assert "docs/nowhere.md does not exist" in links and "no heading #no-such-heading" in links
    assert "in/code.md" not in links, links


if __name__ == "__main__":  # python tests/test_docs.py: the problems, without pytest
    for page in PAGES:
        for line in check_links(page, page.read_text()):
            print(line)
        for c in commands(str(page.relative_to(ROOT)), page.read_text()):
            for line in check_command(c):
                print(line)
    sys.exit(0)
