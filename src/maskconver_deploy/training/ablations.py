"""The paper's two ablations (Tables 6-7) on the shapes data: one table from three training runs.

Protocol (Makefile target `ablations`): three runs of `maskconver train` with one schedule and seed, all
started from the same weights (`--init`, the shipped model), differing only in one switch: the baseline
(stuff "islands", class embedding on; it gets the same extra training as the others), `--stuff-centers
global` (Table 6) and `--no-class-embedding` (Table 7). Each run's final evaluation on the same val images is
read from its `<name>.train.json`. `collect` puts the PQ numbers, their differences to the baseline and the
paper's numbers (SpineNet-Seg49 on COCO val, full training) side by side. A fine-tune measures how much a
switch matters to a model that is given a short time to adapt to it, not a full training with it.

Run: `python -m maskconver_deploy.training.ablations RUN_DIR OUT_JSON [--force]`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import read_json, write_json

RUNS = {
    "baseline": "stuff centers: islands (k = 3), class embedding on",
    "global": "stuff centers: one per class from its global box (Table 6)",
    "no-class-embedding": "class embedding off (Table 7)",
}
# Optional: Table 7 as two short trainings from scratch (same schedule and seed), class embedding on and off.
# A fine-tune of a model trained with the class embedding measures its dependence on it; these measure the
# benefit of training with it, as the paper does (at a far shorter schedule).
SCRATCH_RUNS = {
    "scratch-on": "from scratch, class embedding on",
    "scratch-off": "from scratch, class embedding off",
}
GROUPS = ("all", "things", "stuff")

# The paper's numbers (PQ, COCO val, SpineNet-Seg49): Table 6 (stuff centers) and Table 7 (class embedding).
PAPER = {
    "table6_stuff_centers": {
        "islands": {"all": 45.54, "stuff": 40.14},
        "global": {"all": 45.11, "stuff": 38.61},
    },
    "table7_class_embedding": {
        "on": {"all": 45.54, "things": 49.11, "stuff": 40.14},
        "off": {"all": 43.73, "things": 47.06, "stuff": 38.70},
    },
}


def _run_result(run_dir: Path, name: str, settings: dict[str, str] = RUNS) -> dict[str, Any]:
    path = run_dir / f"{name}.train.json"
    if not path.is_file():
        raise UserError(f"no summary of the '{name}' run (train it first: make ablations)", path)
    summary = read_json(path)
    val = summary.get("val") or {}
    if not all(isinstance(val.get(g), dict) for g in GROUPS):
        raise UserError("the run has no final evaluation (train with --final-eval > 0)", path)
    return {
        "setting": settings[name],
        "pq": {g: round(float(val[g]["pq"]), 2) for g in GROUPS},
        "sq": {g: round(float(val[g]["sq"]), 2) for g in GROUPS},
        "rq": {g: round(float(val[g]["rq"]), 2) for g in GROUPS},
        "val_images": val.get("n_images"),
        "steps": summary.get("config", {}).get("steps"),
        "init": summary.get("config", {}).get("init"),
        "train_seconds": summary.get("train_seconds"),
        "command": summary.get("command"),
    }


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {g: round(a[g] - b[g], 2) for g in a if g in b}


def collect(run_dir: str | Path) -> dict[str, Any]:
    """The ablation table from the three runs' summaries in `run_dir` (and the two from-scratch runs, if there)."""
    run_dir = Path(run_dir)
    runs = {name: _run_result(run_dir, name) for name in RUNS}
    scratch = all((run_dir / f"{name}.train.json").is_file() for name in SCRATCH_RUNS)
    if scratch:
        runs.update({name: _run_result(run_dir, name, SCRATCH_RUNS) for name in SCRATCH_RUNS})
    base = runs["baseline"]["pq"]
    t6, t7 = PAPER["table6_stuff_centers"], PAPER["table7_class_embedding"]
    table = {
        "protocol": (
            "three runs of `maskconver train` from the same initial weights, identical schedule, seed and data, "
            "differing only in the ablated switch; PQ in percent on the same val images (each run's final "
            "evaluation). Paper: SpineNet-Seg49, COCO val, full training"
        ),
        "runs": runs,
        "table6_stuff_centers": {
            "ours": {"islands": base, "global": runs["global"]["pq"],
                     "islands_minus_global": _delta(base, runs["global"]["pq"])},
            "paper": {**t6, "islands_minus_global": _delta(t6["islands"], t6["global"])},
        },
        "table7_class_embedding": {
            "ours": {"on": base, "off": runs["no-class-embedding"]["pq"],
                     "on_minus_off": _delta(base, runs["no-class-embedding"]["pq"])},
            "paper": {**t7, "on_minus_off": _delta(t7["on"], t7["off"])},
        },
    }
    if scratch:
        on, off = runs["scratch-on"]["pq"], runs["scratch-off"]["pq"]
        table["table7_class_embedding"]["ours_from_scratch"] = {"on": on, "off": off, "on_minus_off": _delta(on, off)}
    return table


def main(argv: list[str] | None = None) -> int:
    """CLI: RUN_DIR OUT_JSON [--force]; prints the two differences."""
    args = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in args
    args = [a for a in args if a != "--force"]
    if len(args) != 2:
        print("usage: python -m maskconver_deploy.training.ablations RUN_DIR OUT_JSON [--force]", file=sys.stderr)
        return 2
    try:
        table = collect(args[0])
        write_json(args[1], table, force=force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, diff in (("table6_stuff_centers", "islands_minus_global"), ("table7_class_embedding", "on_minus_off")):
        ours, paper = table[key]["ours"][diff], table[key]["paper"][diff]
        print(f"{key}: ours {diff} {ours}; paper {paper}")
    if "ours_from_scratch" in table["table7_class_embedding"]:
        print(f"table7_class_embedding from scratch: on_minus_off {table['table7_class_embedding']['ours_from_scratch']['on_minus_off']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
