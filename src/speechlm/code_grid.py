"""Code-grid embeddings: the codec's codes share what their FSQ digits share, while the SpeechLM trains.

The quickstart codec's 1000 codes are the points of a grid of FSQ levels ([8, 5, 5, 5]): code c is the
mixed-radix number of its digits, one per latent dimension, and codes that agree on a digit agree on that
dimension of the latent the decoder hears. A plain embedding row per code learns none of that: each of the
1000 rows (input and, tied, output) learns alone from the frames where its code occurs.

With a code grid the code rows of the (tied) embedding are trained as

    E[offset + c] = R[c] + sum_i T_i[digit_i(c)]

where T_i holds one vector per level of digit i (23 vectors for [8, 5, 5, 5]) and R is the model's own
embedding row. Every frame then trains the tables of its four digits, which the other codes sharing them
use too; in the tied output layer the tables make a code's logit the sum of its digits' logits plus its own,
so the model learns each digit's distribution from all frames before it can tell the 1000 codes apart.

It is a reparametrization for training only (torch.nn.utils.parametrize on the embedding and the tied output
layer): `fold_code_grid` writes R + sum T into the embedding rows and removes it, so every saved model is a
stock LlamaForCausalLM with the same outputs (TRL, PEFT, the MAX exporter and the server see no difference).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import LlamaForCausalLM

from voxlm.codec.model import FSQ


class CodeGrid(nn.Module):
    """weight -> weight with the code block's rows plus the sums of their digits' table rows."""

    def __init__(self, levels: Sequence[int], code_offset: int, hidden_size: int, init_std: float) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        fsq = FSQ(levels)  # the codec's own mixed radix: which digit of each level a code has
        self.codebook_size, self.code_offset = fsq.codebook_size, int(code_offset)
        digits = fsq.digits(torch.arange(self.codebook_size))
        first_row = torch.tensor([0, *itertools.accumulate(levels[:-1])])  # digit i's rows start here
        self.register_buffer("table_rows", digits + first_row, persistent=False)  # [codes, digits]
        self.table = nn.Parameter(torch.randn(sum(levels), hidden_size) * init_std)

    def forward(self, weight: Tensor) -> Tensor:
        start, end = self.code_offset, self.code_offset + self.codebook_size
        grid = self.table[self.table_rows].sum(dim=1).to(weight.dtype)
        return torch.cat([weight[:start], weight[start:end] + grid, weight[end:]])


def add_code_grid(model: LlamaForCausalLM, levels: Sequence[int], code_offset: int, codebook_size: int,
                  init_std: float) -> CodeGrid:
    """Train model's code rows (input embedding and, tied, output layer) through a CodeGrid.

    levels: the codec's FSQ levels, whose product must be the code block's size; init_std: the tables'
    initial scale (0 leaves the model's outputs unchanged, e.g. when fine-tuning a folded model).
    """
    if math.prod(int(level) for level in levels) != codebook_size:
        raise ValueError(f"code_grid levels {list(levels)} make {math.prod(levels)} codes but the vocabulary "
                         f"holds {codebook_size}: set speechlm.model.code_grid to the codec's FSQ levels "
                         "(codec.model.levels), or null to turn the code grid off")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is not embed.weight:
        raise ValueError("the code grid needs tied input and output embeddings "
                         "(speechlm.model.tie_word_embeddings=true), or set speechlm.model.code_grid=null")
    grid = CodeGrid(levels, code_offset, embed.weight.shape[1], init_std).to(embed.weight.device)
    # One CodeGrid on both modules: they share the original weight and the tables, so they stay tied.
    parametrize.register_parametrization(embed, "weight", grid)
    parametrize.register_parametrization(head, "weight", grid)
    return grid


def has_code_grid(model: LlamaForCausalLM) -> bool:
    """Whether the model's embedding trains through a code grid (not yet folded)."""
    return parametrize.is_parametrized(model.get_input_embeddings(), "weight")


@torch.no_grad()
def fold_code_grid(model: LlamaForCausalLM) -> None:
    """Write the grid into the embedding rows and remove it: a plain tied LlamaForCausalLM remains."""
    if not has_code_grid(model):
        return
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    # The head first, without its value: the two share the original tensor, which folding the embedding
    # then overwrites with original + grid for both (folding both would add the grid twice).
    parametrize.remove_parametrizations(head, "weight", leave_parametrized=False)
    parametrize.remove_parametrizations(embed, "weight", leave_parametrized=True)
    head.weight = embed.weight
