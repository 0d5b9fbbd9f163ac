"""nnxprune: pruning Llama-family language models by structural surgery, in Flax NNX.

The curated public API. Loading, evaluating and exporting:

    >>> import nnxprune as nxp
    >>> loaded = nxp.load_model("smollm2-135m")            # card, HF folder, .gguf or checkpoint
    >>> result = nxp.evaluate_perplexity(loaded.model, loaded.tokenizer,
    ...                                  nxp.protocol_for("wikitext2", seqlen=1024, max_windows=32))
    >>> result.ppl, result.protocol.describe()
    >>> nxp.generate_text(loaded.model, loaded.tokenizer, "The capital of France is").text
    >>> nxp.export_hf(loaded.model, "out/hf", tokenizer=loaded.tokenizer)

Pruning, from Python or from a recipe file:

    >>> from nnxprune.transforms import Context, Wanda
    >>> Wanda(sparsity=0.5)(loaded.model, Context(tokens=nxp.calibration_samples(
    ...     loaded.tokenizer, nsamples=32, seqlen=1024).tokens))
    >>> report = nxp.run_recipe(nxp.load_recipe("recipes/wanda.toml"), model="smollm2-135m",
    ...                         out="out/wanda", report_path="out/wanda.json")

Recovery training (distillation, LoRA, continued pretraining; masks held, sharded):

    >>> cfg = nxp.recovery.RecoveryConfig.from_dict({"kind": "distill", "steps": 100})
    >>> nxp.recovery.train(pruned, cfg, tokenizer=loaded.tokenizer, teacher=loaded.model)
"""

from nnxprune import graph, recovery, transforms
from nnxprune.data import CalibrationSet, calibration_samples
from nnxprune.errors import UserError
from nnxprune.evaluate.perplexity import PerplexityResult, evaluate_perplexity
from nnxprune.evaluate.protocol import PerplexityProtocol, protocol_for
from nnxprune.generate import GenerationResult, generate, generate_text
from nnxprune.io.checkpoint import load_checkpoint, save_checkpoint
from nnxprune.io.hf import export_hf
from nnxprune.inspect import inspect_model
from nnxprune.io.load import Loaded, load_model
from nnxprune.layers import Embed, Linear, RMSNorm
from nnxprune.models.llama import LayerShape, Llama, LlamaConfig, init_cache
from nnxprune.recipes import Recipe, load_recipe
from nnxprune.runner import run_recipe
from nnxprune.transforms import Context, Pipeline, Transform
from nnxprune.variables import Mask

__version__ = "0.1.0"

__all__ = [
    "CalibrationSet", "Context", "Pipeline", "Recipe", "Transform", "calibration_samples", "graph",
    "inspect_model", "load_recipe", "recovery", "run_recipe", "transforms",
    "Embed", "GenerationResult", "LayerShape", "Linear", "Llama", "LlamaConfig", "Loaded", "Mask",
    "PerplexityProtocol", "PerplexityResult", "RMSNorm", "UserError", "evaluate_perplexity",
    "export_hf", "generate", "generate_text", "init_cache", "load_checkpoint", "load_model",
    "protocol_for", "save_checkpoint",
]
