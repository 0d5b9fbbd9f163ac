"""Transforms: `model -> model` steps, registered by kind, composed by `Pipeline`."""

from nnxprune.transforms.base import REGISTRY, Context, Pipeline, Transform, from_dict, register
from nnxprune.transforms.coupled import LLMPruner
from nnxprune.transforms.depth import Depth
from nnxprune.transforms.flap import FLAP
from nnxprune.transforms.magnitude import Magnitude
from nnxprune.transforms.owl import OWL
from nnxprune.transforms.sheared import Sheared
from nnxprune.transforms.shortened import Shortened
from nnxprune.transforms.sleb import SLEB
from nnxprune.transforms.sparsegpt import SparseGPT
from nnxprune.transforms.sparsellm import SparseLLM
from nnxprune.transforms.surgery import (DropLayers, FoldMasks, RemoveKVGroups, RemoveQueryHeads,
                                         ShrinkHidden, ShrinkMLP)
from nnxprune.transforms.wanda import Wanda
from nnxprune.transforms.wanda_sp import WandaSP
from nnxprune.transforms.width import Width

__all__ = ["OWL", "REGISTRY", "Context", "Depth", "DropLayers", "FoldMasks", "LLMPruner", "Magnitude", "Pipeline",
           "Sheared", "Shortened", "SLEB", "WandaSP", "FLAP",
           "SparseGPT", "SparseLLM", "Wanda", "RemoveKVGroups",
           "RemoveQueryHeads", "ShrinkHidden", "ShrinkMLP", "Transform", "Width", "from_dict",
           "register"]
