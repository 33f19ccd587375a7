"""The SiaSamRea objective, eq. 8: L = alpha * L_siamese + L_gt.

L_gt per task (section 3.4): cross-entropy (open-ended), summed pairwise hinge
max(0, 1 - (s_pos - s_neg)) (multiple choice; ``siamese.mc_loss: ce`` takes ClipBERT's
cross-entropy over the candidates instead), MSE (count). It covers the anchor clip or every clip
(``siamese.gt_clips``), or the clips' scores pooled per video (``pooled``, ClipBERT's multi-clip
training: logsumexp, mean or max by ``siamese.gt_pool``). L_siamese is the soft cross-entropy
between the soft label Q (eq. 5) and the anchor's prediction; for multiple choice the candidates'
scores play the role of logits (K = M); for count the clips' scalar predictions are propagated
instead of distributions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from siasam_fast.config import SiameseConfig
from siasam_fast.model import aggregate_clips, task_scores
from siasam_fast.siamese import SiameseReasoning

IGNORE = -1  # label of examples without a usable target (answers outside the vocabulary)


def _clip_weights(clip_mask: torch.Tensor, gt_clips: str) -> torch.Tensor:
    """[V, N] float weights of the clips L_gt covers."""
    if gt_clips == "anchor":
        w = torch.zeros_like(clip_mask, dtype=torch.float32)
        w[:, 0] = 1.0
        return w
    return clip_mask.float()


def gt_loss(outputs: dict, batch: dict, task: str, gt_clips: str = "anchor",
            mc_loss: str = "hinge", gt_pool: str = "logsumexp") -> torch.Tensor:
    """L_gt averaged over the covered clips of the videos that have a target (pooled: one
    pooled score per video)."""
    scores = task_scores(outputs, task).float()
    if gt_clips == "pooled":  # [V, N, ...] -> [V, 1, ...]: one "clip", the pooled scores
        scores = aggregate_clips(scores, batch["clip_mask"], gt_pool).unsqueeze(1)
        weights = torch.ones(scores.shape[:2], dtype=torch.float32, device=scores.device)
    else:
        weights = _clip_weights(batch["clip_mask"], gt_clips)
    V, N = scores.shape[:2]
    if task == "count":
        count = batch["count"].float()
        valid = count.isfinite()  # NaN: no count given (left out, as evaluation leaves it out)
        target = torch.where(valid, count, torch.zeros_like(count)).view(V, 1).expand(V, N)
        per_clip = (scores - target) ** 2
    else:
        label = (batch["label"] if task == "open" else batch["answer_index"]).long()
        valid = label != IGNORE
        safe = label.clamp_min(0).view(V, 1).expand(V, N)
        if task == "open" or mc_loss == "ce":  # over the answers, or over the candidates
            per_clip = F.cross_entropy(scores.flatten(0, 1), safe.reshape(-1), reduction="none")
            per_clip = per_clip.view(V, N)
        elif mc_loss != "hinge":
            raise ValueError(f"siamese.mc_loss={mc_loss!r}: valid values are hinge, ce")
        else:  # summed pairwise hinge between the positive and every negative candidate
            pos = scores.gather(2, safe[..., None])  # [V, N, 1]
            hinge = (1.0 - (pos - scores)).clamp_min(0)
            negatives = torch.ones_like(hinge, dtype=torch.bool).scatter(2, safe[..., None], False)
            per_clip = (hinge * negatives).sum(2)
    weights = weights * valid[:, None].float()
    return (per_clip * weights).sum() / weights.sum().clamp_min(1.0)


def siamese_term(
    outputs: dict, batch: dict, task: str, reasoning: SiameseReasoning
) -> torch.Tensor:
    """L_siamese (eq. 5 and the first term of eq. 8), averaged over videos."""
    features = outputs["features"]
    clip_mask = batch["clip_mask"]
    if task == "count":  # through the module call: ZeRO-3 gathers its partitioned theta1 / theta2
        return reasoning(features, outputs["prediction"], clip_mask=clip_mask, count=True)
    return reasoning(features, task_scores(outputs, task), clip_mask=clip_mask, reduction="mean")


def total_loss(outputs: dict, batch: dict, task: str, cfg: SiameseConfig,
               reasoning: SiameseReasoning,
               alpha: float | None = None) -> tuple[torch.Tensor, dict]:
    """L = alpha * L_siamese + L_gt (eq. 8); returns the loss and its parts as floats.

    ``alpha``: this step's weight when it differs from ``cfg.alpha`` (``siamese.alpha_warmup``
    ramps it up: :func:`alpha_at`); the siamese term is still computed at 0, so every step uses
    the same parameters."""
    l_gt = gt_loss(outputs, batch, task, cfg.gt_clips, cfg.mc_loss, cfg.gt_pool)
    parts = {"loss_gt": l_gt.detach()}
    loss = l_gt
    num_clips = batch["clip_mask"].shape[1]
    if cfg.alpha > 0 and num_clips > 1:
        l_siamese = siamese_term(outputs, batch, task, reasoning)
        loss = loss + (cfg.alpha if alpha is None else alpha) * l_siamese
        parts["loss_siamese"] = l_siamese.detach()
    parts["loss"] = loss.detach()
    return loss, parts


def alpha_at(cfg: SiameseConfig, step: int, total_steps: int) -> float:
    """The siamese term's weight at optimizer step ``step`` (0-based) of ``total_steps``:
    ``siamese.alpha``, ramped linearly from 0 over the first ``siamese.alpha_warmup`` of the
    steps when that is set (step 0 trains on L_gt alone)."""
    warmup = cfg.alpha_warmup * total_steps
    if warmup <= 0 or step >= warmup:
        return cfg.alpha
    return cfg.alpha * step / warmup
