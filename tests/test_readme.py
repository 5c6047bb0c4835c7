"""The README and the docs/ pages say what the code does: every `ddetr` command they show parses with the command
line as it is, every config key they name exists and takes the value shown, every link points at a file and a
heading that exist, and the README stays short enough to read in the order a user works."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from ddetr.cli import build_parser
from ddetr.config import PRESETS, Config, ConfigError, apply_overrides, get_preset

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# docs/config.md is generated from the code and checked against it by tests/test_config_files.py.
PAGES = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "config.md")]
PAGES += [ROOT / "jobs/README.md", ROOT / "tune/README.md", ROOT / "cluster/README.md"]
CONFIG_SECTIONS = ("model", "loss", "data", "train")

_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "yaml", "yml", "txt", "md", "png", "pt", "pth"}
# A repository path in a code span or block (`ddetr/train/resources.py`, `tune/spaces/tiny.yaml`), not part of a URI or
# of a longer path; `ddetr/_csrc` is where a wheel, not a checkout, holds the op's sources.
_PATH = re.compile(r"(?<![\w/.:~-])((?:csrc|ddetr|tests|benchmarks|tune|jobs|cluster|docs)/[\w./-]*\w)")
NOT_IN_A_CHECKOUT = {"ddetr/_csrc"}
_KEY = re.compile(rf"^(?:{'|'.join(CONFIG_SECTIONS)})\.\w+(?:=\S*)?$")


def commands(markdown: str) -> list[str]:
    """The `ddetr ...` command lines of a page's code blocks: continuation lines joined, comments cut, usage
    synopses (`[--flag VALUE]`) left out."""
    found = []
    for block in _FENCE.findall(markdown):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("ddetr ") and " [" not in line:
                found.append(line)
    return found


def shown_as(page: Path) -> str:
    return str(page.relative_to(ROOT))


def overrides_of(argv: list[str]) -> list[str]:
    return [a for a in argv if _KEY.match(a) and "=" in a]


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {heading_anchor(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail into a docs/ page"


def test_the_performance_table_is_what_the_committed_json_renders():
    """The README's numbers come from `benchmarks/results/*.json` through `benchmarks/summary.py`, never by hand."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("summary", ROOT / "benchmarks" / "summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    table = summary.render()
    assert "| Ray Data / official |" in table and "| `ddetr data convert`, images/s (one process) |" in table
    assert summary.readme_block(README.read_text()) == table, "run: python benchmarks/summary.py --write"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_parses_and_its_overrides_apply(page: Path):
    shown = commands(page.read_text())
    parser = build_parser()
    for command in shown:
        argv = shlex.split(command)[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{shown_as(page)}: `{command}` does not parse (see `ddetr {argv[0]} --help`)")
        preset = getattr(args, "preset", None)
        base = get_preset(preset if preset in PRESETS else "tiny")
        try:
            apply_overrides(base, overrides_of(argv))
        except ConfigError as err:
            pytest.fail(f"{shown_as(page)}: `{command}`: {err}")
    if page == README:
        assert len(shown) >= 20, shown  # the parser found the README's commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_key_named_exists(page: Path):
    """Keys in code spans (`train.max_nonfinite_steps`, `model.proposal_nms=IOU`): the values of commands are checked
    above; here the key itself, whatever placeholder its value is."""
    config = Config()
    for span in sorted({s for s in _SPAN.findall(page.read_text()) if _KEY.match(s)}):
        section, field = span.split("=")[0].split(".")
        if field in FILE_SUFFIXES:  # a file name (`model.safetensors`, `data.yaml`), not a key
            continue
        known = {f.name for f in dataclasses.fields(getattr(config, section))}
        assert field in known, f"{shown_as(page)} names `{span}`: {section} has no key {field!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_exists(page: Path):
    text = page.read_text()
    code = _FENCE.findall(text) + _SPAN.findall(_FENCE.sub("", text))
    named = {p for chunk in code for p in _PATH.findall(chunk)} - NOT_IN_A_CHECKOUT
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{shown_as(page)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_points_at_a_file_and_heading(page: Path):
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{shown_as(page)} links to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{shown_as(page)} links to {target}: no such heading"


def test_the_checks_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n```bash\nddetr train --presett tiny \\\n    train.epochz=2  # a comment\n```\n")
    assert commands(page.read_text()) == ["ddetr train --presett tiny train.epochz=2"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--presett", "tiny"])
    with pytest.raises(ConfigError, match="train.epochz"):
        apply_overrides(get_preset("tiny"), ["train.epochz=2"])
    assert anchors(page) == {"title"}
    assert _PATH.findall("`tune/spaces/tiny.yaml`, s3://b/tune/x, `docs/nope.md`") == [
        "tune/spaces/tiny.yaml",
        "docs/nope.md",
    ]
    assert heading_anchor("EMA: the model validated") == "ema-the-model-validated"
    assert heading_anchor("Kubernetes (KubeRay)") == "kubernetes-kuberay"


def test_the_readmes_data_check_and_config_lines_run_as_written(tmp_path, monkeypatch, capsys):
    """`ddetr data check` on the demo's data and `ddetr config ... > FILE` read back as `--config FILE`: the README's
    own lines, run in a folder laid out as `make demo` writes it (training itself: test_run_pointers.py)."""
    from ddetr.cli import main
    from ddetr.config import build_config
    from ddetr.data.synthetic import make_synthetic_coco

    make_synthetic_coco(str(tmp_path / "results" / "demo" / "synthetic"), 6, 3, seed=0, image_size=(48, 64))
    monkeypatch.chdir(tmp_path)
    lines = [c for c in commands(README.read_text()) if c.startswith(("ddetr data check results/", "ddetr config "))]
    assert len(lines) >= 2, lines
    for line in lines:
        argv = shlex.split(line)[1:]
        out = argv[argv.index(">") + 1] if ">" in argv else None
        argv = argv[: argv.index(">")] if out else argv
        capsys.readouterr()
        assert main(argv) == 0, line
        printed = capsys.readouterr().out
        if out:
            Path(out).write_text(printed)
            again = build_config(argv[argv.index("--preset") + 1], None, overrides_of(argv), name_run=False)
            assert build_config(None, None, [], out, name_run=False) == again, line
        else:
            assert "boxes/image" in printed and "rectangle" in printed, printed


# ---- the README's commands, in its order, on a fresh folder -----------------------------------------------------

# Appended to every command that trains (`ddetr train`, `ddetr demo`): the tiny preset's model (ResNet-18, d_model 64,
# 2+2 layers, nothing downloaded; `ddetr.config.tiny`) on any paper preset, whose variant flags (box refinement, two
# stage) stay; the small images and the 1-worker budget of tests/test_train_ray.py; one epoch of at most 2 steps.
TINY_TRAINING = [
    "model.backbone=resnet18", "model.d_model=64", "model.enc_layers=2", "model.dec_layers=2",
    "model.dim_feedforward=256", "model.nheads=4", "model.num_queries=10", "model.dropout=0",
    "model.pretrained_backbone=none", "data.scale=0.1", "train.epochs=1", "train.max_steps_per_epoch=2",
    "train.batch_size=2", "train.num_workers=1", "train.cpus_per_worker=0.5", "train.log_every=1",
]  # fmt: skip
# Every README command that this test does not run, by its first words, with the reason: a new command is either run
# or listed here, never skipped silently.
NOT_RUN = {
    "pip install": "installs packages: the test runs in the environment they made",
    "make test": "the test suite itself",
    "ray up": "starts a cloud cluster",
    "ddetr submit": "submits to a remote cluster (jobs: tests/test_jobs.py against a local head)",
    "ddetr train --preset box_refine --data shards/pets model.init_from=r50_": "needs the official checkpoint, a "
    "download (loading it: tests/test_weights.py)",
    "ddetr serve": "a server that runs until stopped (tests/test_serve.py)",
    "curl ": "asks the server of `ddetr serve`",
    "ddetr tune": "a sweep of 8 Ray Train trials, minutes on 2 CPUs (tests/test_tune.py runs a small one)",
    "ddetr train --config runs/tune/NAME/": "NAME is the sweep's, which is not run",
}
# `make demo` is `ddetr demo` in the Makefile; here on the tiny demo data (6 + 3 images) laid out beforehand.
INSTEAD = {"make demo": "ddetr demo --out results/demo --epochs 1"}


def shell_lines(markdown: str) -> list[str]:
    """Every command line of the page's bash blocks, in order: continuation lines joined, comments cut."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            line = line.split("#")[0].strip() if line.lstrip().startswith("#") else line.split("  #")[0].strip()
            if line:
                found.append(line)
    return found


def lay_out_users_data(root: Path) -> None:
    """What the README's commands expect to find besides the demo's data: a YOLO folder (datasets/pets), a VOC folder
    (VOCdevkit/VOC2012) and a COCO split (coco/train2017 + its annotations), tiny fixtures of tests/test_data_formats.py
    and the synthetic COCO; and the demo's synthetic data, small, where `make demo` looks for it first."""
    import shutil

    from ddetr.data.synthetic import make_synthetic_coco
    from tests.test_data_formats import make_voc, make_yolo

    make_yolo(root / "datasets" / "pets")
    make_voc(root / "VOCdevkit" / "VOC2012")
    demo = make_synthetic_coco(str(root / "results" / "demo" / "synthetic"), 6, 3, seed=0, image_size=(48, 64))
    shutil.copytree(demo.train_images, root / "coco" / "train2017")
    (root / "coco" / "annotations").mkdir(parents=True)
    shutil.copy(demo.train_annotations, root / "coco" / "annotations" / "instances_train2017.json")


@pytest.mark.slow
@pytest.mark.ray
def test_the_readmes_commands_run_in_its_order(ray_local, tmp_path, monkeypatch, capsys, hard_timeout):
    """The README from top to bottom in a fresh folder, in this process (the suite's Ray serves the Ray engine, as
    a local Ray would), each command as written plus TINY_TRAINING where it trains; each must exit 0."""
    from ddetr.cli import main

    lay_out_users_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    ran, skipped = [], []
    with hard_timeout(600):
        for line in shell_lines(README.read_text()):
            reason = next((why for start, why in NOT_RUN.items() if line.startswith(start)), None)
            if reason:
                skipped.append(line)
                continue
            line = INSTEAD.get(line, line)
            assert line.startswith("ddetr "), f"README.md: `{line}` is neither run nor in NOT_RUN with a reason"
            argv = shlex.split(line)[1:]
            out = argv[argv.index(">") + 1] if ">" in argv else None
            argv = argv[: argv.index(">")] if out else argv
            if argv[0] in ("train", "demo"):
                argv += TINY_TRAINING
            capsys.readouterr()
            code = main(argv)
            printed = capsys.readouterr()
            assert code == 0, f"README.md: `{line}` exited {code}:\n{printed.err[-3000:]}"
            if out:
                Path(out).write_text(printed.out)
            ran.append(line)
    assert len(ran) >= 15, ran
    stale = [start for start in NOT_RUN if not any(line.startswith(start) for line in skipped)]
    assert not stale, f"NOT_RUN names commands the README no longer has: {stale}"
    assert Path("preds/detections.json").exists() and Path("detector.onnx").exists()
    assert (Path("runs/pets") / "log.txt").exists()
