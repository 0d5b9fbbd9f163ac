"""Transforms: `model -> model` steps, registered by kind, composed by `Pipeline`."""

from nnxprune.transforms.base import REGISTRY, Context, Pipeline, Transform, from_dict, register
from nnxprune.transforms.sparsellm import SparseLLM
from nnxprune.transforms.sparsity import OWL, Magnitude, SparseGPT, Wanda
from nnxprune.transforms.surgery import (DropLayers, FoldMasks, RemoveKVGroups, RemoveQueryHeads,
                                         ShrinkHidden, ShrinkMLP)

__all__ = ["OWL", "REGISTRY", "Context", "DropLayers", "FoldMasks", "Magnitude", "Pipeline",
           "SparseGPT", "SparseLLM", "Wanda", "RemoveKVGroups",
           "RemoveQueryHeads", "ShrinkHidden", "ShrinkMLP", "Transform", "from_dict", "register"]
