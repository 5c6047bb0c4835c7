"""Key numbers out of the GPU checks' outputs, for summary.json (benchmarks/gpu_check.py): cheap, and never fatal.

Each reader takes a file or text a step left and returns a small dict: test outcomes from pytest's junit XML (or
from its -v lines when it was killed before writing one), chosen numeric leaves of a benchmark's JSON, and per
kernel registers, achieved occupancy and time from Nsight Compute's raw CSV. Standard library only.
"""

from __future__ import annotations

import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path


def test_counts(xml: Path | None, output: str) -> dict:
    """passed/failed/errors/skipped and the failing test ids: from the junit XML, else from pytest -v's lines."""
    outcome: dict[str, str] = {}
    if xml is not None and xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            tags = {child.tag for child in case}
            test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            kind = next((k for k in ("failure", "error", "skipped") if k in tags), "passed")
            outcome[test_id] = {"failure": "failed", "error": "errors"}.get(kind, kind)
    else:  # "tests/x.py::t PASSED [ 1%]", or with xdist "[gw0] [ 1%] PASSED tests/x.py::t"
        words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
        for m in re.finditer(
            r"(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)|(PASSED|FAILED|ERROR|SKIPPED) (\S+::\S+)", output
        ):
            outcome[m[1] or m[4]] = words[m[2] or m[3]]
    counts: dict = {k: sum(v == k for v in outcome.values()) for k in ("passed", "failed", "errors", "skipped")}
    counts["failing"] = sorted(t for t, v in outcome.items() if v in ("failed", "errors"))[:50]
    return counts


def json_numbers(path: Path, words: tuple[str, ...], limit: int = 40) -> dict:
    """The numeric leaves of a JSON file whose key path holds one of `words` ("a.b.c": value), at most `limit`."""
    found: dict[str, float] = {}

    def walk(node: object, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, int | float) and not isinstance(node, bool) and any(w in key.lower() for w in words):
            if len(found) < limit:
                found[key] = node

    walk(json.loads(path.read_text()), "")
    return found


def ncu_numbers(path: Path) -> dict:
    """Per profiled kernel: its name (short), registers, achieved occupancy (%) and time (ns), from ncu's raw CSV."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if not line.startswith("==")]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))[1:]  # the first row holds the units
    keep = (
        "launch__registers_per_thread",
        "sm__warps_active.avg.pct_of_peak_sustained_active",
        "gpu__time_duration.sum",
    )
    kernels = []
    for row in rows:
        name = re.sub(r"\(.*", "", row.get("Kernel Name", "?"))[-80:]
        kernels.append({"kernel": name, **{k: row[k] for k in keep if k in row}})
    return {"kernels": kernels}
