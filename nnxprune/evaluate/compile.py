"""Ahead-of-time compilation of the evaluation programs, with oneDNN for the matmuls on CPU.

XLA's CPU backend runs matmuls through YNNPACK by default. Built with oneDNN (the x86 jaxlib
wheels are), it can hand them to oneDNN instead (`xla_cpu_use_onednn` with the `dot` library
fusion). On a 2-core Sapphire Rapids Xeon that raised the fp32 GEMMs of SmolLM2's shapes from
about 350 to about 390 GFLOP/s, and the perplexity scorer's window (1024 tokens) ran 3-6% faster
in A/B runs in one process; the NLL agreed to float32 summation order (12845.2788 vs 12845.2778
nats over 4 windows). `benchmarks/eval_speed.py` measures both.

The option is experimental in XLA. In jaxlib 0.10.2 a matmul that feeds another matmul directly
(`(x @ a) @ b`, as in a LoRA branch) makes oneDNN's partition compiler fail ("partition compile
failed"), and the process dies with SIGILL, which no `try` can catch. So `compile_fast` enables
oneDNN only when the traced program has no such chain (`has_dot_chain`: a `dot_general` reached
from another through ops that do no arithmetic, such as reshapes, transposes, slices and casts). Any other failure to compile
with the option falls back to XLA's defaults. `NNXPRUNE_ONEDNN=0` turns it off.

Example:
    >>> compiled, options = compile_fast(jax.jit(fn), *arg_specs)
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

ONEDNN_ENV = "NNXPRUNE_ONEDNN"
ONEDNN_OPTIONS = {"xla_cpu_use_onednn": True,
                  "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}

# Primitives whose output is arithmetic on their inputs, so a matmul behind them is not fused with
# a matmul after them. Everything else (reshape, transpose, slices, casts, broadcasts, gathers,
# calls, unknown primitives) is taken to pass a matmul's output through unchanged.
_ARITHMETIC = frozenset({
    "add", "sub", "mul", "div", "max", "min", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "rsqrt", "sqrt", "pow", "integer_pow", "select_n", "reduce_max", "reduce_min",
    "reduce_sum", "reduce_prod", "argmax", "argmin", "erf", "sin", "cos", "abs", "sign", "square",
    "cumsum", "cummax", "cumlogsumexp", "sort", "clamp", "nextafter", "rem", "atan2",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor",
})

log = logging.getLogger(__name__)


def _sub_jaxprs(params: dict[str, Any]):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):  # a Jaxpr
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):  # a ClosedJaxpr
                yield item.jaxpr


def _is_var(v) -> bool:
    return not hasattr(v, "val")  # Literals carry a value; Vars do not


def _flow(jaxpr, in_flags: list[bool]) -> tuple[list[bool], bool]:
    """Propagates "is (a pass-through of) a matmul output" through `jaxpr`: the flags of its
    outputs, and whether some `dot_general` reads a flagged value."""
    flags = {v: f for v, f in zip(jaxpr.invars, in_flags, strict=True)}
    found = False

    def flag(v) -> bool:
        return _is_var(v) and flags.get(v, False)

    for eqn in jaxpr.eqns:
        ins = [flag(v) for v in eqn.invars]
        name = eqn.primitive.name
        subs = list(_sub_jaxprs(eqn.params))
        if name == "dot_general":
            (_, _), (batch, _) = eqn.params["dimension_numbers"]
            # a matmul output as the left operand, or as the right one of an unbatched matmul,
            # crashes; as the right operand of a batched matmul (the values of attention) it runs
            found = found or ins[0] or (ins[1] and not batch)
            outs = [True] * len(eqn.outvars)
        elif name == "scan":  # body inputs: consts, carry, xs; outputs: carry, ys
            outs, sub_found = _loop(eqn.params["jaxpr"].jaxpr, ins, eqn.params["num_consts"],
                                    eqn.params["num_carry"])
            found = found or sub_found
        elif name == "while":  # inputs: cond consts, body consts, carry; outputs: carry
            nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
            outs, sub_found = _loop(eqn.params["body_jaxpr"].jaxpr, ins[nc:], nb, len(ins) - nc - nb)
            found = found or sub_found or _flow(eqn.params["cond_jaxpr"].jaxpr,
                                                ins[:nc] + [a or b for a, b in zip(ins[nc + nb:], outs,
                                                                                   strict=True)])[1]
        elif subs:
            outs = [False] * len(eqn.outvars)
            for sub in subs:
                sub_in = ins if len(sub.invars) == len(ins) else [any(ins)] * len(sub.invars)
                sub_out, sub_found = _flow(sub, sub_in)
                found = found or sub_found
                if len(sub_out) == len(outs):
                    outs = [a or b for a, b in zip(outs, sub_out, strict=True)]
                else:
                    outs = [o or any(sub_out) for o in outs]
        elif name in _ARITHMETIC:
            outs = [False] * len(eqn.outvars)
        else:
            outs = [any(ins)] * len(eqn.outvars)
        for v, f in zip(eqn.outvars, outs, strict=True):
            flags[v] = f
    return [flag(v) for v in jaxpr.outvars], found


def _loop(body, ins: list[bool], consts: int, carry: int) -> tuple[list[bool], bool]:
    """`_flow` through a loop body whose carried outputs come round as its carried inputs."""
    found = False
    for _ in range(carry + 1):  # flags only turn on, so this reaches the fixed point
        outs, sub_found = _flow(body, ins)
        found = found or sub_found
        again = ins[:consts] + [a or b for a, b in zip(ins[consts:consts + carry], outs[:carry],
                                                       strict=True)] + ins[consts + carry:]
        if again == ins:
            break
        ins = again
    return outs, found


def has_dot_chain(closed_jaxpr) -> bool:
    """Whether a matmul in the program reads another matmul's output with no arithmetic between,
    in a way seen to crash oneDNN's fusion in jaxlib 0.10.2: as its left operand, or as the right
    operand of a matmul without batch dimensions (`x @ (a @ b)`). The right operand of a batched
    matmul is allowed: attention reads the values straight from `v_proj` that way, and the scorer
    of every model in the tests compiles and runs with it."""
    jaxpr = closed_jaxpr.jaxpr
    return _flow(jaxpr, [False] * len(jaxpr.invars))[1]


def onednn_enabled() -> bool:
    """Whether `$NNXPRUNE_ONEDNN` allows oneDNN matmuls (on by default)."""
    return os.environ.get(ONEDNN_ENV, "1") != "0"


def compile_fast(jitted, *args, onednn: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """Compiles `jitted` (a `jax.jit` function) for `args` (arrays or `ShapeDtypeStruct`s) ahead
    of time: `(compiled, options used)`. oneDNN matmuls on CPU when safe (module docstring);
    `onednn=False` keeps XLA's defaults, `None` follows `$NNXPRUNE_ONEDNN`."""
    traced = jitted.trace(*args)
    lowered = traced.lower()
    wanted = onednn_enabled() if onednn is None else onednn
    if wanted and jax.default_backend() == "cpu" and not has_dot_chain(traced.jaxpr):
        try:
            return lowered.compile(dict(ONEDNN_OPTIONS)), dict(ONEDNN_OPTIONS)
        except Exception as e:  # noqa: BLE001 - a jaxlib without oneDNN rejects the option
            log.info("oneDNN matmuls unavailable, compiling with XLA's defaults: %s", e)
    return lowered.compile(), {}
