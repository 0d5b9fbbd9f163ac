"""Variable types nnxprune adds to Flax NNX's type system.

A `Mask` is state, not a parameter: optimizers built with `wrt=nnx.Param` never see it, and
`nnx.split(model, nnx.Param, Mask, ...)` separates it. A mask multiplies the kernel it belongs to
in the forward pass, so a pruned weight stays zero through any later training.
"""

from flax import nnx


class Mask(nnx.Variable):
    """Boolean keep-mask of a kernel's shape (True = keep). Not an `nnx.Param`."""


class ProjectionInput(nnx.Intermediate):
    """The input of a `Linear`, sown while calibration statistics are collected (`nnx.capture`,
    the `Linear.record_inputs` switch)."""


class NormOutput(nnx.Intermediate):
    """The output of an `RMSNorm`, sown likewise (its `record_outputs` switch)."""


class MaskLogit(nnx.Param):
    """`log_alpha` of a learned hard-concrete mask (Sheared LLaMA). A parameter, so a
    `wrt=nnx.Param` optimizer trains it, but its own type, so the optimizer can give it its
    own learning rate (the reference trains masks at 1.0, weights at 1e-4)."""


class LagrangeMultiplier(nnx.Param):
    """A Lagrange multiplier of Sheared LLaMA's constraint, trained by gradient *ascent*."""
