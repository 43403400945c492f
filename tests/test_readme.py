"""The README is a manual that stays true: its first part is short with a table of contents, its main job runs as
written (CI installs with its install block, `.ci/run`), and every `fedaug` command it shows parses and is run by a
test or by the deployment demo."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from fedaug.cli import app
from tests.support import ROOT

README = (ROOT / "README.md").read_text()
LINES = README.splitlines()
REFERENCE = "## Reference"
LIMIT = 300


def outside_code(lines: list[str]):
    """``(number, line)`` of the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield number, line


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors() -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in outside_code(LINES):
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            base = anchor(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def block(name: str) -> list[str]:
    """The command lines of the fenced bash block after ``<!-- test: NAME -->`` (as .ci/run reads it)."""
    marker = LINES.index(f"<!-- test: {name} -->")
    opening = next(i for i in range(marker + 1, len(LINES)) if LINES[i].startswith("```"))
    assert LINES[opening] == "```bash", f"the block after <!-- test: {name} --> must be a bash block"
    closing = next(i for i in range(opening + 1, len(LINES)) if LINES[i].startswith("```"))
    return [line for line in LINES[opening + 1 : closing] if line.strip() and not line.startswith("#")]


def test_the_first_part_is_short_and_its_contents_link_to_its_headings():
    reference = LINES.index(REFERENCE)
    assert reference < LIMIT, f"README: {reference} lines before '{REFERENCE}', over {LIMIT}"
    first = LINES[:reference]
    contents = first.index("## Contents")
    toc_end = next(i for i in range(contents + 1, reference) if first[i].startswith("## "))
    toc_links = re.findall(r"\]\(#([^)]+)\)", "\n".join(first[contents:toc_end]))
    known = anchors()
    assert toc_links and not [link for link in toc_links if link not in known]
    sections = [anchor(line[3:]) for _, line in outside_code(first) if line.startswith("## ")][1:]  # after Contents
    assert not [s for s in sections if s not in toc_links], "a section of the first part is missing from Contents"
    assert anchor(REFERENCE[3:]) in toc_links
    every_link = re.findall(r"\]\(#([^)]+)\)", README)
    assert not sorted({link for link in every_link if link not in known})


@pytest.mark.integration  # bash runs .ci/run's reader
def test_ci_installs_with_the_readme_install_block():
    install = block("install")
    assert any(re.fullmatch(r"pip install torch --index-url https://download\.pytorch\.org/whl/cpu", line)
               for line in install), "the install block gives PyTorch's CPU-only install"
    assert "pip install -e ." in install
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_block install" in ci and "<!-- test: $1 -->" in ci
    function = re.search(r"^readme_block\(\) \{\n.*?^\}\n", ci, re.S | re.M).group(0)
    result = subprocess.run(["bash", "-c", function + "readme_block install"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert [line for line in result.stdout.splitlines() if line.strip()] == install, result.stderr


def fedaug_lines() -> list[str]:
    """Every `fedaug ...` command line in the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for code in re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M):
        for line in code.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip().removesuffix("&").strip()
            if line.startswith("fedaug "):
                commands.append(line)
    return commands


def arguments(line: str) -> list[str]:
    """A README command's arguments (optional parts in brackets taken as given)."""
    return shlex.split(line.replace("[", "").replace("]", ""))[1:]


def subcommand(args: list[str]) -> tuple[str, list[str]]:
    position = next(i for i, arg in enumerate(args) if not arg.startswith("-"))
    return args[position], args[position + 1 :]


def test_every_fedaug_command_in_the_readme_parses():
    command = typer.main.get_command(app)
    for line in fedaug_lines():
        name, rest = subcommand(arguments(line))
        assert name in command.commands, f"README: unknown command in `{line}`"
        try:
            command.commands[name].make_context(name, list(rest))
        except click.ClickException as exc:
            pytest.fail(f"README: `{line}`: {exc.format_message()}")


def ran_by_the_main_job_test(line: str) -> bool:
    """The main job's own lines, and searches and recommendations on its bundle with nothing else to read."""
    return line in block("main-job") or (line.startswith("fedaug recommend --model runs/sim/model")
                                         and "--users" not in line)


def test_every_fedaug_command_in_the_readme_is_run_by_a_test_or_the_demo():
    """A command counts as run where its subcommand is called by a test module — the quoted name, or the module named
    for it — or by scripts/deploy-demo.sh, and each of its flags is used with that subcommand by one of them: the
    flag itself, or the setting it names (`--max-minutes`: max_minutes)."""
    sources = [(path.stem, path.read_text()) for path in sorted((ROOT / "tests").glob("test_*.py"))
               if path.name != Path(__file__).name]
    demo = (ROOT / "scripts" / "deploy-demo.sh").read_text()

    def callers(name: str) -> list[str]:
        found = [source for stem, source in sources if f'"{name}"' in source or stem.startswith(f"test_{name}")]
        return found + ([demo] if re.search(rf"^\s*fedaug {name}\b", demo, re.M) else [])

    def uses(source: str, flag: str) -> bool:
        return f'"{flag}"' in source or re.search(rf"(^|\s){flag}\b", source, re.M) is not None or re.search(
            rf"\b{flag.lstrip('-').replace('-', '_')}\b", source) is not None

    missing = []
    for line in fedaug_lines():
        if ran_by_the_main_job_test(line):
            continue
        name, rest = subcommand(arguments(line))
        found = callers(name)
        unused = [arg for arg in rest if arg.startswith("-") and not any(uses(s, arg.split("=")[0]) for s in found)]
        if not found or unused:
            missing.append(f"{line}  ({'never called' if not found else 'unused: ' + ' '.join(unused)})")
    assert not missing, "README commands no test runs:\n" + "\n".join(missing)


@pytest.mark.slow
def test_the_main_job_runs_as_written_and_its_bundle_answers_a_search(tmp_path):
    """The README's main job, line by line in a fresh folder (the install lines are .ci/run's): its report gives the
    model beside the text prior and popularity, and the bundle answers the README's searches."""
    main_job = block("main-job")
    assert main_job[0].startswith("fedaug simulate") and any("--query" in line for line in main_job)
    extra = [line for line in fedaug_lines() if ran_by_the_main_job_test(line) and line not in main_job]
    script = "set -euo pipefail\nfedaug() { \"$PYTHON\" -m fedaug \"$@\"; }\n" + "\n".join(
        f"echo '>>> {i}'\n{line}" for i, line in enumerate(main_job + extra))
    env = os.environ | {"PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:]
    outputs = re.split(r"^>>> \d+$", result.stdout, flags=re.M)[1:]
    assert len(outputs) == len(main_job + extra)

    report = (tmp_path / "runs" / "sim" / "report.md").read_text()
    assert report in result.stdout  # `cat runs/sim/report.md`
    for baseline in ("text prior", "popularity"):  # rows of the test table, beside the federated model's
        row = next((line for line in report.splitlines() if re.match(rf"\|\s*{baseline}\s*\|", line)), None)
        assert row is not None and re.search(r"\b0\.\d{3,}", row), f"report.md shows no {baseline} figure"
    summary = " ".join(outputs[0].split())  # the simulation's own lines (wrapped at the terminal's width)
    assert re.search(r"text prior\b[^.]*\d\.\d{4}", summary) and "popularity" in summary, summary[-1000:]
    search = outputs[next(i for i, line in enumerate(main_job) if "--query" in line)]
    query = re.search(r'--query "([^"]+)"', next(line for line in main_job if "--query" in line)).group(1)
    assert query in search.lower(), search  # the synthetic catalog's titles name their category's product
