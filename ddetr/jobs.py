"""Submit ddetr training, evaluation, prediction and sweeps to a Ray cluster as Ray Jobs, follow, list, stop them.

This module only builds two things, the job's entrypoint (a `ddetr` command line, `job_entrypoints.py`) and its
runtime environment (the checkout as the working directory), and hands them to Ray's `JobSubmissionClient`:

    ddetr submit train --preset tiny --data s3://bucket/coco-shards train.name=tiny-a train.epochs=2 --follow
    ddetr submit train --config runs/tune/SWEEP/best_config.json train.epochs=50     a sweep's best config
    ddetr submit train --config exp.yaml --data s3://bucket/coco --resume s3://bucket/runs/RUN/latest
    ddetr submit eval --checkpoint s3://bucket/runs/tiny/checkpoint_00000009 --data s3://bucket/coco-shards
    ddetr submit predict --checkpoint s3://bucket/runs/tiny/checkpoint_00000009 --shards s3://b/val --out s3://b/p
    ddetr submit predict --checkpoint s3://bucket/runs/tiny --out s3://b/p s3://b/cameras/ 'photos/**/*.jpg'
    ddetr submit tune --preset deformable_detr --data s3://bucket/coco-shards --max-concurrent 4
    ddetr submit run --entrypoint "ddetr data synth --out /tmp/synth" --follow
    ddetr submit --list                   ddetr submit --follow JOB_ID          ddetr submit --stop JOB_ID
    ddetr submit logs JOB_ID              ddetr submit status JOB_ID

(`python jobs/submit.py ...` is the same command line.) On an autoscaling cluster that has no worker node yet, a
job asking for resources no node has waits in PENDING while the autoscaler adds one; `eval` and `predict` ask for
`--gpus` (default 1) for their driver, so they run on a GPU node and not on the CPU head: give `--gpus 0` on a
cluster without GPUs.

A local `--config` file (and a sweep's local `--space` file) travels inside the entrypoint, whatever the working
directory holds: its text is written to a temporary file on the node that runs the job (`job_entrypoints.py`).
A `--resume` checkpoint, like `--data`, must be where the cluster can read it (s3://, gs://, shared storage).

The cluster is expected to have ddetr and its dependencies installed and the op prebuilt (`ddetr op build`):
the setup commands of `cluster/*.yaml` and the image of `cluster/kuberay/` do both. The working directory is
put first on the job's PYTHONPATH, so the job runs the code of this checkout without reinstalling it; only a
change of dependencies needs new nodes (or `--pip PACKAGE` for a one-off extra).

The dashboard address comes from `--address`, else $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265 (the
local end of `ray dashboard cluster/aws.yaml`). A cluster with token authentication (the default of a Ray
head started by hand) gets the token from $RAY_AUTH_TOKEN, the file named by $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, in that order; it is sent whatever $RAY_AUTH_MODE says, because Ray's client only reads
those places when RAY_AUTH_MODE=token is set, and a cluster without authentication ignores it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ddetr.job_entrypoints import (  # noqa: F401 - the entrypoint builders are part of this module's interface
    EntrypointError,
    eval_entrypoint,
    predict_entrypoint,
    shown,
    train_entrypoint,
    tune_entrypoint,
)
from ddetr.sweep.options import add_arguments as add_tune_arguments
from ddetr.sweep.options import to_argv

if TYPE_CHECKING:  # Ray is imported when a command talks to a cluster: `ddetr --help` stays fast
    from ray.job_submission import JobStatus, JobSubmissionClient


def _checkout() -> Path | None:
    """The source checkout this module runs from, or None when ddetr is installed from a wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "ddetr").is_dir() else None


REPO_ROOT = _checkout()  # shipped as the job's working_dir; None: the job runs the ddetr installed on the cluster
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUBMITTING = ("train", "eval", "predict", "tune", "run")  # the commands that submit a job

# Kept out of the uploaded working directory (gitignore syntax, relative to the repository root): environments,
# datasets, run outputs and build artefacts. Ray also honours .gitignore; these hold when it is missing.
WORKING_DIR_EXCLUDES = [
    "/.git/",
    "/.venv/",
    "/data/",
    "/runs/",
    "/build/",
    "/benchmarks/results/",
    "*.egg-info/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.so",
    "*.o",
]

TOKEN_HELP = (
    "Copy the cluster's token (run `ray get-auth-token` on the head node) into ~/.ray/auth_token, "
    "or set RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file holding it>."
)


class SubmitError(RuntimeError):
    """A problem the user can fix (unreachable dashboard, missing token); printed without a traceback."""


# ---- where the job runs -------------------------------------------------------------------------------------


def runtime_env(
    working_dir: Path | None = REPO_ROOT, env_vars: Mapping[str, str] | None = None, pip: Sequence[str] = ()
) -> dict[str, Any]:
    """The job's runtime environment: this checkout as working_dir (minus WORKING_DIR_EXCLUDES), env vars, pip.

    `working_dir=None` ships nothing and runs the code installed on the cluster.
    """
    env: dict[str, Any] = {}
    if working_dir is not None:
        env["working_dir"] = str(working_dir)
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    if pip:
        env["pip"] = list(pip)
    return env


# ---- talking to the cluster ----------------------------------------------------------------------------------


def find_token() -> tuple[str, str] | None:
    """The Ray auth token of this machine and where it was found, or None.

    Looks where Ray does: $RAY_AUTH_TOKEN, then the file named by $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token.
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    candidates = [Path(os.environ["RAY_AUTH_TOKEN_PATH"])] if os.environ.get("RAY_AUTH_TOKEN_PATH") else []
    candidates.append(Path.home() / ".ray" / "auth_token")
    for path in candidates:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip(), str(path)
    return None


def connect(address: str, token: str | None = None) -> JobSubmissionClient:
    """A client for the Ray dashboard at `address`, authenticated with `token` (default: `find_token()`).

    Raises SubmitError saying what to do when the dashboard cannot be reached or refuses the token.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    source = "the token given"
    if token is None:
        found = find_token()
        token, source = found if found else (None, "")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        problem = f"rejected the token from {source}" if token else "needs a token and none was found"
        raise SubmitError(f"The Ray cluster at {address} uses token authentication and {problem}. {TOKEN_HELP}") from e
    except ConnectionError as e:
        raise SubmitError(
            f"Cannot reach the Ray dashboard at {address} ({e}). Is the cluster up? For a cluster started with "
            "`ray up cluster/aws.yaml`, keep `ray dashboard cluster/aws.yaml` running and use " + DEFAULT_ADDRESS
        ) from e


def submit(
    client: JobSubmissionClient,
    entrypoint: str,
    env: dict[str, Any],
    job_id: str | None = None,
    agent_wait_s: float = 60.0,
    num_cpus: float = 0,
    num_gpus: float = 0,
) -> str:
    """Submit `entrypoint` with runtime environment `env`; returns the job id.

    `num_cpus` / `num_gpus` reserve resources for the entrypoint itself (its driver): a job asking for a GPU runs
    on a GPU node, which an autoscaling cluster adds first. A head that has just started answers "No available
    agent to submit job" until its job agent is up: that answer is retried for up to `agent_wait_s` seconds.
    """
    deadline = time.monotonic() + agent_wait_s
    resources = {k: v for k, v in {"entrypoint_num_cpus": num_cpus, "entrypoint_num_gpus": num_gpus}.items() if v}
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=job_id, **resources)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def wait(client: JobSubmissionClient, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> JobStatus:
    """Poll until the job reaches a terminal status (SUCCEEDED, FAILED, STOPPED) and return it.

    Raises TimeoutError if it is still running after `timeout_s` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {status.value} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return status


def follow(client: JobSubmissionClient, job_id: str, out: TextIO | None = None) -> JobStatus:
    """Stream the job's logs to `out` (default: stdout) until it finishes; returns its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    # The log stream closes when the job ends; the status can lag it by a moment.
    return wait(client, job_id, timeout_s=60.0)


def list_jobs(client: JobSubmissionClient, out: TextIO | None = None) -> list[Any]:
    """Print one line per job of the cluster, newest first: id, status, start time, entrypoint; returns the jobs."""
    out = out or sys.stdout
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        out.write(f"{job.submission_id or job.job_id}  {job.status.value:<9}  {started}  {shown(job.entrypoint)}\n")
    return jobs


def stop(client: JobSubmissionClient, job_id: str, timeout_s: float = 60.0) -> JobStatus:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL) and wait until it has ended; returns its final status."""
    client.stop_job(job_id)
    return wait(client, job_id, timeout_s=timeout_s)


# ---- command line --------------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The `ddetr submit` command line as a parser of its own (`python jobs/submit.py`)."""
    return add_arguments(argparse.ArgumentParser(prog="ddetr submit", description=__doc__.split("\n\n")[0]))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `ddetr submit`: train, eval, predict, tune, run (submit a job); logs, status, stop (manage
    one); the flags --list, --follow JOB_ID, --stop JOB_ID."""
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
        help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS or %(default)s)",
    )
    manage = parser.add_mutually_exclusive_group()
    manage.add_argument("--list", action="store_true", help="list the cluster's jobs, newest first")
    manage.add_argument("--follow", dest="follow_job", metavar="JOB_ID", help="stream a job's logs until it ends")
    manage.add_argument("--stop", dest="stop_job", metavar="JOB_ID", help="stop a job and wait until it has ended")
    commands = parser.add_subparsers(dest="command")

    def submitting(name: str, help: str, gpus: float = 0) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        p.add_argument(
            "--gpus", type=float, default=gpus, help="GPUs reserved for the job's driver (default: %(default)g)"
        )
        p.add_argument("--cpus", type=float, default=0, help="CPUs reserved for the job's driver (default: 0)")
        p.add_argument(
            "--follow", action="store_true", help="stream the logs until the job ends; exit 1 unless it succeeded"
        )
        p.add_argument("--job-id", help="submission id (default: generated by Ray)")
        p.add_argument(
            "--env",
            action="append",
            type=_key_value,
            default=[],
            metavar="KEY=VALUE",
            help="environment variable for the job (repeatable)",
        )
        p.add_argument("--pip", action="append", default=[], metavar="PACKAGE", help="extra pip package (repeatable)")
        p.add_argument("--no-working-dir", action="store_true", help="run the code installed on the cluster")
        return p

    p = submitting("train", "train a model: ddetr train --preset ... | --config ... [--data ...]")
    p.add_argument(
        "--preset", help="named config, e.g. tiny, deformable_detr, box_refine, two_stage (default: the config file's)"
    )
    p.add_argument(
        "--config",
        help="a YAML or JSON config file, e.g. a sweep's best_config.json; a local file is sent with the job",
    )
    p.add_argument(
        "--data", help="dataset directory or URI of COCO shards (s3://, gs://); may come from --config instead"
    )
    p.add_argument("--resume", help="checkpoint or run folder to start from, where the cluster can read it")
    p.add_argument(
        "--storage",
        default=os.environ.get("DDETR_STORAGE"),
        help="checkpoint storage URI, sets train.storage_path (default: $DDETR_STORAGE)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=50")
    p = submitting("eval", "evaluate a checkpoint: ddetr eval --checkpoint ... --data ...", gpus=1)
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint or a run folder (its best; RUN/latest), path or URI"
    )
    p.add_argument("--data", required=True, help="dataset directory or URI of COCO shards")
    p = submitting(
        "predict", "batch inference: ddetr predict --checkpoint ... --out ... IMAGES... | --shards ...", gpus=1
    )
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint or a run folder (its best; RUN/latest), path or URI"
    )
    p.add_argument("--shards", "--data", dest="shards", default=None,
                   help="shards to detect objects in: a split, or a dataset folder (its val)")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder or URI (on the cluster)")
    p.add_argument("--actors", type=int, default=None, help="largest actor pool (default: from the node types)")
    p.add_argument("--threshold", type=float, default=None, help="lowest score drawn (default: ddetr predict's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: ddetr predict's)")
    p.add_argument("--draw", type=int, default=None, help="images drawn (default: ddetr predict's)")
    p.add_argument("images", nargs="*", help="image files, folders, quoted globs ('a/**/*.jpg'), s3:// prefixes, "
                   "where the cluster can read them; detected by an actor pool (ddetr predict --batch)")  # fmt: skip
    add_tune_arguments(submitting("tune", "a sweep: ddetr tune --data ... --space ... (its driver runs on the head)"))
    p = submitting("run", "run any command on the cluster (a sweep, a benchmark)")
    p.add_argument("--entrypoint", required=True, help='shell command, e.g. "ddetr data synth --out /tmp/synth"')

    for name, help in [("logs", "print a job's logs"), ("status", "print a job's status"), ("stop", "stop a job")]:
        p = commands.add_parser(name, help=help)
        p.add_argument("job_id")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    return parser


def entrypoint_for(args: argparse.Namespace) -> str:
    """The entrypoint of a parsed `train`, `eval`, `predict`, `tune` or `run` command line.

    Raises:
        SubmitError: `train` without --preset or --config, or without --data when no --config may hold it; a local
            file that cannot travel with the job.
    """
    try:
        return _entrypoint(args)
    except EntrypointError as e:
        raise SubmitError(f"ddetr submit {args.command}: {e}") from None


def _entrypoint(args: argparse.Namespace) -> str:
    if args.command == "train":
        if not (args.preset or args.config):
            raise SubmitError(
                "ddetr submit train: give --preset NAME or --config FILE (e.g. a sweep's best_config.json)"
            )
        if not (args.data or args.config):
            raise SubmitError("ddetr submit train: give --data (a dataset folder or URI the cluster can read)")
        return train_entrypoint(
            args.preset, args.data, args.overrides, args.storage, config=args.config, resume=args.resume
        )
    if args.command == "eval":
        return eval_entrypoint(args.checkpoint, args.data)
    if args.command == "predict":
        options = [f"--{flag.replace('_', '-')}={value}" for flag in ("threshold", "batch_size", "draw")
                   if (value := getattr(args, flag)) is not None]  # fmt: skip
        return predict_entrypoint(
            args.checkpoint, args.shards, args.out, args.actors, images=args.images, options=options
        )
    if args.command == "tune":
        return tune_entrypoint(to_argv(args))
    return args.entrypoint


def _submit(client: JobSubmissionClient, args: argparse.Namespace, entrypoint: str) -> str:
    env = runtime_env(None if args.no_working_dir else REPO_ROOT, dict(args.env), args.pip)
    job_id = submit(client, entrypoint, env, args.job_id, num_cpus=args.cpus, num_gpus=args.gpus)
    print(f"submitted {job_id}: {shown(entrypoint)}", file=sys.stderr)
    return job_id


def _follow(client: JobSubmissionClient, job_id: str) -> int:
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} keeps running (ddetr submit --stop {job_id})", file=sys.stderr)
        return 130
    message = client.get_job_info(job_id).message
    print(f"{job_id}: {status.value}" + (f" ({message})" if message else ""), file=sys.stderr)
    return 0 if status.value == "SUCCEEDED" else 1


def _run(args: argparse.Namespace) -> int:
    # Before connecting: a mistake in the command line is told without a cluster.
    entrypoint = entrypoint_for(args) if args.command in SUBMITTING else ""
    client = connect(args.address)
    if args.list:
        list_jobs(client)
        return 0
    if args.follow_job:
        return _follow(client, args.follow_job)
    if args.stop_job:
        print(f"{args.stop_job}: {stop(client, args.stop_job).value}")
        return 0
    if args.command in SUBMITTING:
        job_id = _submit(client, args, entrypoint)
        if args.follow:
            return _follow(client, job_id)
        print(
            f"follow: ddetr submit --follow {job_id}    stop: ddetr submit --stop {job_id}",
            file=sys.stderr,
        )
        print(job_id)
        return 0
    if args.command == "stop":
        print(f"{args.job_id}: {stop(client, args.job_id).value}")
        return 0
    if args.command == "status":
        status = client.get_job_status(args.job_id)
        print(f"{args.job_id}: {status.value}")
        return 1 if status.value in ("FAILED", "STOPPED") else 0
    if args.follow:  # logs
        return _follow(client, args.job_id)
    print(client.get_job_logs(args.job_id), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, act, return the exit code (0: done or succeeded; 1: the job failed or was stopped)."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Act on parsed `ddetr submit` arguments; returns the exit code as `main` does."""
    if args.command not in ("train", "eval", "predict", "tune", "run", "logs", "status", "stop"):
        args.command = None  # `ddetr submit --list`: the command line's own command is "submit"
    if not (args.command or args.list or args.follow_job or args.stop_job):
        print("error: give a command (train, eval, predict, tune, run, logs, status, stop) or --list, --follow JOB_ID,"
              " --stop JOB_ID", file=sys.stderr)  # fmt: skip
        return 2
    try:
        return _run(args)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
