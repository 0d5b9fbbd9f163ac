"""lm-eval speed: the `nnxprune` model against lm-eval's `hf` model, same task, same weights.

SmolLM2-135M is exported to an HF folder (the weights nnxprune loaded from the GGUF, so both sides
score identical float32 weights); both models then run the same local lm-eval task through
`lm_eval.evaluator.simple_evaluate` in this one process, one after the other. The task is
`wiki_next` (`nnxprune.evaluate.lmeval.local_tasks`), multiple choice built from WikiText-2: a
paragraph's opening sentences, then its true next sentence against three sentences from
elsewhere (4 loglikelihood requests per document). It runs twice, with contexts of 1 and of 3
sentences: how much nnxprune saves depends on how long the shared context is next to the
choices (one sentence is about as long as one choice; three are about three times as long).

Reported per context length: wall seconds and requests per second of each model, one run each.
nnxprune's first ("cold") run includes its jit compilations; a second ("warm") run on the same
requests is reported beside it. The ratio is hf seconds / nnxprune seconds. Also: accuracy of
both, the largest difference between the two models' per-request log-likelihoods, and the load
average during the runs (the machine may be shared). torch gets as many threads as the machine
has cores (`torch.set_num_threads(os.cpu_count())`), as JAX uses them all.

    python benchmarks/lmeval_speed.py                   # 100 documents (400 requests) per task
    python benchmarks/lmeval_speed.py --docs 20         # a quick look

Writes benchmarks/results/lmeval_speed.json and lmeval_speed.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, write_results  # noqa: E402


def _evaluate(lm, manager, docs: int):
    from lm_eval import evaluator

    t0 = time.perf_counter()
    out = evaluator.simple_evaluate(model=lm, tasks=["wiki_next"], limit=docs, task_manager=manager,
                                    log_samples=True, bootstrap_iters=0, random_seed=0,
                                    numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    seconds = time.perf_counter() - t0
    samples = out["samples"]["wiki_next"]
    lls = [float(r[0][0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]
    return seconds, out["results"]["wiki_next"]["acc,none"], lls


def _matmul_work(model, lm) -> dict:
    """Matmul FLOPs of the projections and the output head (attention not counted): what nnxprune
    ran (padding included) against running each request as its own row with the head on every
    position, as lm-eval's `hf` model does (a lower bound on its work: its batch padding is not
    counted). `padding`: nnxprune's layer tokens over the requests' own input tokens."""
    proj = sum(lin.in_features * lin.out_features for layer in model.layers
               for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                           layer.mlp.down_proj))
    vocab, hidden = model.embed_tokens.embedding.shape
    s = lm._scorer
    ours = 2 * (s.tokens * proj + s.head_rows * vocab * hidden)
    alone = 2 * lm.request_tokens * (proj + vocab * hidden)
    return {"nnxprune_tflop": ours / 1e12, "one_row_per_request_tflop": alone / 1e12,
            "ratio": alone / ours, "layer_tokens": s.tokens, "head_rows": s.head_rows,
            "request_tokens": lm.request_tokens, "padding": s.tokens / max(1, lm.request_tokens)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--docs", type=int, default=100, help="documents per task (4 requests each)")
    p.add_argument("--contexts", default="1,3", help="context lengths in sentences, comma-separated")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of both models")
    p.add_argument("--out", default=str(RESULTS / "lmeval_speed.json"))
    args = p.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from nnxprune.evaluate.lmeval import NnxpruneLM
    from nnxprune.evaluate.lmeval.local_tasks import write_wikitext_tasks
    from nnxprune.io.hf import export_hf
    from nnxprune.io.load import load_model

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    machine = machine_info()
    loaded = load_model(args.model)
    runs, md = [], ["| context | model | seconds | requests/s | accuracy | hf / nnxprune |",
                    "|---|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf(loaded.model, Path(tmp) / "hf", tokenizer=loaded.tokenizer)
        hf = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=args.batch_size)
        for k in [int(x) for x in args.contexts.split(",")]:
            tasks = write_wikitext_tasks(Path(tmp) / f"tasks{k}", n_mc=args.docs, n_roll=1,
                                         context_sentences=k)
            manager = TaskManager(include_path=str(tasks), include_defaults=False)
            load_avg = [os.getloadavg()[0]]
            ours = NnxpruneLM(loaded=loaded, batch_size=args.batch_size)
            cold, acc_ours, ll_ours = _evaluate(ours, manager, args.docs)
            work = _matmul_work(loaded.model, ours)  # of one run (the cold one)
            load_avg.append(os.getloadavg()[0])
            warm, _, _ = _evaluate(ours, manager, args.docs)
            load_avg.append(os.getloadavg()[0])
            hf_seconds, acc_hf, ll_hf = _evaluate(hf, manager, args.docs)
            load_avg.append(os.getloadavg()[0])
            n = len(ll_ours)
            diff = max(abs(a - b) for a, b in zip(ll_ours, ll_hf, strict=True))
            rows = [{"model": "nnxprune, cold (includes jit compilation)", "seconds": cold,
                     "acc": acc_ours, "ratio": hf_seconds / cold},
                    {"model": "nnxprune, warm (second run)", "seconds": warm, "acc": acc_ours,
                     "ratio": hf_seconds / warm},
                    {"model": f"lm-eval hf (torch {torch.__version__}, {threads} threads)",
                     "seconds": hf_seconds, "acc": acc_hf, "ratio": 1.0}]
            for r in rows:
                r["requests_per_second"] = n / r["seconds"]
                md.append(f"| {k} sentence{'s' if k > 1 else ''} | {r['model']} | {r['seconds']:.1f} "
                          f"| {r['requests_per_second']:.1f} | {r['acc']:.3f} | {r['ratio']:.2f}x |")
            runs.append({"context_sentences": k, "requests": n, "rows": rows,
                         "ratio_cold": hf_seconds / cold, "ratio_warm": hf_seconds / warm,
                         "max_abs_loglikelihood_difference": diff,
                         "compiled_shapes": len(ours._scorer.shapes), "matmul_work": work,
                         "load_average_during": load_avg})
    wall = time.perf_counter() - t_start
    report = {"benchmark": "lmeval_speed", "model": args.model, "source": loaded.source,
              "task": "wiki_next (local multiple choice from WikiText-2 test, 4 choices)",
              "documents": args.docs, "batch_size": args.batch_size, "torch_threads": threads,
              "machine": machine, "wall_seconds": wall, "runs": runs}
    md += ["", f"{args.docs} documents x 4 choices = {runs[0]['requests']} loglikelihood requests per "
               f"context length, batch size {args.batch_size}, float32, one process, one run each; "
               f"torch on {threads} threads (all cores, as JAX). Largest per-request "
               f"log-likelihood difference nnxprune vs hf: "
               + ", ".join(f"{r['max_abs_loglikelihood_difference']:.1e} nats ({r['context_sentences']} "
                           f"sent.)" for r in runs)
               + ". Matmul work of one run (projections and output head; attention not counted): "
               + "; ".join(f"{r['context_sentences']} sent. nnxprune "
                           f"{r['matmul_work']['nnxprune_tflop']:.1f} TFLOP (layer tokens "
                           f"{r['matmul_work']['padding']:.2f}x the requests' tokens), each request"
                           f" as its own row {r['matmul_work']['one_row_per_request_tflop']:.1f}"
                           f" TFLOP ({r['matmul_work']['ratio']:.2f}x)" for r in runs)
               + ". Load average (1 min) during the runs: "
               + "; ".join(", ".join(f"{x:.1f}" for x in r["load_average_during"]) for r in runs)
               + f". Benchmark wall time {wall / 60:.1f} min."]
    write_results(args.out, report, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
