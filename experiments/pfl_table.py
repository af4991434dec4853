"""The README's personalization table: every method of a PFL paper table on digits and
MNIST-1D at Dirichlet 0.1 and 0.5, seeds 0-2, each method's learning rate and own key
hyperparameter tuned on validation rows (``fedjax-sim compare --tune --tune-own``, one
sweep per setting), then one table across the four settings.

    python experiments/pfl_table.py --run runs/pfl_table     # the four compares, then tables
    python experiments/pfl_table.py runs/pfl_table           # tables from finished compares

Writes ``experiments/results/pfl_table.md`` (every column of every setting) and prints the
README's table (accuracy and bottom decile per setting, bytes up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ALGORITHMS = ("fedavg,fedavg_ft,fedper,fedrep,fedbabu,lg_fedavg,fedobp,ditto,apfl,fedprox,"
              "scaffold,fedopt,perfedavg,pfedme,moon,feddyn,fedrod,fedproto,fedamp,fedala,"
              "pfedhn")
SETTINGS = (("digits", 0.1), ("digits", 0.5), ("mnist1d", 0.1), ("mnist1d", 0.5))
PAGE = Path(__file__).resolve().parent / "results" / "pfl_table.md"


def folder_of(out: Path, dataset: str, alpha: float) -> Path:
    return out / f"{dataset}_a{alpha:g}"


def command(out: Path, dataset: str, alpha: float) -> list[str]:
    return [sys.executable, "-m", "fedjax_sim", "compare", "--algorithms", ALGORITHMS,
            "--dataset", dataset, "--alpha", str(alpha), "--seeds", "0,1,2", "--tune",
            "--tune-own", "--no-progress", "--output", str(folder_of(out, dataset, alpha))]


def local_records(folder: Path) -> list[dict]:
    """The Local reference's summaries (one per seed)."""
    paths = sorted((folder / "local").glob("seed*/summary.json"))
    return [json.loads(p.read_text()) for p in paths]


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    a = 100 * np.asarray(values)
    return f"{a.mean():.1f} ± {a.std():.1f}"


def readme_table(out: Path) -> str:
    per_setting = {}
    for dataset, alpha in SETTINGS:
        folder = folder_of(out, dataset, alpha)
        records = json.loads((folder / "compare.json").read_text())
        records = {k: v for k, v in records.items() if k != "tuning"}
        records["local"] = local_records(folder)
        per_setting[(dataset, alpha)] = records
    methods = ["local", *ALGORITHMS.split(",")]
    head = " | ".join(f"{d} α {a:g}" for d, a in SETTINGS)
    lines = [f"| algorithm | {head} | MB up (digits) |",
             "|---|" + "---|" * (len(SETTINGS) + 1)]
    for m in methods:
        cells = []
        for key in SETTINGS:
            rows = [r for r in per_setting[key].get(m, []) if r.get("status") == "complete"]
            acc = cell([r["accuracy"] for r in rows])
            p10 = cell([r["client_p10"] for r in rows])
            cells.append(f"{acc} ({p10})")
        digits = per_setting[SETTINGS[0]].get(m, [])
        mb = digits[0].get("bytes_up", 0) / 1e6 if digits else 0.0
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mb:.1f} |")
    return "\n".join(lines)


def page(out: Path) -> str:
    parts = [__doc__.split("\n\n")[0].replace("\n", " ") + "\n",
             "```bash\npython experiments/pfl_table.py --run runs/pfl_table\n```\n"]
    for dataset, alpha in SETTINGS:
        folder = folder_of(out, dataset, alpha)
        parts.append(f"## {dataset}, Dirichlet α {alpha:g}\n")
        shown = " ".join(map(str, command(Path("runs/pfl_table"), dataset, alpha)[3:]))
        parts.append(f"`fedjax-sim {shown}`\n")
        parts.append((folder / "compare.md").read_text().strip() + "\n")
    return "\n".join(parts)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--run", action="store_true", help="run the four compares first")
    args = parser.parse_args(argv)
    if args.run:
        for dataset, alpha in SETTINGS:
            subprocess.run(command(args.out, dataset, alpha), check=True)
    PAGE.write_text(page(args.out))
    table = readme_table(args.out)
    print(table)
    return table


if __name__ == "__main__":
    main()
