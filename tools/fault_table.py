"""The bad-input and fault tables of docs/FAULTS.md, from a run of tests/test_faults.py.

    .venv/bin/python tools/fault_table.py [--out docs/FAULTS.md]

Runs the suite under pytest with JUnit XML, then writes each test's recorded
command, expected and observed result, and whether it passed, as two markdown
tables (bad inputs, faults). The figures are what this run saw.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run_suite(xml: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_faults.py")]
    return subprocess.run([*command, f"--junitxml={xml}"], cwd=REPO, capture_output=True, text=True)


def tables(xml: Path) -> tuple[list[list[str]], list[list[str]]]:
    bad, faults = [], []
    for case in ET.parse(xml).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if case.find("skipped") is not None:
            outcome = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome = "FAILED"
        else:
            outcome = "passed"
        if "fault" in props:
            cells = [props["command"], props["fault"], props["expected"], props["observed"], outcome]
            faults.append(cells)
        elif "expected" in props:
            row = case.get("name").split("[", 1)[1].rstrip("]")
            bad.append([row, f"`{props['command']}`", f"`{props['expected']}`", f"`{props['observed']}`", outcome])
    return bad, faults


def markdown(bad: list[list[str]], faults: list[list[str]], commit: str) -> str:
    lines = [
        "# Bad inputs and faults",
        "",
        "Each row is a test of `tests/test_faults.py`; this page is its last run, written by",
        "`.venv/bin/python tools/fault_table.py` "
        f"(commit {commit}, on the 2-core CPU machine, {datetime.date.today().isoformat()}). What each",
        "guarantee means: docs/FORMAT.md, *Faults*.",
        "",
        f"## Bad inputs ({len(bad)} rows)",
        "",
        "Every row must end in exactly the expected line on stderr (a trailing … is a prefix), exit 2, and",
        "leave the files it was given and its output location exactly as they were.",
        "",
        "| row | command | expected | observed | result |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in bad),
        "",
        f"## Faults ({len(faults)} rows)",
        "",
        "A signal or a full disk at a stage of the real code path (`tests/fault_runner.py` sends it from inside",
        "the named function), then the state it leaves.",
        "",
        "| command | fault | expected | observed | result |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in faults),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "FAULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "faults.xml"
        result = run_suite(xml)
        bad, faults = tables(xml)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    args.out.write_text(markdown(bad, faults, commit.stdout.strip()))
    print(result.stdout.strip().splitlines()[-1])
    print(f"wrote {args.out}: {len(bad)} bad inputs, {len(faults)} faults")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
