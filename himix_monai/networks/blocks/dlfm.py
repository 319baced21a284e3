"""Dynamic Layer Fusion Module (DLFM) of HiMix (paper Sec. 3.2, Eq. 1; supplement Sec. 5-6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["LAYER_GROUPINGS", "layer_groups", "interleaved_layer_groups", "DynamicLayerFusion"]

LAYER_GROUPINGS = ("sequential", "mean", "interleaved", "last", "all")


def layer_groups(num_layers: int, num_groups: int) -> list[list[int]]:
    """Split ``num_layers`` text-encoder layers into ``num_groups`` consecutive groups (paper Sec. 3.2).

    Group ``m`` (1-based) holds the layers ``J_m = [ceil(N/M * (m-1) + 1), ceil(N/M * m)]``. Integer arithmetic
    is used so that no floating point rounding can move a boundary.

    Args:
        num_layers: ``N``, the number of transformer layers (the embedding output is not a layer).
        num_groups: ``M``, the number of decoder stages.

    Returns:
        ``M`` lists of 1-based layer indices, lowest layers first.

    Raises:
        ValueError: when ``num_groups`` is not in ``[1, num_layers]``, which would leave a group empty.

    Examples::

        >>> layer_groups(12, 3)
        [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
        >>> layer_groups(10, 3)
        [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10]]
    """
    if num_layers < 1 or not 1 <= num_groups <= num_layers:
        raise ValueError(
            f"cannot split {num_layers} text-encoder layers into {num_groups} non-empty groups; "
            "use a text encoder with at least as many layers as decoder stages."
        )
    groups = []
    for m in range(1, num_groups + 1):
        first = -(-num_layers * (m - 1) // num_groups) + 1  # ceil(N (m-1) / M) + 1
        last = -(-num_layers * m // num_groups)  # ceil(N m / M)
        groups.append(list(range(first, last + 1)))
    return groups


def interleaved_layer_groups(num_layers: int, num_groups: int) -> list[list[int]]:
    """Round-robin groups with stride ``num_groups`` (supplement Sec. 6, "Interleaved").

    Examples::

        >>> interleaved_layer_groups(6, 3)
        [[1, 4], [2, 5], [3, 6]]
    """
    layer_groups(num_layers, num_groups)  # same validity rule
    return [list(range(g, num_layers + 1, num_groups)) for g in range(1, num_groups + 1)]


class DynamicLayerFusion(nn.Module):
    """Mix the per-layer hidden states of a text encoder into one text embedding per decoder stage.

    Implements Eq. 1 of HiMix, ``t_m = sum_{j in J_m} softmax(alpha_m)_j * p_j``, with learnable logits
    ``alpha_m`` initialised equal (to 1, as in the supplement), so every group starts as the plain mean of its
    layers. The group of the highest layers feeds the first (coarsest) decoder stage by default.

    Args:
        num_layers: number of transformer layers ``N`` of the text encoder (embedding output excluded).
        num_stages: number of decoder stages ``M``.
        grouping: how layers are grouped and mixed:
            ``"sequential"`` (paper): consecutive groups ``J_m``, learned softmax weights;
            ``"mean"``: the same groups, fixed equal weights (the "w/o DLFM" ablation);
            ``"interleaved"``: round-robin groups, learned softmax weights (supplement Table 2);
            ``"last"``: every stage gets the final layer only (the single-embedding ablation);
            ``"all"``: every stage gets the mean of all layers ("no grouping", supplement Table 1).
        group_order: for each decoder stage, coarsest first, the 1-based group index it receives. Defaults to
            ``(M, M-1, ..., 1)``, the paper's ``(G_3, G_2, G_1)``; any permutation reproduces supplement Table 1.

    Examples::

        >>> fusion = DynamicLayerFusion(num_layers=12, num_stages=3)
        >>> hidden = [torch.randn(2, 24, 768) for _ in range(13)]  # embeddings + 12 layers
        >>> [t.shape for t in fusion(hidden)]
        [torch.Size([2, 24, 768]), torch.Size([2, 24, 768]), torch.Size([2, 24, 768])]
    """

    def __init__(
        self,
        num_layers: int,
        num_stages: int,
        grouping: str = "sequential",
        group_order: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if grouping not in LAYER_GROUPINGS:
            raise ValueError(f"grouping must be one of {LAYER_GROUPINGS}, got {grouping!r}.")
        self.num_layers = num_layers
        self.num_stages = num_stages
        self.grouping = grouping
        if grouping == "interleaved":
            groups = interleaved_layer_groups(num_layers, num_stages)
        elif grouping in ("sequential", "mean"):
            groups = layer_groups(num_layers, num_stages)
        elif grouping == "last":
            groups = [[num_layers]] * num_stages
        else:  # all
            groups = [list(range(1, num_layers + 1))] * num_stages
        self.groups = groups
        if group_order is None:
            group_order = tuple(range(num_stages, 0, -1))
        group_order = tuple(int(g) for g in group_order)
        if sorted(group_order) != list(range(1, num_stages + 1)):
            raise ValueError(f"group_order must be a permutation of 1..{num_stages}, got {group_order}.")
        self.group_order = group_order
        # one logit vector alpha_m per group, initialised equal (supplement Sec. 3)
        learned = grouping in ("sequential", "interleaved")
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.ones(len(g))) for g in groups] if learned else []
        )

    def group_weights(self) -> list[torch.Tensor]:
        """The mixing weights ``w_j`` of every group (lowest group first), as in supplement Fig. 2."""
        if len(self.logits) > 0:
            return [torch.softmax(alpha, dim=0) for alpha in self.logits]
        return [torch.full((len(g),), 1.0 / len(g)) for g in self.groups]

    def forward(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """
        Args:
            hidden_states: ``N + 1`` tensors ``(B, L, C_P)``: the embedding output followed by each layer, as
                returned by a Hugging Face encoder with ``output_hidden_states=True``.

        Returns:
            ``M`` text embeddings ``(B, L, C_P)``, one per decoder stage, coarsest stage first.
        """
        if len(hidden_states) != self.num_layers + 1:
            raise ValueError(
                f"expected {self.num_layers + 1} hidden states (embeddings + {self.num_layers} layers), "
                f"got {len(hidden_states)}."
            )
        logits: list[torch.Tensor] = []
        for alpha in self.logits:  # iterated, not indexed: TorchScript indexes a ParameterList by constants only
            logits.append(alpha)
        mixed: list[torch.Tensor] = []
        for index, layers in enumerate(self.groups):
            stacked = torch.stack([hidden_states[j] for j in layers], dim=0)  # (|J_m|, B, L, C)
            if len(logits) > 0:
                weights = torch.softmax(logits[index], dim=0).to(stacked.dtype)
                mixed.append(torch.einsum("g,gblc->blc", weights, stacked))  # Eq. 1
            else:
                mixed.append(stacked.mean(dim=0))
        return [mixed[g - 1] for g in self.group_order]
