"""Zero-shot evaluation through lm-evaluation-harness: the `nnxprune` model for lm-eval.

lm-eval (EleutherAI, https://github.com/EleutherAI/lm-evaluation-harness) is how the pruning
papers report zero-shot accuracy. `NnxpruneLM` runs any model nnxprune can load, dense, masked or
surgically pruned, and gives the numbers lm-eval's `hf` model gives for the same weights
(lm-eval's tokenization and rolling windows, exact float32 log-probabilities).

- `packing`: requests as trees (a shared context once, then each choice after it, attention
  masked so that a choice sees the context and its own earlier tokens only: exact, and every
  context computed once), packed best fit into rows of 512 tokens, grouped into calls of a few
  shapes (`bucket_length`, `fine_length`);
- `scorer`: the packed rows through the model's own layer loop (`Llama.run_layers`), one jitted
  decoder layer per call with the tree attention kernel plugged in, and the output head on the
  scored positions only, in chunks of fixed size (`evaluate.head`);
- `model`: `NnxpruneLM`, the `lm_eval.api.model.TemplateLM` (tokenization as lm-eval's `hf`
  model does it, `loglikelihood`, `loglikelihood_rolling`, `generate_until` with nnxprune's
  KV-cache decoder);
- `tasks`: `task_manager`, `run_tasks` (lm-eval's `simple_evaluate`), `results_table`;
- `local_tasks`: small local lm-eval tasks made from WikiText-2, for tests and benchmarks.

lm-eval 0.4.13 has no plugin discovery for models: `nnxprune` is registered in lm-eval's model
registry when this package is imported. `nnxprune lm-eval ...` does that, and so does
`python -m nnxprune.evaluate.lmeval ARGS` (lm-eval's own command line, `__main__`).
torch is not needed on this path.

Example:
    >>> lm = NnxpruneLM(loaded=loaded, batch_size=8)       # or NnxpruneLM("smollm2-135m")
    >>> out = run_tasks(lm, ["hellaswag", "arc_easy"], limit=200)
    >>> print(results_table(out["results"]))
"""

from nnxprune.evaluate.lmeval.model import NnxpruneLM
from nnxprune.evaluate.lmeval.packing import bucket_length, fine_length
from nnxprune.evaluate.lmeval.tasks import results_table, run_tasks, task_manager

__all__ = ["NnxpruneLM", "bucket_length", "fine_length", "results_table", "run_tasks",
           "task_manager"]
