"""Run a results sweep from a YAML spec: each row's `qpeft` commands, then `qpeft eval`
of its model, and one table with every row's bits, perplexity and ratio to the peer.

    python tools/sweep.py tools/sweeps/formats.yaml WORKDIR [--max-windows N]

A spec (see tools/sweeps/):

    title: what the table shows
    eval: {seqlen: 2048, max_windows: null, dtype: fp32}   # qpeft eval's flags
    peer: nf4 nearest                                     # ratios against this row
    rows:
      - label: fp32
        eval: smollm2                      # a model to evaluate as it is
      - label: nf4 nearest
        steps:                             # qpeft commands, in order
          - [quantize, smollm2, --config, nf4, --out, "{out}"]
      - label: LQ-LoRA 3.25 r8
        steps:
          - {nproc: 2, argv: [decompose, smollm2, --budget, 3.25, --rank, 8, --out, "{out}"]}
        eval: "{out}"                      # the default

`{out}` is WORKDIR/<row's slug>, `{work}` is WORKDIR, `{row:LABEL}` another row's
`{out}`. Each command runs in a child process as a user would run it (`nproc` > 1:
under torchrun, one thread per process). Finished steps and evaluations are recorded
in WORKDIR/sweep.json (written atomically), so an interrupted sweep continues where
it stopped; a step interrupted inside `qpeft decompose` is continued with --resume.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from qpeft.io.atomic import atomic_file


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


def run_qpeft(argv: list[str], nproc: int = 1) -> tuple[str, float]:
    """`qpeft ARGV...` in a child process: its stdout and wall seconds; exits with the
    end of its stderr if it fails."""
    command, env = [sys.executable, "-m", "qpeft.cli"], None
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "qpeft.cli"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run([*command, *argv], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: qpeft {' '.join(argv)}\n{result.stderr[-3000:]}")
    return result.stdout, time.perf_counter() - start


class Sweep:
    def __init__(self, spec: dict[str, Any], work: Path) -> None:
        self.spec, self.work = spec, work
        self.rows = spec["rows"]
        labels = [row["label"] for row in self.rows]
        if len(set(map(slug, labels))) != len(labels):
            raise SystemExit("the spec's row labels must differ (after lower-casing)")
        if spec.get("peer") not in (None, *labels):
            raise SystemExit(f"peer {spec['peer']!r} is not a row label")
        self.state_path = work / "sweep.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def fill(self, text: object, row: dict[str, Any]) -> str:
        text = str(text).replace("{out}", str(self.work / slug(row["label"]))).replace("{work}", str(self.work))
        return re.sub(r"\{row:([^}]+)\}", lambda m: str(self.work / slug(m.group(1))), text)

    def save(self) -> None:
        with atomic_file(self.state_path) as tmp:
            tmp.write_text(json.dumps(self.state, indent=1) + "\n")

    def run_row(self, row: dict[str, Any], eval_flags: list[str]) -> dict[str, Any]:
        record = self.state.setdefault(slug(row["label"]), {"steps": [], "eval": None})
        for index, step in enumerate(row.get("steps", [])):
            if index < len(record["steps"]):
                continue
            step = step if isinstance(step, dict) else {"argv": step}
            argv = [self.fill(a, row) for a in step["argv"]]
            out = argv[argv.index("--out") + 1] if "--out" in argv else None
            if out is not None and Path(f"{out}.work").is_dir() and argv[0] == "decompose":
                argv.append("--resume")
            print(f"[{row['label']}] qpeft {' '.join(argv)}", file=sys.stderr, flush=True)
            _, seconds = run_qpeft(argv, int(step.get("nproc", 1)))
            record["steps"].append({"argv": argv, "seconds": round(seconds, 1)})
            self.save()
        if record["eval"] is None or record["eval"]["flags"] != eval_flags:
            target = self.fill(row.get("eval", "{out}"), row)
            print(f"[{row['label']}] qpeft eval {target}", file=sys.stderr, flush=True)
            stdout, seconds = run_qpeft(["eval", target, *eval_flags, "--json"])
            result = json.loads(stdout.strip().splitlines()[-1])
            record["eval"] = {**result, "flags": eval_flags, "seconds": round(seconds, 1)}
            self.save()
        return record

    def bits(self, row: dict[str, Any]) -> tuple[float | None, float | None]:
        """(bits per parameter of Q, with the adapter) from the row's checkpoint."""
        manifest = Path(self.fill(row.get("eval", "{out}"), row)) / "qpeft_manifest.json"
        if not manifest.is_file():
            return None, None
        summary = json.loads(manifest.read_text())["summary"]
        return summary["bits_per_param"], summary.get("bits_with_adapter", summary["bits_per_param"])

    def table(self) -> str:
        evals = {row["label"]: (self.state.get(slug(row["label"])) or {}).get("eval") for row in self.rows}
        done = [e for e in evals.values() if e]
        if not done:
            return "no row has been evaluated yet"
        peer = self.spec.get("peer") if evals.get(self.spec.get("peer")) else None
        peer_ppl = evals[peer]["ppl"] if peer else None
        first = done[0]
        lines = [
            f"{self.spec.get('title', '')}",
            f"({first['windows']} windows, {first['tokens']} predicted tokens)",
            "",
            f"| row | Q bits | + adapter | ppl | ppl / {peer} |" if peer else "| row | Q bits | + adapter | ppl |",
            "|---|---:|---:|---:|---:|" if peer else "|---|---:|---:|---:|",
        ]
        for row in self.rows:
            result = evals[row["label"]]
            q, total = self.bits(row)
            cells = [row["label"], "—" if q is None else f"{q:.4f}", "—" if total is None else f"{total:.4f}"]
            cells.append("not measured" if result is None else f"{result['ppl']:.4f}")
            if peer:
                cells.append("" if result is None else f"{result['ppl'] / peer_ppl:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--max-windows", type=int, help="override the spec's eval.max_windows")
    parser.add_argument("--table", action="store_true", help="print the table of what WORKDIR holds; run nothing")
    args = parser.parse_args()
    spec = yaml.safe_load(args.spec.read_text())
    options = dict(spec.get("eval") or {})
    if args.max_windows is not None:
        options["max_windows"] = args.max_windows
    given = {key: value for key, value in options.items() if value is not None}
    eval_flags = [flag for key, value in given.items() for flag in (f"--{key.replace('_', '-')}", str(value))]
    args.workdir.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(spec, args.workdir)
    for row in [] if args.table else spec["rows"]:
        sweep.run_row(row, eval_flags)
    print(sweep.table())


if __name__ == "__main__":
    main()
