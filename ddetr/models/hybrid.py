"""Hybrid matching (H-DETR, Jia et al., CVPR 2023): a one-to-many branch that exists only while training.

Beside the N queries of the model (matched one-to-one, as in DETR), T extra queries go through the same decoder
and heads and are matched to the ground truth repeated K times, so that several queries learn each object. The
extra queries are

    two-stage           the next T encoder proposals after the N the model keeps (as many as the maps hold);
                        with mixed query selection their content queries are T extra learned rows;
    otherwise           T extra learned query embeddings;

and the two groups are masked from each other in the decoder's self-attention, so the one-to-one outputs do not
depend on the one-to-many queries at all. At evaluation (`model.eval()`), export and serving only the N exist: the
deployed graph is the plain model's, and the checkpoint's shipped weights (`shipped_state_dict`) leave out the extra
rows, which live under one prefix (`TRAINING_ONLY_PREFIX`) so that the training state keeps them for a resume.
"""

from __future__ import annotations

import torch
from torch import nn

# Parameters the deployed model does not have: the one-to-many branch's learned queries.
TRAINING_ONLY_PREFIX = "one_to_many."


class OneToManyQueries(nn.Module):
    """The T learned queries of the one-to-many group, kept apart from the model's own `query_embed`.

    Args:
        num_queries: T.
        width: 2 * d_model (positional + content, single-stage) or d_model (content, mixed query selection).
    """

    def __init__(self, num_queries: int, width: int) -> None:
        super().__init__()
        self.query_embed = nn.Embedding(num_queries, width)  # default init N(0, 1), as the model's own queries


def group_attention_mask(num_one_to_one: int, num_one_to_many: int, device: torch.device) -> torch.Tensor:
    """The decoder self-attention mask of the two groups: (Q, Q) bool, True where a query may not attend.

    Queries 0..N-1 (one-to-one) see only each other, queries N..N+T-1 (one-to-many) only each other: without it
    the one-to-one outputs would depend on the queries that are gone at evaluation.
    """
    group = torch.arange(num_one_to_one + num_one_to_many, device=device) >= num_one_to_one  # (Q,) True: one-to-many
    return group[:, None] != group[None, :]


def repeat_targets(targets: list[dict], repeat: int) -> list[dict]:
    """The one-to-many targets: each image's boxes and labels repeated `repeat` (K) times, in order.

    Args:
        targets: B dicts with "labels" (T_b,) and "boxes" (T_b, 4); other keys are kept as they are.

    Returns:
        B dicts with "labels" (K * T_b,) and "boxes" (K * T_b, 4): row j is ground-truth row j mod T_b.
    """
    if repeat < 1:
        raise ValueError(f"the one-to-many branch repeats the targets at least once, got repeat={repeat}")
    return [{**t, "labels": t["labels"].repeat(repeat), "boxes": t["boxes"].repeat(repeat, 1)} for t in targets]


def is_training_only(key: str) -> bool:
    """Whether a state-dict key belongs to the training-only branch (absent from the deployed model)."""
    return key.startswith(TRAINING_ONLY_PREFIX)
