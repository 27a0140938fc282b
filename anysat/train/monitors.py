"""Collapse monitors: is a representation still spread over many directions?

A JEPA's loss can fall because the representation collapses (every input -> the same
vector); these numbers tell, on the batches of training and on a fixed probe set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import AnySat


def embedding_std(z: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised embeddings [N, D]: 0 when collapsed,
    about 1/sqrt(D) when spread evenly (the SimSiam monitor)."""
    return float(F.normalize(z.detach().float(), dim=-1).std(dim=0).mean())


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of
    the embeddings [N, D]; near 1 when collapsed, up to min(N, D) when spread."""
    s = torch.linalg.svdvals(z.detach().float())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(z: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007) of the centred embeddings [N, D]: how many
    directions the variation between inputs uses (RankMe less the shared mean vector, which
    dominates RankMe when every embedding carries the same large constant)."""
    c = z.detach().float()
    return rankme(c - c.mean(dim=0))


@torch.no_grad()
def collapse_monitors(model: AnySat, batch: dict[str, torch.Tensor], patch_size_m: float
                      ) -> dict[str, float]:
    """The three monitors on the patch embeddings of a fixed probe batch, before the output
    standardisation (which would blow a collapsed encoder's tiny differences back up)."""
    z = model.forward_features(batch, patch_size_m)[3].flatten(0, 1)
    return {"std": embedding_std(z), "rankme": rankme(z), "effective_rank": effective_rank(z)}
