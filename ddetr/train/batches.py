"""The training batches of one epoch as `fit` takes them: watched for stalls, grouped into optimizer steps, and
exactly as many steps on every rank as the epoch's plan says, whatever the data holds.

An image that fails to decode is replaced in its batch by the pipeline (`data/decode.py`, flagged as a stand-in);
when a rank's batches still run out early (a whole read item undecodable), its last step's batches are repeated
and counted as stand-ins too; a rank with no batch at all, or one whose batches stop coming for `data.watchdog_s`,
ends the run on every rank with a DataError agreed in one collective per step, so no rank is ever left waiting in a
collective the others never reach.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from queue import Empty, Queue

import torch

from ddetr.data.shards import DataError
from ddetr.train.engine import world_sum


class DataStallError(DataError):
    """No batch arrived within `data.watchdog_s`; the message names the likely cause and what to change."""


def stall_message(what: str, timeout_s: float) -> str:
    """DataStallError's message: no `what` batch ("training", "validation") for `timeout_s`, and why it may be."""
    return (
        f"no {what} batch for {timeout_s:g} s (data.watchdog_s). The likely cause: the data tasks get no "
        "CPU, because the training workers hold them (train.num_workers x train.cpus_per_worker + "
        "data.map_cpus above the cluster's CPUs): lower train.cpus_per_worker (0 derives it) or "
        "data.map_cpus, or add nodes. On slow storage, raise data.watchdog_s"
    )


def in_step(
    stalled: bool, values: list[float], what: str, timeout_s: float, device: torch.device, where: str = ""
) -> list[float]:
    """One all-reduce on every rank of whether its `what` batches stalled (its watchdog fired, `watched`) and of
    `values`: returns [ranks, *their sums]. When any rank stalled, every rank raises the same DataStallError instead:
    a stalled rank that raised alone would leave the others waiting in their next collective until its timeout.

    `where` begins the message ("epoch 3, step 17 of the epoch: ").
    """
    stalls, ranks, *sums = world_sum([float(stalled), 1.0, *values], device)
    if stalls:
        ranks_said = f"{int(stalls)} of {int(ranks)} ranks: " if ranks > 1 else ""
        raise DataStallError(f"{where}{ranks_said}{stall_message(what, timeout_s)}")
    return [ranks, *sums]


def watched(batches: Iterable[dict], timeout_s: float, what: str = "training") -> Iterator[dict]:
    """`batches`, pulled by a helper thread, raising DataStallError when none comes within `timeout_s`; `what`
    names the batches in its message ("training", "validation").

    The iterator is created here, in the caller's thread, so that what it draws from the generators (a
    DataLoader draws its workers' seeds) stays in the same order as without the watchdog.
    """
    iterator = iter(batches)
    if timeout_s <= 0:
        yield from iterator
        return
    done = object()
    queue: Queue = Queue(maxsize=2)

    def pull() -> None:
        try:
            for batch in iterator:
                queue.put((batch, None))
            queue.put((done, None))
        except BaseException as err:  # handed to the consumer, which raises it
            queue.put((done, err))

    threading.Thread(target=pull, name="ddetr-batches", daemon=True).start()
    while True:
        try:
            batch, err = queue.get(timeout=timeout_s)
        except Empty:
            raise DataStallError(stall_message(what, timeout_s)) from None
        if err is not None:
            raise err
        if batch is done:
            return
        yield batch


def step_groups(batches: Iterable[dict], accum: int, steps_left: int) -> Iterator[tuple[list[dict], float, int]]:
    """(micro-batches of one optimizer step, seconds spent waiting for them, images among them that stand in for
    others), `steps_left` times once a first batch came (none: nothing).

    When the batches run out early, the last step's micro-batches are given again, all their images counted as
    stand-ins: the planned number of steps is kept.
    """
    iterator = iter(batches)
    last: list[dict] | None = None
    for _ in range(max(0, steps_left)):
        tick = time.perf_counter()
        group = list(itertools.islice(iterator, accum))
        if group:
            substituted = sum(int(b.get("substituted", 0)) for b in group)
        elif last is None:
            return
        else:
            group, substituted = last, sum(len(b["targets"]) for b in last)
        last = group
        yield group, time.perf_counter() - tick, substituted


def planned_groups(
    batches: Iterable[dict], accum: int, steps_left: int, epoch: int, device: torch.device, watchdog_s: float = 0.0
) -> Iterator[tuple[list[dict], float, int]]:
    """`step_groups` of `batches` under the watchdog (`watched`, `watchdog_s`), every rank in step.

    Before each step, one all-reduce on every rank says whether any rank's watchdog fired, and before the first,
    whether every rank has a first batch. The same number of steps on every rank: the planned one, or fewer with a
    DataError (a DataStallError) raised on every rank at the same collective. With the watchdog off
    (`watchdog_s` <= 0) no rank can stall: only the first step's all-reduce is left.
    """
    groups = step_groups(watched(batches, watchdog_s), accum, steps_left)
    for n in range(max(0, steps_left)):
        try:
            group, stalled = next(groups, None), False
        except DataStallError:
            group, stalled = None, True
        if n == 0 or watchdog_s > 0:
            where = f"epoch {epoch}, step {n + 1} of the epoch: "
            ranks, with_data = in_step(stalled, [float(group is not None)], "training", watchdog_s, device, where)
            if n == 0 and with_data < ranks:
                which = "no rank" if with_data == 0 else f"{int(ranks - with_data)} of {int(ranks)} ranks"
                raise DataError(
                    f"epoch {epoch}: {which} got a single image that decodes (each failed image is named in a "
                    "warning above): check the shards' image bytes, e.g. by reading them with "
                    "`ddetr.data.shards.read_shard`"
                )
        if group is None:  # not reached: after a first batch, step_groups gives every planned step
            return
        yield group
