"""Ahead-of-time compilation of the evaluation programs, with oneDNN for the matmuls on CPU.

XLA's CPU backend runs matmuls through YNNPACK by default. Built with oneDNN (the x86 jaxlib
wheels are), it can hand them to oneDNN instead (`xla_cpu_use_onednn` with the `dot` library
fusion). On a 2-core Sapphire Rapids Xeon that raised the fp32 GEMMs of SmolLM2's shapes from
about 350 to about 390 GFLOP/s, and the perplexity scorer's window (1024 tokens) ran 3-6% faster
in A/B runs in one process; the NLL agreed to float32 summation order (12845.2788 vs 12845.2778
nats over 4 windows). `benchmarks/eval_speed.py` measures both.

The option is experimental in XLA, and two faults of jaxlib 0.10.2 (oneDNN 3.7.3) are guarded:

- Wrong numbers on some CPUs. XLA fuses an elementwise multiply (or a division, which it turns
  into one) into the matmul's oneDNN fusion as a `binary_mul` post-op, and may give the fusion's
  output the buffer of the multiply's other operand when that operand is a temporary (a broadcast
  constant or row vector). On a 2-core AMD EPYC (AVX2, no AVX-512) oneDNN runs such a matmul as
  `gemm:jit:f32`, which writes `x @ w` to the output and then applies the post-op reading the
  operand from the same, now overwritten, memory: `(x @ w) * 2.0` came out as `(x @ w) ** 2`
  exactly (to 2e-6; the same with a donated full-size operand; add, subtract and max were
  right). Attention's `1/sqrt(Dh)`, online-softmax rescaling and row-sum division are such
  multiplies, and the tiny test Llama's scorer gave a total NLL of 2587.94 against 2606.91 with
  XLA's defaults. On the Xeon the same test agreed (likely because its AVX-512 kernels apply the
  post-op before they store; not re-checked on one since). So oneDNN is used only
  where `onednn_matches_xla` holds: once per process it compiles a few small programs with the
  scorer's kinds of matmul (scaled, rescaled and normalised attention products, a residual add,
  SwiGLU, the head's transposed product) both ways on fixed inputs and requires every output to
  agree within `PROBE_RTOL` (1e-4 of its largest value). On the EPYC, XLA's defaults are within
  4e-7 of a float64 reference on every probe output, and oneDNN is 19 to 93 times the output's
  largest value off on the four with a multiply or division (exact on the other three), so the
  tolerance is far from both. The probe takes about a second there. It covers kinds of program,
  not every shape: a CPU where oneDNN picks a different kernel for another shape could still
  slip through, which the scorer's own test (`tests/evaluate/test_compile.py`) would show.
- A crash. A matmul that feeds another matmul directly (`(x @ a) @ b`, as in a LoRA branch)
  makes oneDNN's partition compiler fail ("partition compile failed"), and the process dies with
  SIGILL, which no `try` can catch. So oneDNN is used only when the traced program has no such
  chain (`has_dot_chain`: a `dot_general` reached from another through ops that do no
  arithmetic, such as reshapes, transposes, slices and casts). On the EPYC an elementwise op
  that XLA fuses in front of a 2-D matmul dies the same way (`(y * 2.0) @ a`, `silu(y) @ a`,
  `((x @ a) * 2.0) @ b`); the guard does not look for that, and the scorer has none (it compiles
  and runs).

Any other failure to compile with the option falls back to XLA's defaults, and the options
`compile_fast` reports are the ones it used (empty with the defaults). `NNXPRUNE_ONEDNN=0` turns
oneDNN off.

Example:
    >>> compiled, options = compile_fast(jax.jit(fn), *arg_specs)
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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

PROBE_RTOL = 1e-4  # of an output's largest value; float32 summation order is far below

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


def _probe_programs() -> list[tuple[Any, tuple[jax.Array, ...]]]:
    """`(function, inputs)` pairs with the scorer's kinds of matmul, on fixed inputs. Every operand
    of a matmul is an input, so none of them meets the partition-compile crash, and the
    first four multiply or divide a matmul by a broadcast, the case oneDNN got wrong."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def attention_values(p, v):
        return jnp.einsum("bkrs,bksd->bkrd", p, v, preferred_element_type=jnp.float32)

    p, v, q = r(2, 2, 256, 128), r(2, 2, 128, 16), r(2, 2, 256, 16)
    return [
        (lambda x, w: (x @ w) * 0.25, (r(8, 8), r(8, 8))),  # a matmul times a broadcast constant
        (lambda q, k: jnp.einsum("bkrd,bksd->bkrs", q, k) * 0.25, (q, v)),  # scaled scores
        (lambda p, v, f: attention_values(p, v) * f, (p, v, r(2, 2, 256, 1))),  # online softmax
        (lambda p, v, s: attention_values(p, v) / s, (p, v, r(2, 2, 256, 1) ** 2 + 1.0)),  # row sums
        (lambda x, w, y: x @ w + y, (r(2, 128, 64), r(64, 64), r(2, 128, 64))),  # residual add
        (lambda x, g, u: jax.nn.silu(x @ g) * (x @ u), (r(2, 128, 64), r(64, 128), r(64, 128))),
        (lambda h, e: jnp.einsum("nd,vd->nv", h, e), (r(256, 64), r(512, 64))),  # tied head
    ]


def _outputs(fn, args, options: dict[str, Any] | None) -> np.ndarray:
    """`fn(*args)` compiled with `options` (None: XLA's defaults), in float64."""
    lowered = jax.jit(fn).trace(*args).lower()
    compiled = lowered.compile() if options is None else lowered.compile(dict(options))
    return np.asarray(compiled(*args), np.float64)


def probe_difference(options: dict[str, Any]) -> float:
    """The largest difference between the probe programs' outputs compiled with `options` and with
    XLA's defaults, relative to each output's largest absolute value."""
    worst = 0.0
    for fn, args in _probe_programs():
        got, want = _outputs(fn, args, options), _outputs(fn, args, None)
        scale = max(float(np.max(np.abs(want))), float(np.finfo(np.float32).tiny))
        worst = max(worst, float(np.max(np.abs(got - want))) / scale)
    return worst


@functools.cache
def onednn_matches_xla() -> bool:
    """Whether oneDNN matmuls give XLA's numbers on this machine (to `PROBE_RTOL` on the probe
    programs; module docstring). Probed once per process, on the CPU backend."""
    try:
        difference = probe_difference(ONEDNN_OPTIONS)
    except Exception as e:  # noqa: BLE001 - a jaxlib without oneDNN rejects the option
        log.info("oneDNN matmuls unavailable, compiling with XLA's defaults: %s", e)
        return False
    if difference > PROBE_RTOL:
        log.info("oneDNN matmuls differ from XLA's on this CPU (relative %.3g), compiling with "
                 "XLA's defaults", difference)
        return False
    return True


def onednn_enabled() -> bool:
    """Whether `$NNXPRUNE_ONEDNN` allows oneDNN matmuls (on by default)."""
    return os.environ.get(ONEDNN_ENV, "1") != "0"


def compile_fast(jitted, *args, onednn: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """Compiles `jitted` (a `jax.jit` function) for `args` (arrays or `ShapeDtypeStruct`s) ahead
    of time: `(compiled, options used)`. oneDNN matmuls on CPU when safe and right on this
    machine (module docstring); `onednn=False` keeps XLA's defaults, `None` follows
    `$NNXPRUNE_ONEDNN`."""
    traced = jitted.trace(*args)
    lowered = traced.lower()
    wanted = onednn_enabled() if onednn is None else onednn
    if (wanted and jax.default_backend() == "cpu" and not has_dot_chain(traced.jaxpr)
            and onednn_matches_xla()):
        try:
            return lowered.compile(dict(ONEDNN_OPTIONS)), dict(ONEDNN_OPTIONS)
        except Exception as e:  # noqa: BLE001 - fall back to the defaults
            log.info("oneDNN matmuls failed to compile, compiling with XLA's defaults: %s", e)
    return lowered.compile(), {}
