"""The deformable transformer: the encoder (deformable_encoder.py), the decoder (deformable_decoder.py), two-stage
proposals.

Module and parameter names follow the official release (`transformer.encoder.layers.i.self_attn...`,
`transformer.decoder.layers.i.cross_attn...`) so its checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ddetr.models import box_ops
from ddetr.models.deformable_decoder import (
    DeformableTransformerDecoder,
    DeformableTransformerDecoderLayer,
)
from ddetr.models.deformable_encoder import DeformableTransformerEncoder, DeformableTransformerEncoderLayer
from ddetr.models.hybrid import group_attention_mask
from ddetr.ops import MSDeformAttn

if TYPE_CHECKING:
    from ddetr.config import ModelConfig


def distinct_proposals(scores: torch.Tensor, coords_unact: torch.Tensor, k: int, iou_threshold: float) -> torch.Tensor:
    """Indices of k proposals chosen by greedy non-maximum suppression instead of the plain top-k.

    The best-scoring proposal is kept, those overlapping it by more than `iou_threshold` are set aside, and so on
    over the 4k best; if fewer than k survive, the best set-aside ones fill the rest. An object covered by many
    high-scoring pixels then gives the decoder one query rather than several near-identical ones (the official code
    keeps the plain top-k).

    Args:
        scores: (B, S) objectness logits, -inf where a proposal is invalid; coords_unact: (B, S, 4) cxcywh logits.

    Returns:
        (B, k) indices into S, in the order chosen.
    """
    B, S = scores.shape
    pool_scores, pool = torch.topk(scores, min(S, 4 * k), dim=1)  # sorted: a lower pool index scores higher
    boxes = box_ops.box_cxcywh_to_xyxy(torch.gather(coords_unact, 1, pool[..., None].expand(-1, -1, 4)).sigmoid())
    iou = box_ops.box_iou(boxes, boxes)[0]  # (B, N, N)
    taken = torch.zeros_like(pool_scores, dtype=torch.bool)
    suppressed = torch.isinf(pool_scores)  # invalid proposals only fill in
    rows = torch.arange(B, device=scores.device)
    chosen = []
    for _ in range(k):
        free = ~taken & ~suppressed
        first = torch.where(free.any(1), free.byte().argmax(1), (~taken).byte().argmax(1))  # first max: best score
        chosen.append(first)
        taken[rows, first] = True
        suppressed = suppressed | (iou[rows, first] > iou_threshold)
    return torch.gather(pool, 1, torch.stack(chosen, 1))


class DeformableTransformer(nn.Module):
    """Encoder + decoder over flattened multi-level maps, with the query and two-stage machinery.

    Args (keyword-only, named as in `ModelConfig`):
        d_model, nheads, enc_layers, dec_layers, dim_feedforward, dropout: the usual sizes.
        num_feature_levels: L, the number of maps given to forward.
        dec_n_points, enc_n_points: sampling points per head and level.
        two_stage: take the queries from the top-scoring encoder proposals instead of learned embeddings.
        num_queries: the decoder's queries; in two-stage mode, the encoder proposals kept.
        proposal_nms: two-stage only: keep proposals whose IoU with a better-scoring kept one is at most this
            (greedy, class-agnostic, over the 4 * num_queries best); 0 keeps the plain top-k (the paper's).
        mixed_query_selection: two-stage only: the positional queries come from the proposals, the content
            queries are learned embeddings given to forward (DINO's mixed query selection), not from the proposals.
        msda_backend: backend of every MSDeformAttn (None: environment's choice).
        checkpoint_encoder: activation checkpointing of the encoder layers.
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        num_queries: int = 300,
        proposal_nms: float = 0.0,
        mixed_query_selection: bool = False,
        msda_backend: str | None = None,
        checkpoint_encoder: bool = False,
    ) -> None:
        super().__init__()
        if mixed_query_selection and not two_stage:
            raise ValueError("mixed query selection mixes learned content queries into two-stage: it needs two_stage")
        self.d_model, self.nheads = d_model, nheads
        self.two_stage, self.num_queries, self.proposal_nms = two_stage, num_queries, proposal_nms
        self.mixed_query_selection = mixed_query_selection
        sizes = {"d_model": d_model, "dim_feedforward": dim_feedforward, "dropout": dropout, "nheads": nheads}
        enc_layer = DeformableTransformerEncoderLayer(
            **sizes, num_feature_levels=num_feature_levels, n_points=enc_n_points, msda_backend=msda_backend
        )
        self.encoder = DeformableTransformerEncoder(enc_layer, enc_layers, checkpoint_encoder)
        dec_layer = DeformableTransformerDecoderLayer(
            **sizes, num_feature_levels=num_feature_levels, n_points=dec_n_points, msda_backend=msda_backend
        )
        self.decoder = DeformableTransformerDecoder(dec_layer, dec_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            # Proposal box (4 coords x d_model/2 sine features) -> positional + content query.
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """mask (B, H, W) -> (B, 2) valid fraction (w, h) of the map."""
        _, H, W = mask.shape
        valid_H = (~mask[:, :, 0]).sum(1)
        valid_W = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)

    def get_proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """proposals (B, Q, 4) unnormalised logits -> (B, Q, 2 * d_model) sine embedding of the sigmoid box."""
        num_pos_feats, temperature, scale = self.d_model // 2, 10000, 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid()[:, :, :, None] * scale / dim_t  # (B, Q, 4, F)
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(
        self, memory: torch.Tensor, memory_padding_mask: torch.Tensor, level_shapes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One proposal box per encoder pixel: centred on it, of side 0.05 * 2^level of the valid image.

        Args:
            memory: (B, S, D); memory_padding_mask: (B, S); level_shapes: (H, W) per level, as numbers.

        Returns:
            output_memory (B, S, D): the memory through `enc_output`, zeroed first at padding and at proposals
            too close to the border (outside (0.01, 0.99));
            output_proposals (B, S, 4): proposal boxes as logits (inverse sigmoid), +inf where invalid.
        """
        B = memory.shape[0]
        proposals, start = [], 0
        for lvl, (H, W) in enumerate(level_shapes):
            mask = memory_padding_mask[:, start : start + H * W].view(B, H, W)
            valid_H = (~mask[:, :, 0]).sum(1)
            valid_W = (~mask[:, 0, :]).sum(1)
            # arange equals linspace(0, H - 1, H) exactly, and takes a symbolic H (torch.export).
            grid_y, grid_x = torch.meshgrid(
                torch.arange(H, dtype=torch.float32, device=memory.device),
                torch.arange(W, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)  # (H, W, 2)
            scale = torch.stack([valid_W, valid_H], 1).view(B, 1, 1, 2)
            grid = (grid[None].expand(B, -1, -1, -1) + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * (2.0**lvl))
            proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
            start += H * W
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        invalid = memory_padding_mask[..., None] | ~valid
        output_proposals = output_proposals.masked_fill(invalid, float("inf"))
        output_memory = memory.masked_fill(invalid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    def forward(
        self,
        srcs: list[torch.Tensor],
        masks: list[torch.Tensor],
        pos_embeds: list[torch.Tensor],
        query_embed: torch.Tensor | None = None,
        num_one_to_many: int = 0,
    ) -> tuple[torch.Tensor, ...]:
        """
        Args:
            srcs: L maps (B, D, H_l, W_l); masks: L masks (B, H_l, W_l) True at padding;
            pos_embeds: L position encodings (B, D, H_l, W_l).
            query_embed: (Q, 2 * D) learned positional + content queries; None in two-stage mode; (Q', D) learned
                content queries in two-stage mode with mixed query selection (Q' >= the queries decoded).
            num_one_to_many: T, the last queries that form hybrid matching's one-to-many group (0: none), masked
                from the others in self-attention. Two-stage takes them from the proposals after the first
                num_queries, as many as the maps hold beyond those; single-stage from the last T rows of query_embed.

        Returns:
            hs (n_dec, B, Q, D); init_reference (B, Q, 2) or (B, Q, 4) in two-stage; inter_references
            (n_dec, B, Q, 2 or 4); enc_outputs_class (B, S, K) and enc_outputs_coord_unact (B, S, 4) in
            two-stage mode, else None and None. Q = num_queries + the one-to-many queries decoded.
        """
        if (not self.two_stage or self.mixed_query_selection) and query_embed is None:
            raise ValueError("DeformableTransformer: query_embed is required unless two_stage (without mixed queries)")
        src_flatten, mask_flatten, lvl_pos_embed_flatten, shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds, strict=True)):
            shapes.append(src.shape[-2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))  # (B, H*W, D)
            mask_flatten.append(mask.flatten(1))
            lvl_pos_embed_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)  # (B, S, D)
        mask_flatten = torch.cat(mask_flatten, 1)  # (B, S)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        # (L, 2) made of scalar tensors rather than as_tensor(shapes), which torch.export would fix to this image size.
        spatial_shapes = torch.stack(
            [
                torch.stack([torch.scalar_tensor(n, dtype=torch.long, device=src_flatten.device) for n in hw])
                for hw in shapes
            ]
        )
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)  # (B, L, 2)

        level_shapes = [(H, W) for H, W in shapes]  # numbers from the maps' shapes: symbolic under torch.export
        memory = self.encoder(
            src_flatten,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            lvl_pos_embed_flatten,
            mask_flatten,
            level_shapes,
        )

        B, S, D = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            assert self.decoder.class_embed is not None and self.decoder.bbox_embed is not None
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, level_shapes)
            # The extra (last) heads score every pixel's proposal: first stage of the two-stage variant.
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)  # (B, S, K)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            k = self.num_queries
            if k > S:
                raise ValueError(
                    f"two-stage keeps {k} proposals but the feature maps have only {S} positions; "
                    "use larger images or fewer model.num_queries"
                )
            # Rank padded and border (invalid) proposals last. The official code ranks them by the constant score
            # of their zeroed memory, so padding could change which proposals an image gets; trained models
            # score them low, so released checkpoints give the same detections.
            scores = enc_outputs_class[..., 0].masked_fill(torch.isinf(output_proposals).any(-1), float("-inf"))
            if num_one_to_many:  # the one-to-many group: the best proposals after the first k, as many as there are
                num_one_to_many = min(num_one_to_many, S - k)
            if self.proposal_nms > 0:
                topk_proposals = distinct_proposals(scores, enc_outputs_coord_unact.detach(), k, self.proposal_nms)
                if num_one_to_many:
                    ranked = torch.topk(scores, k + num_one_to_many, dim=1)[1]
                    topk_proposals = torch.cat([topk_proposals, ranked[:, k:]], 1)
            else:
                topk_proposals = torch.topk(scores, k + num_one_to_many, dim=1)[1]  # (B, Q)
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_proposals[..., None].expand(-1, -1, 4))
            topk_coords_unact = topk_coords_unact.detach()  # proposals are inputs of the second stage, not outputs
            reference_points = topk_coords_unact.sigmoid()  # (B, Q, 4)
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans_out, D, dim=2)
            if self.mixed_query_selection:
                # Where to look comes from the proposals, what to look for is learned: DINO's mixed selection.
                tgt = query_embed[: k + num_one_to_many][None].expand(B, -1, -1)  # (B, Q, D)
        else:
            query_pos, tgt = torch.split(query_embed, D, dim=1)
            query_pos = query_pos[None].expand(B, -1, -1)  # (B, Q, D)
            tgt = tgt[None].expand(B, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        init_reference = reference_points
        self_attn_mask = None
        if num_one_to_many:  # hybrid matching: the two groups do not see each other
            self_attn_mask = group_attention_mask(tgt.shape[1] - num_one_to_many, num_one_to_many, tgt.device)

        hs, inter_references = self.decoder(
            tgt,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos,
            mask_flatten,
            self_attn_mask,
        )
        return hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact


def build_deformable_transformer(m: ModelConfig) -> DeformableTransformer:
    """The transformer of a model config."""
    return DeformableTransformer(
        d_model=m.d_model,
        nheads=m.nheads,
        enc_layers=m.enc_layers,
        dec_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward,
        dropout=m.dropout,
        num_feature_levels=m.num_feature_levels,
        dec_n_points=m.dec_n_points,
        enc_n_points=m.enc_n_points,
        two_stage=m.two_stage,
        num_queries=m.num_queries,
        proposal_nms=m.proposal_nms,
        mixed_query_selection=m.mixed_query_selection,
        msda_backend=m.msda_backend,
        checkpoint_encoder=m.checkpoint_encoder,
    )
