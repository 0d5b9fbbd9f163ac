"""Transforms: `model -> model` steps, registered by kind, composed by `Pipeline`."""

from nnxprune.transforms.base import REGISTRY, Context, Pipeline, Transform, from_dict, register
from nnxprune.transforms.coupled import LLMPruner  # noqa: F401  (registers llm_pruner)
from nnxprune.transforms.magnitude import Magnitude
from nnxprune.transforms.owl import OWL
from nnxprune.transforms.sparsegpt import SparseGPT
from nnxprune.transforms.sparsellm import SparseLLM
from nnxprune.transforms.surgery import (DropLayers, FoldMasks, RemoveKVGroups, RemoveQueryHeads,
                                         ShrinkHidden, ShrinkMLP)
from nnxprune.transforms.wanda import Wanda

__all__ = ["OWL", "REGISTRY", "Context", "DropLayers", "FoldMasks", "Magnitude", "Pipeline",
           "SparseGPT", "SparseLLM", "Wanda", "RemoveKVGroups",
           "RemoveQueryHeads", "ShrinkHidden", "ShrinkMLP", "Transform", "from_dict", "register"]
