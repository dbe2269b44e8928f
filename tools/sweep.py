"""Run a results sweep from a YAML spec: each row's commands, then `qpeft eval` of its
model on each domain, and one table with every row's bits, perplexity and ratio to
the peer; with `frontier`, each method's quality–memory frontier and its plot.

    python tools/sweep.py tools/sweeps/formats.yaml WORKDIR [--max-windows N]

A spec (see tools/sweeps/):

    title: what the table shows
    eval: {seqlen: 2048, max_windows: null, dtype: fp32}   # qpeft eval's flags
    domains:                               # optional: eval flags per test text
      wikitext2: [--data, wikitext2]       # (default: one, WikiText-2)
      python-docs: [--data, python-docs]
    peer: nf4 nearest                      # ratios against this row
    frontier: {screen_windows: 20}         # optional, see below
    rows:
      - label: fp32
        eval: smollm2                      # a model to evaluate as it is
      - label: nf4 nearest
        method: qpeft nf                   # the frontier this row belongs to
        steps:                             # qpeft commands, in order
          - [quantize, smollm2, --config, nf4, --out, "{out}"]
      - label: LQ-LoRA 3.25 r8
        steps:
          - {nproc: 2, argv: [decompose, smollm2, --budget, 3.25, --rank, 8, --out, "{out}"]}
        eval: "{out}"                      # the default
      - label: hqq 3-bit g64
        method: HQQ
        steps:                             # a script of tools/ instead of qpeft
          - {script: peers.py, argv: [hqq, --nbits, 3, --group-size, 64, --out, "{out}"]}

`{out}` is WORKDIR/<row's slug>, `{work}` is WORKDIR, `{row:LABEL}` another row's
`{out}`, and `{NAME}` the spec's `vars: {NAME: value}` (or `--var NAME=value`). Each
command runs in a child process as a user would run it (`nproc` > 1: under
torchrun, one thread per process). Finished steps and evaluations are recorded
in WORKDIR/sweep.json (written atomically), so an interrupted sweep continues where
it stopped; a step interrupted inside `qpeft decompose` is continued with --resume.

A row's bits are those of its checkpoint's manifest (Q, and everything stored: Q
plus the adapter), or of the peer.json that tools/peers.py writes.

With `frontier`, every row is first evaluated on the first `screen_windows`
windows of each domain; the rows on their method's frontier there (no row of the
method has lower perplexity at fewer or equal total bits) are then evaluated on all
windows (or `eval.max_windows`). The table marks them, and WORKDIR/frontier.png
plots perplexity against total stored bits per parameter, one panel per domain: each
method's frontier on all windows as a line, every row's screening figure as a point.
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

TOOLS = Path(__file__).resolve().parent
PEER_FILE = "peer.json"  # tools/peers.py's record of a peer's bits


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


def run_command(argv: list[str], nproc: int = 1, script: str | None = None) -> tuple[str, float]:
    """`qpeft ARGV...` (or `python tools/SCRIPT ARGV...`) in a child process: its stdout
    and wall seconds; exits with the end of its stderr if it fails."""
    command, env = [sys.executable, "-m", "qpeft.cli"], None
    if script is not None:
        command = [sys.executable, str(TOOLS / script)]
    elif nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "qpeft.cli"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run([*command, *argv], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: {script or 'qpeft'} {' '.join(argv)}\n{result.stderr[-3000:]}")
    return result.stdout, time.perf_counter() - start


def lower_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """The keys of `points` ((bits, ppl) each) that no other point beats: none has
    lower perplexity at fewer or equal bits. By rising bits."""
    ordered = sorted(points, key=lambda k: (points[k][0], points[k][1]))
    kept, best = [], float("inf")
    for key in ordered:
        if points[key][1] < best:
            kept.append(key)
            best = points[key][1]
    return kept


class Sweep:
    def __init__(self, spec: dict[str, Any], work: Path, eval_flags: list[str], variables: dict[str, str]) -> None:
        self.spec, self.work, self.eval_flags = spec, work, eval_flags
        self.variables = {str(k): str(v) for k, v in (spec.get("vars") or {}).items()} | variables
        self.rows = spec["rows"]
        labels = [row["label"] for row in self.rows]
        if len(set(map(slug, labels))) != len(labels):
            raise SystemExit("the spec's row labels must differ (after lower-casing)")
        if spec.get("peer") not in (None, *labels):
            raise SystemExit(f"peer {spec['peer']!r} is not a row label")
        self.domains: dict[str, list[str]] = {k: [str(f) for f in v] for k, v in (spec.get("domains") or {}).items()}
        self.domains = self.domains or {"wikitext2": []}
        self.screen = (spec.get("frontier") or {}).get("screen_windows")
        self.state_path = work / "sweep.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def fill(self, text: object, row: dict[str, Any]) -> str:
        text = str(text).replace("{out}", str(self.work / slug(row["label"]))).replace("{work}", str(self.work))
        for name, value in self.variables.items():
            text = text.replace(f"{{{name}}}", value)
        return re.sub(r"\{row:([^}]+)\}", lambda m: str(self.work / slug(m.group(1))), text)

    def save(self) -> None:
        with atomic_file(self.state_path) as tmp:
            tmp.write_text(json.dumps(self.state, indent=1) + "\n")

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        record = self.state.setdefault(slug(row["label"]), {"steps": []})
        record.setdefault("evals", {})
        return record

    def build(self, row: dict[str, Any]) -> None:
        """Run the row's steps not yet finished."""
        record = self.record(row)
        for index, step in enumerate(row.get("steps", [])):
            if index < len(record["steps"]):
                continue
            step = step if isinstance(step, dict) else {"argv": step}
            argv = [self.fill(a, row) for a in step["argv"]]
            out = argv[argv.index("--out") + 1] if "--out" in argv else None
            if out is not None and Path(f"{out}.work").is_dir() and argv[0] == "decompose":
                argv.append("--resume")
            print(f"[{row['label']}] {step.get('script', 'qpeft')} {' '.join(argv)}", file=sys.stderr, flush=True)
            _, seconds = run_command(argv, int(step.get("nproc", 1)), step.get("script"))
            record["steps"].append({"argv": argv, "seconds": round(seconds, 1)})
            self.save()

    def flags(self, domain: str, screen: bool) -> list[str]:
        """qpeft eval's flags for a domain, on the screening windows or on all."""
        base = self.eval_flags
        if screen and self.screen:
            base = [f for i, f in enumerate(base) if f != "--max-windows" and base[i - 1 : i] != ["--max-windows"]]
            base = [*base, "--max-windows", str(self.screen)]
        return [*base, *self.domains[domain]]

    def evaluate(self, row: dict[str, Any], flags: list[str]) -> dict[str, Any]:
        """`qpeft eval` of the row's model with `flags`, once (recorded by its flags)."""
        record = self.record(row)
        key = " ".join(flags)
        if key not in record["evals"]:
            target = self.fill(row.get("eval", "{out}"), row)
            print(f"[{row['label']}] qpeft eval {target} {key}", file=sys.stderr, flush=True)
            stdout, seconds = run_command(["eval", target, *flags, "--json"])
            result = json.loads(stdout.strip().splitlines()[-1])
            record["evals"][key] = {**result, "seconds": round(seconds, 1)}
            self.save()
        return record["evals"][key]

    def result(self, row: dict[str, Any], flags: list[str]) -> dict[str, Any] | None:
        return (self.state.get(slug(row["label"])) or {}).get("evals", {}).get(" ".join(flags))

    def bits(self, row: dict[str, Any]) -> tuple[float | None, float | None]:
        """(bits per parameter of Q, of everything stored) from the row's checkpoint."""
        model = Path(self.fill(row.get("eval", "{out}"), row))
        if (model / PEER_FILE).is_file():
            peer = json.loads((model / PEER_FILE).read_text())
            return peer["bits_q"], peer["bits_total"]
        if not (model / "qpeft_manifest.json").is_file():
            return None, None
        summary = json.loads((model / "qpeft_manifest.json").read_text())["summary"]
        return summary["bits_per_param"], summary.get("bits_with_adapter", summary["bits_per_param"])

    def frontier(self, domain: str) -> list[dict[str, Any]]:
        """The rows on their method's frontier on the screening windows of `domain`."""
        by_method: dict[str, dict[str, tuple[float, float]]] = {}
        for row in self.rows:
            result, (_, total) = self.result(row, self.flags(domain, True)), self.bits(row)
            if result is not None and total is not None and "method" in row:
                by_method.setdefault(row["method"], {})[row["label"]] = (total, result["ppl"])
        on = {label for points in by_method.values() for label in lower_frontier(points)}
        return [row for row in self.rows if row["label"] in on]

    def table(self) -> str:
        title = str(self.spec.get("title", ""))
        for name, value in self.variables.items():
            title = title.replace(f"{{{name}}}", value)
        lines = [title, ""]
        peer_row = next((r for r in self.rows if r["label"] == self.spec.get("peer")), None)
        for domain in self.domains:
            full, screen = self.flags(domain, False), self.flags(domain, True)
            frontier = {row["label"] for row in self.frontier(domain)} if self.screen else set()
            peer = None if peer_row is None else self.result(peer_row, full) or self.result(peer_row, screen)
            sample = next((r for row in self.rows if (r := self.result(row, full))), None)
            header = ["method", "row", "Q bits", "total bits"]
            if self.screen:
                header.append(f"ppl, {self.screen} windows")
            header.append("ppl" + (f", {sample['windows']} windows" if sample else ""))
            if peer:
                header.append(f"ppl / {peer_row['label']}")
            lines += [f"**{domain}**", "", "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
            for row in self.rows:
                q, total = self.bits(row)
                cells = [row.get("method", ""), row["label"] + (" (frontier)" if row["label"] in frontier else "")]
                cells += ["—" if q is None else f"{q:.4f}", "—" if total is None else f"{total:.4f}"]
                if self.screen:
                    first = self.result(row, screen)
                    cells.append("not measured" if first is None else f"{first['ppl']:.4f}")
                result = self.result(row, full)
                cells.append("—" if result is None else f"{result['ppl']:.4f}")
                if peer:
                    same = self.result(peer_row, full if result else screen)
                    mine = result or self.result(row, screen)
                    cells.append("" if mine is None or same is None else f"{mine['ppl'] / same['ppl']:.4f}")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)

    def plot(self, path: Path) -> None:
        """Perplexity against total stored bits, one panel per domain: each method's
        frontier on all windows (lines), every row on the screening windows (points)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        methods = list(dict.fromkeys(row["method"] for row in self.rows if "method" in row))
        colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
        fig, axes = plt.subplots(1, len(self.domains), figsize=(6.5 * len(self.domains), 4.8), squeeze=False)
        for ax, domain in zip(axes[0], self.domains, strict=True):
            frontier = self.frontier(domain)
            for method in methods:
                rows = [row for row in self.rows if row.get("method") == method]
                points = [(self.bits(r)[1], self.result(r, self.flags(domain, True))) for r in rows]
                points = [(b, res["ppl"]) for b, res in points if b is not None and res is not None]
                if points:
                    ax.scatter(*zip(*points, strict=True), s=18, facecolors="none", edgecolors=colors[method])
                full = [(r, self.result(r, self.flags(domain, False))) for r in frontier if r.get("method") == method]
                line = sorted((self.bits(r)[1], res["ppl"]) for r, res in full if res is not None)
                if line:
                    ax.plot(*zip(*line, strict=True), marker="o", color=colors[method], label=method)
            ax.set(xlabel="total stored bits per parameter", ylabel="perplexity", yscale="log", title=domain)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"lines: each method's frontier, all windows; points: every row, first {self.screen} windows")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--max-windows", type=int, help="override the spec's eval.max_windows")
    parser.add_argument("--table", action="store_true", help="print the table of what WORKDIR holds; run nothing")
    parser.add_argument("--var", action="append", default=[], help="NAME=VALUE: {NAME} in the spec's commands")
    args = parser.parse_args()
    if any("=" not in v for v in args.var):
        raise SystemExit("--var takes NAME=VALUE")
    variables = dict(v.split("=", 1) for v in args.var)
    spec = yaml.safe_load(args.spec.read_text())
    options = dict(spec.get("eval") or {})
    if args.max_windows is not None:
        options["max_windows"] = args.max_windows
    given = {key: value for key, value in options.items() if value is not None}
    eval_flags = [flag for key, value in given.items() for flag in (f"--{key.replace('_', '-')}", str(value))]
    args.workdir.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(spec, args.workdir, eval_flags, variables)
    if not args.table:
        for row in sweep.rows:
            sweep.build(row)
        for domain in sweep.domains:
            for row in sweep.rows:
                sweep.evaluate(row, sweep.flags(domain, True))
            if sweep.screen:
                for row in sweep.frontier(domain):
                    sweep.evaluate(row, sweep.flags(domain, False))
    print(sweep.table())
    if sweep.screen:
        sweep.plot(args.workdir / "frontier.png")
        print(f"plot: {args.workdir / 'frontier.png'}")


if __name__ == "__main__":
    main()
