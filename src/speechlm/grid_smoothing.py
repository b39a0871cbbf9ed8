"""Grid-smoothed code targets: a code label teaches its neighbours on the codec's FSQ grid too.

With a one-hot target every wrong code costs the same, so the model is never taught that a near miss on the
grid (a code whose latent, which is what the decoder hears, is one level away) is better than a code across
the grid. Given the recording's history the quickstart model's best code is the recording's on 14% of frames,
and speech made of its picks is unintelligible (docs/benchmarks.md, "How many of the model's own picks the
speech tolerates"): its mass is spread over codes that sound far apart, and decoding the expected latent in
place of a sampled code read much better teacher forced (seventeenth session). Here training does what that
decoding did: for a code label y the target is

    (1 - weight) * onehot(y) + weight * softmax_c(-|latent(c) - latent(y)|^2 / (2 sigma^2))

over the code block, where latent() is the FSQ point the codec's decoder reads (each dimension in [-1, 1]).
It is label smoothing whose mass goes to the codes that sound like the label, not to all codes alike
(Szegedy et al. 2016's smoothing, with the distance-aware prior of ordinal classification). Text, control
tokens and speech end keep one-hot targets. Training only: the model, its outputs and validation loss are
the plain next-token ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from voxlm.codec.model import FSQ
from voxlm.speechlm.sequences import IGNORE
from voxlm.speechlm.tokenizer import in_code_block


def grid_targets(levels: Sequence[int], sigma: float) -> Tensor:
    """[codes, codes] float: row y is the Gaussian neighbourhood of code y on the FSQ grid (rows sum to 1)."""
    if sigma <= 0:
        raise ValueError(f"grid smoothing sigma={sigma}: it must be > 0 (a distance between FSQ latents, "
                         "each dimension in [-1, 1]; one level of an 8-level digit is 0.25 apart)")
    latents = FSQ([int(level) for level in levels]).codebook()
    squared = torch.cdist(latents, latents).pow(2)
    return torch.softmax(-squared / (2 * sigma * sigma), dim=-1)


def check_levels(levels: Sequence[int], codebook_size: int) -> None:
    """Refuse FSQ levels that do not make the vocabulary's code block."""
    if math.prod(int(level) for level in levels) != codebook_size:
        raise ValueError(f"grid smoothing levels {list(levels)} make {math.prod(levels)} codes but the "
                         f"vocabulary holds {codebook_size}: pass the codec's FSQ levels "
                         "(codec.model.levels)")


def grid_smoothed_loss(logits: Tensor, labels: Tensor, targets: Tensor, code_offset: int,
                       weight: float) -> Tensor:
    """Mean next-token loss over the labelled positions, code labels smoothed over the grid.

    logits: [B, T, V] for positions 0..T-1 (not yet shifted); labels: [B, T] with IGNORE where no loss (the
    label of position t is predicted at t - 1, as in transformers' causal-LM loss); targets: `grid_targets`.
    With weight 0 this is exactly the model's own next-token loss.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    labelled = labels != IGNORE
    log_probs = F.log_softmax(logits[labelled], dim=-1)  # [N, V]
    label_ids = labels[labelled]
    hard = -log_probs.gather(1, label_ids.unsqueeze(1)).squeeze(1)
    if weight == 0:
        return hard.mean()
    codebook_size = targets.shape[0]
    is_code = in_code_block(label_ids, code_offset, codebook_size)
    code_log_probs = log_probs[is_code, code_offset: code_offset + codebook_size]
    soft = -(targets[label_ids[is_code] - code_offset] * code_log_probs).sum(dim=-1)
    per_token = hard.clone()
    per_token[is_code] = (1 - weight) * hard[is_code] + weight * soft
    return per_token.mean()
