"""The dependency graph: coupled groups from channel spaces, and soft / hard edits on them."""

from nnxprune.graph.groups import KINDS, Group, Member, find_group, groups, iter_groups
from nnxprune.graph.surgery import (check_keep, compact, drop_layers, fold_masks, mask_group, mask_weights,
                                    node_at, take)

__all__ = ["KINDS", "Group", "Member", "check_keep", "compact", "drop_layers", "find_group", "fold_masks",
           "groups", "iter_groups", "mask_group", "mask_weights", "node_at", "take"]
