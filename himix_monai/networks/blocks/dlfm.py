"""Dynamic Layer Fusion Module (DLFM) of HiMix (paper Sec. 3.2, Eq. 1; supplement Sec. 5-6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = [
    "LAYER_GROUPINGS",
    "layer_groups",
    "interleaved_layer_groups",
    "layer_proxy_statistics",
    "cluster_layer_groups",
    "DynamicLayerFusion",
]

LAYER_GROUPINGS = ("sequential", "mean", "interleaved", "clustering", "last", "all")


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


def layer_proxy_statistics(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-layer proxy statistics of a text encoder (supplement Sec. 6, "Clustering"): for every layer, the mean
    and the variance over all real tokens of all reports of its token embeddings, concatenated.

    Args:
        hidden_states: ``N + 1`` tensors ``(B, L, C)``, the embedding output followed by each layer.
        attention_mask: ``(B, L)``, 1 for real tokens.

    Returns:
        ``(N, 2 C)`` float32, one row per layer (the embedding output is left out: it is not a layer).
    """
    keep = attention_mask.bool().reshape(-1)
    if not bool(keep.any()):
        raise ValueError("no real token in the reports: the layer statistics need at least one report.")
    rows = []
    for layer in hidden_states[1:]:
        tokens = layer.reshape(-1, layer.shape[-1])[keep].float()
        rows.append(torch.cat([tokens.mean(dim=0), tokens.var(dim=0, unbiased=False)]))
    return torch.stack(rows)


def cluster_layer_groups(
    statistics: torch.Tensor, num_groups: int, num_components: int = 4, seed: int = 0
) -> list[list[int]]:
    """Group the layers by k-means on their proxy statistics reduced with PCA (supplement Sec. 6, "Clustering").

    The statistics are standardised per feature, projected on their first ``num_components`` principal
    components, and clustered with k-means (k-means++ initialisation, Lloyd iterations, seeded; a cluster that
    runs empty takes the point farthest from its centre). The groups are ordered by their average layer index,
    lowest first, so that with the default ``group_order`` the highest group feeds the coarsest stage.

    Args:
        statistics: ``(N, F)`` per-layer statistics, e.g. from :py:func:`layer_proxy_statistics`.
        num_groups: ``M``, the number of groups (decoder stages).
        num_components: PCA components kept (at most ``N - 1`` and ``F``).
        seed: seed of the k-means initialisation.

    Returns:
        ``M`` non-empty lists of 1-based layer indices, lowest average layer index first.

    Examples::

        >>> stats = torch.cat([torch.zeros(4, 2), torch.ones(4, 2), 2 * torch.ones(4, 2)])
        >>> cluster_layer_groups(stats, 3)
        [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    """
    import numpy as np

    values = np.asarray(statistics.detach().cpu().double().numpy())
    num_layers = values.shape[0]
    layer_groups(num_layers, num_groups)  # same validity rule
    spread = values.std(axis=0)
    values = (values - values.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    components = max(1, min(int(num_components), num_layers - 1, values.shape[1]))
    _, _, vt = np.linalg.svd(values, full_matrices=False)
    points = values @ vt[:components].T
    rng = np.random.default_rng(seed)
    centres = [points[int(rng.integers(num_layers))]]
    while len(centres) < num_groups:  # k-means++
        distance = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0)
        total = distance.sum()
        pick = int(rng.choice(num_layers, p=distance / total)) if total > 0 else int(rng.integers(num_layers))
        centres.append(points[pick])
    centre_array = np.stack(centres)
    assignment = np.zeros(num_layers, dtype=int)
    for _ in range(100):
        distance = ((points[:, None, :] - centre_array[None]) ** 2).sum(axis=2)
        new = distance.argmin(axis=1)
        for k in range(num_groups):  # an empty cluster takes the point farthest from its own centre
            if not (new == k).any():
                own = distance[np.arange(num_layers), new]
                movable = [i for i in np.argsort(-own) if (new == new[i]).sum() > 1]
                new[movable[0]] = k
        centre_array = np.stack([points[new == k].mean(axis=0) for k in range(num_groups)])
        if (new == assignment).all() and _ > 0:
            break
        assignment = new
    groups = [[int(i) + 1 for i in np.flatnonzero(assignment == k)] for k in range(num_groups)]
    return sorted(groups, key=lambda g: (sum(g) / len(g), g))


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
            ``"clustering"``: groups from k-means on the layers' proxy statistics (supplement Table 2), learned
            softmax weights; the groups start sequential and are set once with :py:meth:`set_groups` (e.g. by
            :py:meth:`himix_monai.networks.HiMix.fit_layer_clusters` over the training reports). They are
            stored in the state dict (buffer ``membership``), so a trained model loads its own groups;
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
        elif grouping in ("sequential", "mean", "clustering"):
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
        # clustering: the groups are data-dependent, so every group has one logit per layer and a membership mask
        # (a buffer: saved and loaded with the weights); the softmax runs over the group's members only
        self.clustered = grouping == "clustering"
        if self.clustered:  # only then in the state dict: checkpoints of the other groupings keep their keys
            self.register_buffer("membership", torch.zeros(num_stages, num_layers, dtype=torch.bool))
            self.logits = nn.ParameterList([nn.Parameter(torch.ones(num_layers)) for _ in groups])
            self.set_groups(groups)
            self.register_load_state_dict_post_hook(DynamicLayerFusion._after_load)
        else:
            self.membership = torch.zeros(0, num_layers, dtype=torch.bool)

    @staticmethod
    def _after_load(module: nn.Module, incompatible_keys: object) -> None:
        module._groups_from_membership()

    def _groups_from_membership(self) -> None:
        if self.clustered:
            self.groups = [[int(j) + 1 for j in torch.nonzero(row).flatten()] for row in self.membership]

    def set_groups(self, groups: Sequence[Sequence[int]]) -> None:
        """Set the layer groups of the ``"clustering"`` grouping (lowest group first).

        Args:
            groups: ``M`` non-empty lists of 1-based layer indices that together hold every layer once.
        """
        if not self.clustered:
            raise ValueError(f"set_groups is for the 'clustering' grouping; this fusion groups {self.grouping!r}.")
        flat = sorted(int(j) for g in groups for j in g)
        if (
            len(groups) != self.num_stages
            or flat != list(range(1, self.num_layers + 1))
            or any(len(g) == 0 for g in groups)
        ):
            raise ValueError(
                f"groups must split the layers 1..{self.num_layers} into {self.num_stages} non-empty groups, got "
                f"{[list(g) for g in groups]}."
            )
        membership = torch.zeros_like(self.membership)
        for index, group in enumerate(groups):
            membership[index, [int(j) - 1 for j in group]] = True
        self.membership.copy_(membership)
        self._groups_from_membership()

    def group_weights(self) -> list[torch.Tensor]:
        """The mixing weights ``w_j`` of every group (lowest group first), as in supplement Fig. 2."""
        if self.clustered:
            return [torch.softmax(alpha[row], dim=0) for alpha, row in zip(self.logits, self.membership)]
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
        if self.clustered:
            stacked = torch.stack(hidden_states[1:], dim=0)  # (N, B, L, C)
            for index, alpha in enumerate(logits):
                masked = alpha.masked_fill(~self.membership[index], float("-inf"))
                weights = torch.softmax(masked, dim=0).to(stacked.dtype)
                mixed.append(torch.einsum("g,gblc->blc", weights, stacked))  # Eq. 1 over the cluster's layers
            return [mixed[g - 1] for g in self.group_order]
        for index, layers in enumerate(self.groups):
            stacked = torch.stack([hidden_states[j] for j in layers], dim=0)  # (|J_m|, B, L, C)
            if len(logits) > 0:
                weights = torch.softmax(logits[index], dim=0).to(stacked.dtype)
                mixed.append(torch.einsum("g,gblc->blc", weights, stacked))  # Eq. 1
            else:
                mixed.append(stacked.mean(dim=0))
        return [mixed[g - 1] for g in self.group_order]
