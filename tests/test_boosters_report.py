"""`benchmarks/boosters_report.py`: invocations of the boosters benchmark merge by variant and seed, a variant within
the noise of plain's step takes its demo-step result at equal wall-clock, and what cannot be compared is refused."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_report_module():
    spec = importlib.util.spec_from_file_location("boosters_report", ROOT / "benchmarks" / "boosters_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = load_report_module()


def run(seed: int, ap: float, steps: int = 600) -> dict:
    return {"seed": seed, "AP": ap, "AP50": ap + 0.3, "steps": steps, "train_s": 100.0 + seed}


def invocation(commit: str, ap: dict[str, list[dict]], equal: dict[str, list[dict]] | None = None, **extra) -> dict:
    """An invocation's report as boosters.py writes it (its sections summarised the way it does)."""
    ratios = {v: {"ratio": runs[0]["step_ratio"]} for v, runs in (equal or {}).items()}
    ap_section, equal_section = report.summarise(ap, equal or {}, {v: {r["ratio"]} for v, r in ratios.items()})
    out = {"commit": commit, "load_average": [1.0, 2.0, 3.0], "threads": 2, "variants": {"plain": []}, "ap": ap_section}
    if equal:
        out |= {"step_ratios": ratios, "equal_wall_clock": {"variants": equal_section}}
    return out | extra


def test_runs_merge_by_variant_and_seed_keeping_each_invocations_commit():
    a = invocation("aaa", {"plain": [run(0, 0.40), run(1, 0.44)], "hybrid": [run(0, 0.38)]})
    b = invocation("bbb", {"hybrid": [run(1, 0.46)], "plain": [run(2, 0.42)]})
    merged = report.merge([("a.json", a), ("b.json", b)])

    assert [i["commit"] for i in merged["invocations"]] == ["aaa", "bbb"]
    assert [i["source"] for i in merged["invocations"]] == ["a.json", "b.json"]
    plain, hybrid = merged["ap"]["plain"], merged["ap"]["hybrid"]
    assert plain["seeds"] == [0, 1, 2] and [r["invocation"] for r in plain["runs"]] == [0, 0, 1]
    assert plain["AP"]["mean"] == pytest.approx(0.42) and plain["AP"]["spread"] == pytest.approx(0.04)
    assert hybrid["seeds"] == [0, 1] and hybrid["missing_seeds"] == [2]
    assert hybrid["minus_plain_same_seed"] == pytest.approx([-0.02, 0.02])
    assert [r["invocation"] for r in hybrid["runs"]] == [0, 1]


def test_a_merge_of_merges_keeps_the_invocation_of_every_run():
    a = invocation("aaa", {"plain": [run(0, 0.40)]})
    b = invocation("bbb", {"plain": [run(1, 0.44)]})
    c = invocation("ccc", {"plain": [run(2, 0.42)]})
    merged = report.merge([("ab.json", report.merge([("a.json", a), ("b.json", b)])), ("c.json", c)])

    assert [i["commit"] for i in merged["invocations"]] == ["aaa", "bbb", "ccc"]
    assert [merged["invocations"][r["invocation"]]["commit"] for r in merged["ap"]["plain"]["runs"]] == [
        "aaa",
        "bbb",
        "ccc",
    ]


def test_a_run_measured_twice_must_agree():
    a = invocation("aaa", {"plain": [run(0, 0.40)]})
    again = invocation("bbb", {"plain": [run(0, 0.40)]})
    merged = report.merge([("a.json", a), ("again.json", again)])
    assert merged["ap"]["plain"]["runs"][0]["reproduced_by"] == [1]
    assert merged["ap"]["plain"]["AP"]["values"] == [0.40]

    other = invocation("ccc", {"plain": [run(0, 0.41)]})
    with pytest.raises(ValueError, match=r"other.json: plain seed 0 gives AP 0.41 where invocation a.json gave 0.4"):
        report.merge([("a.json", a), ("other.json", other)])


def test_equal_wall_clock_takes_the_demo_step_result_of_a_variant_as_fast_as_plain():
    demo = invocation("aaa", {"plain": [run(0, 0.40), run(1, 0.44)], "lft": [run(0, 0.41)]})
    equal = invocation(
        "bbb",
        {},
        {
            "lft": [{"seed": s, "step_ratio": 1.01, "same_as_demo_steps": True} for s in (0, 1)],
            "hybrid": [{**run(0, 0.37, steps=582), "step_ratio": 1.032}],
        },
    )
    merged = report.merge([("demo.json", demo), ("equal.json", equal)])["equal_wall_clock"]["variants"]

    lft = merged["lft"]
    assert lft["runs"][0]["AP"] == 0.41 and lft["runs"][0]["steps"] == 600  # filled in from the demo-step run
    assert lft["seeds"] == [0] and lft["missing_seeds"] == [1]  # lft's seed 1 at the demo's steps is not measured
    assert merged["hybrid"]["step_ratios"] == [1.032] and merged["hybrid"]["AP"]["values"] == [0.37]
    assert merged["hybrid"]["minus_plain_same_seed"] == pytest.approx([-0.03])


def test_reports_measured_otherwise_are_refused():
    a = invocation("aaa", {"plain": [run(0, 0.40)]})
    with pytest.raises(ValueError, match=r"b.json: its threads 1 differs from a.json's 2"):
        report.merge([("a.json", a), ("b.json", invocation("bbb", {"plain": [run(1, 0.4)]}, threads=1))])
    with pytest.raises(ValueError, match=r"trained \[400, 600\] steps"):
        report.merge([("a.json", a), ("b.json", invocation("bbb", {"plain": [run(1, 0.4, steps=400)]}))])
    with pytest.raises(ValueError, match=r"c.json: no `ap` or `equal_wall_clock` section"):
        report.merge([("a.json", a), ("c.json", {"cost": {}})])
