"""lm-eval speed: the `nnxprune` model against lm-eval's `hf` model, same task, same weights.

SmolLM2-135M is exported to an HF folder (the weights nnxprune loaded from the GGUF, so both sides
score identical float32 weights); both models then run the same local lm-eval task through
`lm_eval.evaluator.simple_evaluate` in this one process, one after the other: `wiki_next`, a
multiple-choice task built from WikiText-2 (true next sentence against three sentences from
elsewhere; `nnxprune.evaluate.local_tasks`). Reported: wall seconds and requests per second of
each (nnxprune's includes its jit compilation; a second, warm nnxprune run is reported too), the
ratio, accuracy of both, and the largest difference between the two models' per-request
log-likelihoods. torch gets as many threads as this machine has cores (JAX uses them all).

    python benchmarks/lmeval_speed.py                 # 100 documents = 400 requests
    python benchmarks/lmeval_speed.py --docs 20       # a quick look

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--docs", type=int, default=100, help="documents (4 requests each)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of both models")
    p.add_argument("--out", default=str(RESULTS / "lmeval_speed.json"))
    args = p.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from nnxprune.evaluate.lmeval import NnxpruneLM
    from nnxprune.evaluate.local_tasks import write_wikitext_tasks
    from nnxprune.io.hf import export_hf
    from nnxprune.io.load import load_model

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf(loaded.model, Path(tmp) / "hf", tokenizer=loaded.tokenizer)
        tasks = write_wikitext_tasks(Path(tmp) / "tasks", n_mc=args.docs, n_roll=1)
        manager = TaskManager(include_path=str(tasks), include_defaults=False)
        load_avg = [os.getloadavg()[0]]
        ours = NnxpruneLM(loaded=loaded, batch_size=args.batch_size)
        cold, acc_ours, ll_ours = _evaluate(ours, manager, args.docs)
        load_avg.append(os.getloadavg()[0])
        warm, _, _ = _evaluate(ours, manager, args.docs)
        load_avg.append(os.getloadavg()[0])
        hf = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=args.batch_size)
        hf_seconds, acc_hf, ll_hf = _evaluate(hf, manager, args.docs)
        load_avg.append(os.getloadavg()[0])
    n = len(ll_ours)
    diff = max(abs(a - b) for a, b in zip(ll_ours, ll_hf, strict=True))
    rows = [{"model": "nnxprune (cold: includes jit compilation)", "seconds": cold,
             "requests_per_second": n / cold, "acc": acc_ours},
            {"model": "nnxprune (warm)", "seconds": warm, "requests_per_second": n / warm,
             "acc": acc_ours},
            {"model": f"lm-eval hf (transformers, torch {torch.__version__}, {threads} threads)",
             "seconds": hf_seconds, "requests_per_second": n / hf_seconds, "acc": acc_hf}]
    report = {"benchmark": "lmeval_speed", "model": args.model, "source": loaded.source,
              "task": "wiki_next (local multiple choice from WikiText-2 test)", "documents": args.docs,
              "requests": n, "batch_size": args.batch_size, "machine": machine_info(),
              "load_average_during": load_avg, "rows": rows,
              "ratio_cold": hf_seconds / cold, "ratio_warm": hf_seconds / warm,
              "max_abs_loglikelihood_difference": diff, "compiled_shapes": len(ours._scorer.shapes)}
    md = ["| model | seconds | requests/s | accuracy |", "|---|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['seconds']:.1f} | {r['requests_per_second']:.1f} | {r['acc']:.3f} |"
           for r in rows]
    md += ["", f"{n} loglikelihood requests ({args.docs} documents x 4 choices), batch size "
               f"{args.batch_size}, one process, one run each. nnxprune / hf: "
               f"{hf_seconds / cold:.2f}x cold, {hf_seconds / warm:.2f}x warm; largest per-request "
               f"log-likelihood difference {diff:.2e} nats; {len(ours._scorer.shapes)} compiled "
               f"scoring shapes. Load average during the run: "
               f"{', '.join(f'{x:.1f}' for x in load_avg)}."]
    write_results(args.out, report, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
