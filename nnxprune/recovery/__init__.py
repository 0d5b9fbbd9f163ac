"""Recovery training after pruning: distillation, LoRA, continued pretraining (DESIGN.md).

One trainer (`trainer.train`) runs every recipe under a `jax.sharding.Mesh`; the loss is a
strategy object (`losses`), LoRA adapters are added and merged by `lora`, the channel-space
sharding rules live in `sharding`, the log folder (metrics, loss plot, checkpoints for resume)
in `logdir`, and the `[recovery]` recipe section in `config`; packed token windows come from
`nnxprune.data`; continued pretraining over data domains with dynamic batch loading (Sheared
LLaMA) in `dynamic` and `continued`.

Example:
    >>> from nnxprune.recovery import RecoveryConfig, train
    >>> cfg = RecoveryConfig.from_dict({"kind": "distill", "steps": 100, "seqlen": 512})
    >>> result = train(pruned, cfg, tokenizer=tok, teacher=dense, log_dir="out/train")
"""

from nnxprune.recovery.config import DistillConfig, LoRAConfig, MeshConfig, RecoveryConfig
from nnxprune.recovery.continued import continued_pretraining
from nnxprune.recovery.losses import CrossEntropy, Distillation, LossStrategy, strategy_for
from nnxprune.recovery.lora import LoRALinear, add_lora, merge_lora
from nnxprune.recovery.trainer import TrainResult, train

__all__ = ["CrossEntropy", "Distillation", "DistillConfig", "LoRAConfig", "LoRALinear",
           "LossStrategy", "MeshConfig", "RecoveryConfig", "TrainResult", "add_lora",
           "continued_pretraining", "merge_lora", "strategy_for", "train"]
