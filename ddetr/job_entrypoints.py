"""What a Ray Job runs: the `ddetr` command line of `ddetr submit train|eval|predict|tune`, as one shell command.

A local file that the command names (`--config FILE`, a sweep's `--space FILE`) travels inside the entrypoint: its
text is written to a fresh temporary folder on the node that runs the job's driver, under its own name, and the
command reads it from there:

    f1=$(mktemp -d) && printf '%s' '{"model": ...}' > "$f1"/best.json && ddetr train --config "$f1"/best.json

so a config works wherever it lies (a sweep's best_config.json under runs/, which the job's working directory
leaves out; a file outside the checkout; a job run with --no-working-dir) and the job's record holds the exact text
it ran. The folder stays in the node's temporary directory (a few KiB per job). URIs (s3://, gs://) are passed as
they are: the cluster reads them. Ray runs an entrypoint with /bin/sh, so only POSIX shell is used.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from ddetr import io

# Flags whose value is a file the command reads: a local one is inlined.
FILE_FLAGS = ("--config", "--space")
# Ray hands the entrypoint to `sh -c` as one argument, which Linux caps at 128 KiB: room for a config many times over.
INLINE_LIMIT = 64 * 1024
SHOWN_CHARS = 200  # of an entrypoint printed on one line (`--list`, "submitted ...")


class EntrypointError(ValueError):
    """A file named on the command line cannot travel with the job (missing, unreadable, too large)."""


def command(args: Sequence[str], file_flags: Sequence[str] = FILE_FLAGS) -> str:
    """`args` as one shell command, the local file after each of `file_flags` inlined (see the module's doc).

    Raises:
        EntrypointError: such a file is missing, not UTF-8 text, or larger than INLINE_LIMIT bytes in all.
    """
    prelude, words, inlined = [], [], 0
    args = list(args)
    for i, arg in enumerate(args):
        after_flag = i > 0 and args[i - 1] in file_flags
        if not after_flag or io.is_uri(arg):
            words.append(shlex.quote(arg))
            continue
        path = Path(arg).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EntrypointError(f"{args[i - 1]} {arg}: no such file (a local file travels with the job)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise EntrypointError(f"{args[i - 1]} {arg}: cannot read it to send with the job: {e}") from None
        inlined += len(text.encode())
        if inlined > INLINE_LIMIT:
            raise EntrypointError(
                f"{args[i - 1]} {arg}: the files sent with the job exceed {INLINE_LIMIT // 1024} KiB; put the file "
                "in object storage and give its s3:// or gs:// URI"
            )
        folder = f"f{len(prelude) + 1}"
        # The file's own name: a JSON config is read as JSON by its suffix, and a space's stem names the sweep.
        where = f'"${folder}"/{shlex.quote(path.name)}'
        prelude.append(f"{folder}=$(mktemp -d) && printf '%s' {shlex.quote(text)} > {where}")
        words.append(where)
    return " && ".join([*prelude, " ".join(words)])


def shown(entrypoint: str, width: int = SHOWN_CHARS) -> str:
    """An entrypoint on one short line: the command itself, without the text of the files it carries."""
    if entrypoint.startswith("f1=$(mktemp -d) && "):
        entrypoint = entrypoint.rsplit(" && ", 1)[-1]
    entrypoint = " ".join(entrypoint.split())
    return entrypoint if len(entrypoint) <= width else entrypoint[: width - 3] + "..."


def train_entrypoint(
    preset: str | None,
    data: str | None,
    overrides: Sequence[str] = (),
    storage: str | None = None,
    *,
    config: str | None = None,
    resume: str | None = None,
) -> str:
    """`ddetr train [--preset P] [--config FILE] [--data D] [--resume CKPT] [train.storage_path=S] [OVERRIDES]`.

    `config` is a YAML or JSON config file (a sweep's best_config.json): a local one is inlined (`command`).
    `storage` (an s3:// or gs:// URI) is where checkpoints go; overrides given later win over it. `resume` is a
    checkpoint or run folder the cluster can read.
    """
    args = ["ddetr", "train"]
    for flag, value in (("--preset", preset), ("--config", config), ("--data", data), ("--resume", resume)):
        if value:
            args += [flag, value]
    if storage:
        args.append(f"train.storage_path={storage}")
    return command([*args, *overrides])


def eval_entrypoint(checkpoint: str, data: str) -> str:
    """`ddetr eval --checkpoint CHECKPOINT --data DATA`, shell-quoted."""
    return command(["ddetr", "eval", "--checkpoint", checkpoint, "--data", data])


def predict_entrypoint(
    checkpoint: str,
    shards: str | None,
    out: str,
    actors: int | None = None,
    *,
    images: Sequence[str] = (),
    options: Sequence[str] = (),
) -> str:
    """`ddetr predict --checkpoint CHECKPOINT --out OUT` over `shards` (`--shards SHARDS`) or over `images` (files,
    folders, globs, s3:// prefixes, given to `--batch`: a Ray Data actor pool, the cluster's way), then `--actors N`
    and `options` (`--threshold 0.3`, ...), shell-quoted: a glob reaches the cluster's ddetr unexpanded.

    Raises:
        EntrypointError: both or neither of `images` and `shards`.
    """
    if bool(images) == bool(shards):
        raise EntrypointError(
            "give the images (files, folders, quoted globs, s3:// prefixes the cluster can read) or --shards DIR, "
            + ("not both" if images else "one of them")
        )
    args = ["ddetr", "predict", "--checkpoint", checkpoint, "--out", out]
    args += ["--shards", shards] if shards else ["--batch"]
    args += ["--actors", str(actors)] if actors else []
    return command([*args, *options, *images])


def tune_entrypoint(args: Sequence[str]) -> str:
    """`ddetr tune ARGS...`: the sweep's driver runs as the job's entrypoint, on the head; a local --space file is
    inlined. Without --space the cluster's ddetr uses its packaged default space."""
    return command(["ddetr", "tune", *args])
