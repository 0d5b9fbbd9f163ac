"""Peak RSS of restoring one decoder layer of an nnxprune checkpoint (`io.orbax_layers`) against
restoring the whole checkpoint (`io.checkpoint.load_checkpoint`).

A random Llama (default: 8 layers, hidden 1024, 8 heads, MLP 4096, vocab 4096: about 540 MB of
float32 kernels) with Magnitude-style 50% masks on every projection is saved as an nnxprune
checkpoint in a temporary folder. Then each measurement is a child process of its own, so its peak
RSS (`VmHWM`, `nnxprune.measure.peak_rss_bytes`) is that run's alone:

- `open`: imports and `OrbaxSource(ckpt)` (metadata and checksums, no array restored);
- `layer`: the same, then `source.layer(k)` for the middle layer (kernels, masks, norms);
- `globals`: the same, then the embedding, final norm and head tensors;
- `whole`: `load_checkpoint(ckpt)`, every array.

Each child runs `--repeats` times (in turn); the medians are reported with the checkpoint's bytes
of state and one layer's bytes, and the layer's increment over `open` is compared with one layer's
arrays and with the whole state.

    python benchmarks/orbax_layer_memory.py                  # writes results/orbax_layer_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, median  # noqa: E402

MODES = ("open", "layer", "globals", "whole")


def create(path: Path, args) -> dict:
    """The random masked checkpoint; its state's bytes and one layer's bytes."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from nnxprune.io.checkpoint import save_checkpoint
    from nnxprune.layers import Linear
    from nnxprune.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig.uniform(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                              num_heads=args.heads, num_kv_heads=args.heads,
                              intermediate_size=args.intermediate, head_dim=args.hidden // args.heads,
                              tie_word_embeddings=False)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        for _, node in nnx.iter_graph(layer):
            if isinstance(node, Linear):
                node.set_mask(jnp.asarray(rng.random(node.kernel.shape) < 0.5))
    layer_bytes = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(model.layers[0])))
    total = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(model)))
    kernels = sum(n.kernel[...].nbytes for _, n in nnx.iter_graph(model) if isinstance(n, Linear))
    save_checkpoint(model, path)
    return {"state_bytes": total, "layer_bytes": layer_bytes, "kernel_bytes": kernels}


def child(mode: str, path: str) -> dict:
    import time

    import jax.numpy as jnp
    import numpy as np

    from nnxprune.measure import peak_rss_bytes

    t0 = time.perf_counter()
    if mode == "whole":
        from nnxprune.io.checkpoint import load_checkpoint

        model = load_checkpoint(path)
        checksum = float(np.asarray(model.layers[0].mlp.up_proj.kernel[...]).sum())
    else:
        from nnxprune.io.orbax_layers import OrbaxSource

        source = OrbaxSource(path)
        checksum = 0.0
        if mode == "layer":
            layer = source.layer(source.config.num_layers // 2, jnp.float32)
            checksum = float(np.asarray(layer.mlp.up_proj.kernel[...]).sum())
        elif mode == "globals":
            checksum = float(sum(source.tensor(k).sum() for k in source.global_keys()))
    return {"mode": mode, "peak_rss_bytes": peak_rss_bytes(), "seconds": time.perf_counter() - t0,
            "checksum": checksum}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "orbax_layer_memory.json"))
    p.add_argument("--child", choices=MODES)
    p.add_argument("--create", action="store_true")
    p.add_argument("--path")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path)))
        return
    if args.create:
        print(json.dumps(create(Path(args.path), args)))
        return
    me = [sys.executable, __file__]
    with tempfile.TemporaryDirectory(prefix="orbax-layer-memory-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        shape = [f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "heads", "intermediate",
                                                        "vocab")]
        sizes = json.loads(subprocess.run(me + ["--create", "--path", str(ckpt)] + shape, check=True,
                                          capture_output=True, text=True).stdout.splitlines()[-1])
        runs = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                out = subprocess.run(me + ["--child", mode, "--path", str(ckpt)], check=True,
                                     capture_output=True, text=True).stdout.splitlines()[-1]
                runs[mode].append(json.loads(out))
    peaks = {m: median([r["peak_rss_bytes"] for r in runs[m]]) for m in MODES}
    report = {
        "benchmark": "orbax_layer_memory", "machine": machine_info(),
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "intermediate", "vocab")},
        **sizes, "repeats": args.repeats,
        "peak_rss_bytes": peaks,
        "seconds": {m: median([r["seconds"] for r in runs[m]]) for m in MODES},
        "layer_over_open_bytes": peaks["layer"] - peaks["open"],
        "whole_over_open_bytes": peaks["whole"] - peaks["open"],
        "runs": runs,
    }
    report["layer_increment_over_layer_bytes"] = report["layer_over_open_bytes"] / sizes["layer_bytes"]
    report["layer_increment_over_state_bytes"] = report["layer_over_open_bytes"] / sizes["state_bytes"]
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    gb = 1e9
    print(f"state {sizes['state_bytes'] / gb:.3f} GB, one layer {sizes['layer_bytes'] / gb:.3f} GB")
    for m in MODES:
        print(f"{m:8s} peak RSS {peaks[m] / gb:.3f} GB  ({report['seconds'][m]:.2f} s)")
    print(f"one layer adds {report['layer_over_open_bytes'] / gb:.3f} GB over open "
          f"({report['layer_increment_over_layer_bytes']:.2f}x the layer's bytes); the whole "
          f"checkpoint adds {report['whole_over_open_bytes'] / gb:.3f} GB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
