"""The AP report of `benchmarks/boosters.py`: per-variant summaries over seeds, and the merge of invocations.

One invocation of boosters.py trains some variants for some seeds; a full measurement (5 variants x 3 seeds at the
demo's steps, and the slower variants again at equal wall-clock) takes hours on a shared machine, so it is run as
several invocations and merged by variant and seed:

    python benchmarks/boosters.py --merge A.json B.json ... --out benchmarks/results/boosters-ap-cpu.json

An input is an invocation's JSON or an earlier merge (merges compose). The merged report keeps every invocation's
commit, load average, threads and settings under `invocations`, and each run names its invocation by index.

The report's keys (an invocation's and a merge's alike):
- `ap`: {variant: {runs: [{seed, AP, AP50, steps, train_s, median_step_s, wall_s, ...}], seeds, AP, AP50, train_s,
  minus_plain_same_seed, missing_seeds}}, where AP / AP50 / train_s are {mean, spread (max - min), values} over seeds.
- `equal_wall_clock`: {how, variants: {variant: {step_ratios: [...], runs: [{seed, AP, steps, step_ratio, ...}
  or {seed, same_as_demo_steps: true, ...}], seeds, AP, minus_plain_same_seed, missing_seeds}}}. A variant whose
  step costs at most `threshold` x plain's is not trained again: its equal-wall-clock result is its result at the
  demo's steps (`same_as_demo_steps`), filled in here from `ap`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# Keys of an input that describe the invocation rather than its runs; kept per invocation in a merge. `commits` and
# `load_average_per_invocation` are those of a merge written before each run kept its invocation (the first
# boosters-ap-cpu.json): its runs come from one of those commits, which one is not recorded.
INVOCATION_KEYS = (
    "commit",
    "commits",
    "load_average",
    "load_average_per_invocation",
    "threads",
    "torch",
    "settings",
    "step_ratios",
    "machine",
    "finished",
    "how",
)


def spread(values: list[float]) -> dict:
    """{mean, spread (max - min), values} of `values`; {} when there are none."""
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "spread": max(values) - min(values), "values": values}


def summarise(
    ap_runs: dict[str, list[dict]], equal_runs: dict[str, list[dict]], step_ratios: dict[str, set[float]] | None = None
) -> tuple[dict, dict]:
    """The `ap` and `equal_wall_clock.variants` sections from runs by variant (each run a dict with `seed`), and
    the step ratios measured by variant (those of its runs are added; a variant with a ratio but no run yet is listed
    with every seed missing).

    Seeds missing for a variant are those that any run of either section has and it lacks. Equal-wall-clock
    runs marked `same_as_demo_steps` take AP and AP50 from the variant's run at the demo's steps with the same seed
    (missing if that run is not in `ap_runs`).
    """
    plain = {r["seed"]: r for r in ap_runs.get("plain", [])}

    def against_plain(runs: list[dict]) -> list[float | None]:
        return [r["AP"] - plain[r["seed"]]["AP"] if r["seed"] in plain else None for r in runs]

    # The seeds any run of either section has: a variant lacking one of them is missing it.
    all_seeds = sorted({r["seed"] for runs in [*ap_runs.values(), *equal_runs.values()] for r in runs})
    ap = {}
    for variant, runs in ap_runs.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        ap[variant] = {
            "runs": runs,
            "seeds": [r["seed"] for r in runs],
            "missing_seeds": [s for s in all_seeds if s not in {r["seed"] for r in runs}],
            **{key: spread([r[key] for r in runs if r.get(key) is not None]) for key in ("AP", "AP50", "train_s")},
            "minus_plain_same_seed": against_plain(runs),
        }

    demo = {(v, r["seed"]): r for v, runs in ap_runs.items() for r in runs}
    equal = {}
    step_ratios = step_ratios or {}
    for variant in dict.fromkeys([*equal_runs, *step_ratios]):
        runs = equal_runs.get(variant, [])
        runs = sorted(runs, key=lambda r: r["seed"])
        for i, r in enumerate(runs):
            source = demo.get((variant, r["seed"])) if r.get("same_as_demo_steps") else None
            if source is not None:
                runs[i] = {**r, "AP": source["AP"], "AP50": source["AP50"], "steps": source["steps"]}
        # A run kept at the demo's steps whose run there is not measured yet has no AP: its seed is missing.
        resolved = [r for r in runs if r.get("AP") is not None]
        equal[variant] = {
            "step_ratios": sorted({r["step_ratio"] for r in runs} | step_ratios.get(variant, set())),
            "runs": runs,
            "seeds": [r["seed"] for r in resolved],
            "missing_seeds": [s for s in all_seeds if s not in {r["seed"] for r in resolved}],
            "AP": spread([r["AP"] for r in resolved]),
            "AP50": spread([r["AP50"] for r in resolved]),
            "minus_plain_same_seed": against_plain(resolved),
        }
    return ap, equal


def _check_same(name: str, key: str, value: object, first: dict[str, tuple[str, object]]) -> None:
    """Refuse `value` of `key` in input `name` unless it is what the first input holding `key` had (kept in `first`)."""
    if value is None:
        return
    first_name, first_value = first.setdefault(key, (name, value))
    if first_value != value:
        raise ValueError(
            f"{name}: its {key} {json.dumps(value)} differs from {first_name}'s {json.dumps(first_value)}; "
            "runs of different settings are not comparable: merge only reports measured alike"
        )


def merge(reports: list[tuple[str, dict]]) -> dict:
    """One report from `(name, report)` pairs (invocations of boosters.py or earlier merges), by variant and seed.

    A variant and seed measured twice must agree (the runs are deterministic per seed at a given thread count): the
    first is kept and names the others under `reproduced_by`; disagreeing runs are refused, as are inputs trained
    with other threads, variant switches or demo settings, or runs at the demo's steps of different lengths.
    """
    if not reports:
        raise ValueError("nothing to merge: name the JSON files of boosters.py invocations")
    invocations: list[dict] = []
    ap_runs: dict[str, list[dict]] = {}
    equal_runs: dict[str, list[dict]] = {}
    step_ratios: dict[str, set[float]] = {}
    first: dict[str, tuple[str, object]] = {}
    for name, report in reports:
        if "ap" not in report and "equal_wall_clock" not in report:
            raise ValueError(f"{name}: no `ap` or `equal_wall_clock` section: not a report of boosters.py")
        for key in ("threads", "variants", "demo_overrides"):
            _check_same(name, key, report.get(key), first)
        # An earlier merge brings its invocations; its runs' indexes shift by the invocations already kept.
        own = report.get("invocations") or [{"source": name, **{k: report[k] for k in INVOCATION_KEYS if k in report}}]
        offset = len(invocations)
        invocations.extend(own)
        for variant, ratio in report.get("step_ratios", {}).items():  # an invocation's measured ratios
            step_ratios.setdefault(variant, set()).add(ratio["ratio"])
        for variant, section in report.get("equal_wall_clock", {}).get("variants", {}).items():  # a merge's
            step_ratios.setdefault(variant, set()).update(section.get("step_ratios", []))
        sections = [(ap_runs, {v: s["runs"] for v, s in report.get("ap", {}).items()})]
        sections.append(
            (equal_runs, {v: s["runs"] for v, s in report.get("equal_wall_clock", {}).get("variants", {}).items()})
        )
        for into, by_variant in sections:
            for variant, runs in by_variant.items():
                for run in runs:
                    run = {**run, "invocation": run.get("invocation", 0) + offset}
                    if "reproduced_by" in run:
                        run["reproduced_by"] = [i + offset for i in run["reproduced_by"]]
                    _add(into.setdefault(variant, []), run, name, variant, invocations)
    steps = {r["steps"] for runs in ap_runs.values() for r in runs}
    if len(steps) > 1:
        raise ValueError(f"runs at the demo's steps trained {sorted(steps)} steps: merge only runs of equal length")
    ap, equal = summarise(ap_runs, equal_runs, step_ratios)
    return {
        "benchmark": "boosters: AP of each switch and of all three against plain on the demo's data",
        "how": f"`benchmarks/boosters.py --merge` of {len(invocations)} invocations (`invocations`; each run names "
        "its own by index), by variant and seed",
        "threads": first.get("threads", (None, None))[1],
        "variants": first.get("variants", (None, None))[1],
        "demo_overrides": first.get("demo_overrides", (None, None))[1],
        "invocations": invocations,
        "ap": ap,
        "equal_wall_clock": {"how": EQUAL_HOW, "variants": equal},
    }


EQUAL_HOW = (
    "plain's budget: the demo's steps; each variant trains the demo's steps x (plain's step s / its step s), the step "
    "ratio measured in its invocation by alternating training steps (forward, criterion, backward) of plain and the "
    "variant on one batch of the demo's shape (median of the pairs' ratios); a variant within the noise of plain "
    "(ratio <= threshold) keeps its result at the demo's steps (same_as_demo_steps). Plain's result is its result "
    "at the demo's steps (ap.plain)."
)


def _add(runs: list[dict], run: dict, name: str, variant: str, invocations: list[dict]) -> None:
    """Add `run` to `runs` unless its seed is there; a duplicate must agree and is noted on the kept run."""
    for kept in runs:
        if kept["seed"] != run["seed"]:
            continue
        source = invocations[kept["invocation"]].get("source")
        if kept.get("step_ratio") != run.get("step_ratio"):
            raise ValueError(
                f"{name}: {variant} seed {run['seed']} at equal wall-clock has step ratio {run['step_ratio']:.3f}, "
                f"invocation {source} {kept['step_ratio']:.3f}: their budgets differ; merge one of them"
            )
        # A run kept at the demo's steps carries that run's AP once resolved, or none yet: its flag is what counts.
        if not run.get("same_as_demo_steps") and kept.get("AP") != run.get("AP"):
            raise ValueError(
                f"{name}: {variant} seed {run['seed']} gives AP {run.get('AP')} where invocation {source} gave "
                f"{kept.get('AP')}: the runs should be deterministic per seed; find what changed (commit, threads) "
                "before merging them"
            )
        kept["reproduced_by"] = [*kept.get("reproduced_by", []), run["invocation"]]
        return
    runs.append(run)


def merge_files(paths: list[Path]) -> dict:
    """`merge` of the JSON files at `paths` (each named by its path in errors and under `invocations`)."""
    reports = []
    for path in paths:
        try:
            reports.append((str(path), json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read it as JSON ({e}); name the JSON files boosters.py wrote") from e
    return merge(reports)
