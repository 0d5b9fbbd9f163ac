"""The `[recovery]` recipe section as frozen dataclasses, validated strictly before any work.

    [recovery]
    kind = "distill"            # "distill" | "lora" | "pretrain"
    dataset = "c4"              # c4, wikitext2 or a .txt / .jsonl / .parquet file
    prompt_template = ""        # "alpaca": dataset is a JSONL of instruction / input / output
                                # records, one per window, prompt masked from the loss
    steps = 200                 # optimizer steps
    batch_size = 8              # sequences per optimizer step (all devices, all micro-batches)
    grad_accum = 1              # micro-batches per step (batch_size / grad_accum per forward)
    seqlen = 512                # tokens per packed window
    lr = 1e-4                   # peak learning rate (linear warmup, then the decay)
    warmup_steps = 10
    schedule = "cosine"         # decay after warmup: "cosine" or "linear" (transformers' default)
    min_lr_ratio = 0.1          # the decay ends at lr * min_lr_ratio
    beta2 = 0.95                # AdamW's second-moment decay (transformers' default: 0.999)
    weight_decay = 0.0          # AdamW (decoupled) weight decay
    clip_norm = 1.0             # global gradient-norm clipping (0 = off)
    compute_dtype = "float32"   # or "bfloat16": bf16 forward/backward, float32 master weights
    seed = 0
    eval_every = 50             # held-out evaluation every N steps (0 = only at the end)
    eval_batches = 2            # held-out batches of batch_size windows
    checkpoint_every = 0        # Orbax checkpoints for resume every N steps (0 = off)
    keep_checkpoints = 2        # keep the last N
    keep_best = false           # end with the weights of the held-out evaluation with the lowest
                                # loss (transformers' load_best_model_at_end), not the last step's
    dynamic = true              # with [recovery.domains]: dynamic batch loading (false = fixed
                                # weights); the weights update at every held-out evaluation

    [recovery.stream]           # stream `dataset` (c4, a file or a glob like 'shards/*.parquet')
    shuffle = true              # through grain, tokenized and packed lazily, each process reading
                                # its rows (nnxprune.data.grain_stream); false: file order

    [recovery.domains.NAME]     # domains (Sheared LLaMA; nnxprune.data.domains, recovery.dynamic):
    source = "c4"               # c4, wikitext2, hf:OWNER/NAME or a file; `dataset` is then unused
    category = "news"           # optional URL filters: a site category and / or url = 'REGEX'
    weight = 1.0                # initial weight (normalized over the domains)
    reference_loss = 2.9        # the loss to reach; or predicted by [recovery.reference.fit.NAME]
                                # (recovery.scaling_law); dynamic loading refuses a domain with
                                # neither unless reference = "initial-loss" (the starting loss)

    [recovery.distill]          # kind = "distill" only (Minitron, arXiv 2407.14679)
    temperature = 1.0
    kd_weight = 1.0             # forward KL(teacher || student) on logits, times T^2
    ce_weight = 0.0             # plus next-token cross-entropy
    hidden_layers = []          # plus hidden-state MSE after these decoder layers (the teacher's
    hidden_weight = 0.0         # layer they came from, recovery.pairs) weighted by this
    intermediate = false        # Minitron / ModelOpt: cosine loss between the norm outputs of
                                # (student, teacher) layer pairs, rescaled to the logit loss, with a
                                # learned projection when the widths differ (never saved)
    pairs = []                  # [[student, teacher], ...]: a layer's input norm or "final"; default:
                                # every kept layer with the teacher layer it came from, and "final"
    teacher_correction_steps = 0  # first fine-tune the teacher on the distillation data (CE) this
    teacher_correction_lr = 0.0   # many steps at this lr (0: lr), Llama-3.1-Minitron's correction
    teacher = ""                # model for `nnxprune train` (default: the checkpoint's source)

    [recovery.lora]             # kind = "lora" only (LoRA, arXiv 2106.09685)
    targets = 'mlp'             # regex searched in projection names (layers.3.mlp.up_proj), the
                                # rule of the pruning methods; default: q, k, v, o, gate, up, down
    ignore = 'layers\\.0\\.'      # regex: projections left out (default: none)
    rank = 8
    alpha = 16.0
    dropout = 0.0               # on the adapter's input, training steps only (LLM-Pruner: 0.05)
    init = "peft"               # lora_a ~ U(+-1/sqrt(in)) as PEFT; "he_uniform": U(+-sqrt(6/in))
    merge = true                # merge adapters into the kernels at the end (masked)

    [recovery.mesh]             # logical axes of the device mesh; -1 = all remaining devices
    data = -1
    fsdp = 1
    tensor = 1

Every key is checked (an unknown one names the nearest valid key), values are type- and
range-checked, and `RecoveryConfig.check(config, device_count)` checks what depends on the model
and the machine (LoRA regex matching nothing, mesh not dividing the devices, batch not divisible
by the batch axes) before the model is touched.

Example:
    >>> cfg = RecoveryConfig.from_dict({"kind": "lora", "steps": 50, "lora": {"targets": "mlp"}})
    >>> cfg.check(model.config, device_count=1)
    {'data': 1, 'fsdp': 1, 'tensor': 1}
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from nnxprune.data.domains import DomainSpec, parse_domains
from nnxprune.data.grain_stream import StreamConfig
from nnxprune.errors import UserError, nearest
from nnxprune.graph.targets import layer_projection_names, select_projections
from nnxprune.recovery import mesh_config

KINDS = ("distill", "lora", "pretrain")
PROMPT_TEMPLATES = ("", "alpaca")
DTYPES = ("float32", "bfloat16")
DATASETS = ("c4", "wikitext2")
LORA_INITS = ("peft", "he_uniform")
SCHEDULES = ("cosine", "linear")


def _nearest(name: str, options, what: str) -> str:
    return nearest(name, options, what)


def _check_int(where: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{where} must be an integer >= {minimum}, got {value!r}")


def _check_float(where: str, value: Any, minimum: float, *, strict: bool = False,
                 maximum: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        if maximum is not None:
            bound += f" and <= {maximum}"
        raise UserError(f"{where} must be a number {bound}, got {value!r}")


def _build(cls, section: Any, where: str):
    if not isinstance(section, dict):
        raise UserError(f"[{where}] must be a table")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in section:
        if key not in fields:
            raise UserError(f"{where}: " + _nearest(key, fields, "key"))
    return cls(**section)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Logit distillation from a frozen teacher, plus optional CE and hidden-state MSE."""

    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_layers: tuple[int, ...] = ()
    hidden_weight: float = 0.0
    intermediate: bool = False
    pairs: tuple = ()
    teacher_correction_steps: int = 0
    teacher_correction_lr: float = 0.0
    teacher: str = ""

    def __post_init__(self):
        from nnxprune.recovery.pairs import check_config

        check_config(self)
        _check_float("recovery.distill.temperature", self.temperature, 0.0, strict=True)
        for name in ("kd_weight", "ce_weight", "hidden_weight"):
            _check_float(f"recovery.distill.{name}", getattr(self, name), 0.0)
        if not isinstance(self.hidden_layers, (list, tuple)):
            raise UserError(f"recovery.distill.hidden_layers must be a list of layer indices, "
                            f"got {self.hidden_layers!r}")
        for i in self.hidden_layers:
            _check_int("recovery.distill.hidden_layers[]", i, 0)
        object.__setattr__(self, "hidden_layers", tuple(self.hidden_layers))
        if self.hidden_weight > 0 and not self.hidden_layers:
            raise UserError("recovery.distill.hidden_weight > 0 needs hidden_layers")
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise UserError("recovery.distill: kd_weight, ce_weight and hidden_weight are all 0")
        if not isinstance(self.teacher, str):
            raise UserError(f"recovery.distill.teacher must be a model name or path, got "
                            f"{self.teacher!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Low-rank adapters on the projections `targets` / `ignore` select (`graph.targets`)."""

    targets: str | None = None  # None: q, k, v, o, gate, up and down of every layer
    ignore: str | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "peft"
    merge: bool = True

    def __post_init__(self):
        for name in ("targets", "ignore"):
            pattern = getattr(self, name)
            if pattern is None:
                continue
            if not isinstance(pattern, str) or not pattern:
                raise UserError(f"recovery.lora.{name} must be a regex, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"recovery.lora.{name} {pattern!r} is not a valid regex ({e})") \
                    from None
        _check_int("recovery.lora.rank", self.rank, 1)
        _check_float("recovery.lora.alpha", self.alpha, 0.0, strict=True)
        _check_float("recovery.lora.dropout", self.dropout, 0.0, maximum=0.99)
        if not isinstance(self.merge, bool):
            raise UserError(f"recovery.lora.merge must be true or false, got {self.merge!r}")
        if self.init not in LORA_INITS:
            raise UserError("recovery.lora.init: " + _nearest(str(self.init), LORA_INITS, "init"))

    def select(self, names: list[str]) -> list[str]:
        """The projection names (like `layers.3.mlp.up_proj`) that get adapters, by the rule of
        the pruning methods (`graph.targets.select_projections`): a UserError when a regex
        matches nothing."""
        return select_projections(names, self.targets, self.ignore, where="recovery.lora.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the logical mesh axes; one of them may be -1 (all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):  # the rules every recipe mesh follows (recovery.mesh_config)
        mesh_config.check_sizes(dataclasses.asdict(self), "recovery.mesh")

    def resolve(self, device_count: int) -> dict[str, int]:
        """Axis sizes for `device_count` devices (UserError when they do not divide it)."""
        return mesh_config.resolve(dataclasses.asdict(self), device_count, "recovery.mesh")

    def describe(self) -> str:
        return mesh_config.describe(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    """A recovery run: what to train (kind), on what data, with which optimizer and mesh."""

    kind: str
    dataset: str = "c4"
    prompt_template: str = ""
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seqlen: int = 512
    lr: float = 1e-4
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    beta2: float = 0.95
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    compute_dtype: str = "float32"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 2
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    keep_best: bool = False
    distill: DistillConfig | None = None
    lora: LoRAConfig | None = None
    mesh: MeshConfig = MeshConfig()
    domains: dict[str, DomainSpec] | None = None
    stream: StreamConfig | None = None  # [recovery.stream]: documents streamed, not packed in memory
    dynamic: bool | None = None  # None: true with domains
    reference: Any = None  # [recovery.reference] or "initial-loss" (recovery.scaling_law)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError("recovery: " + _nearest(str(self.kind), KINDS, "recovery kind"))
        if not isinstance(self.dataset, str) or not self.dataset:
            raise UserError(f"recovery.dataset must be a name or a file, got {self.dataset!r}")
        if self.dataset not in DATASETS and not Path(self.dataset).suffix:
            raise UserError("recovery.dataset: " + _nearest(self.dataset, DATASETS, "dataset")
                            + " (or a file path)")
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise UserError("recovery.prompt_template: " + _nearest(
                str(self.prompt_template), [t for t in PROMPT_TEMPLATES if t], "template")
                + " (or \"\" for plain text)")
        if self.prompt_template and Path(self.dataset).suffix.lower() != ".jsonl":
            raise UserError(f"recovery.prompt_template = {self.prompt_template!r} reads a .jsonl "
                            f"file of instruction records; recovery.dataset is {self.dataset!r}")
        for name, minimum in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seqlen", 2),
                              ("warmup_steps", 0), ("seed", 0), ("eval_every", 0),
                              ("eval_batches", 0), ("checkpoint_every", 0),
                              ("keep_checkpoints", 1)):
            _check_int(f"recovery.{name}", getattr(self, name), minimum)
        _check_float("recovery.lr", self.lr, 0.0, strict=True)
        _check_float("recovery.min_lr_ratio", self.min_lr_ratio, 0.0, maximum=1.0)
        _check_float("recovery.weight_decay", self.weight_decay, 0.0)
        _check_float("recovery.beta2", self.beta2, 0.0, maximum=0.9999)
        if self.schedule not in SCHEDULES:
            raise UserError("recovery.schedule: " + _nearest(str(self.schedule), SCHEDULES,
                                                             "schedule"))
        if not isinstance(self.keep_best, bool):
            raise UserError(f"recovery.keep_best must be true or false, got {self.keep_best!r}")
        if self.keep_best and (self.eval_every < 1 or self.eval_batches < 1):
            raise UserError("recovery.keep_best needs held-out evaluations: eval_every >= 1 and "
                            "eval_batches >= 1")
        _check_float("recovery.clip_norm", self.clip_norm, 0.0)
        if self.compute_dtype not in DTYPES:
            raise UserError("recovery.compute_dtype: " + _nearest(str(self.compute_dtype), DTYPES,
                                                                  "dtype"))
        if self.batch_size % self.grad_accum:
            raise UserError(f"recovery.batch_size {self.batch_size} is not divisible by "
                            f"grad_accum {self.grad_accum}")
        if self.kind == "distill" and self.distill is None:
            object.__setattr__(self, "distill", DistillConfig())
        if self.kind == "lora" and self.lora is None:
            object.__setattr__(self, "lora", LoRAConfig())
        if self.distill is not None and self.kind != "distill":
            raise UserError(f"[recovery.distill] only applies to kind = 'distill' (kind is "
                            f"{self.kind!r})")
        if self.lora is not None and self.kind != "lora":
            raise UserError(f"[recovery.lora] only applies to kind = 'lora' (kind is {self.kind!r})")
        self._check_domains()
        if self.distill is not None and self.distill.teacher_correction_steps and self.domains:
            raise UserError("recovery.distill.teacher_correction_steps reads recovery.dataset; it "
                            "does not apply with [recovery.domains]")
        if self.stream is not None and (self.domains is not None or self.prompt_template):
            raise UserError("[recovery.stream] streams plain documents; it does not apply with "
                            "[recovery.domains] or prompt_template")
        from nnxprune.recovery.scaling_law import parse_reference  # dynamic loading's references

        object.__setattr__(self, "reference", parse_reference(self.reference, self.domains,
                                                              self.dynamic))

    def _check_domains(self) -> None:
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise UserError(f"recovery.dynamic must be true or false, got {self.dynamic!r}")
        if self.domains is None:
            if self.dynamic is not None:
                raise UserError("recovery.dynamic needs [recovery.domains.NAME] tables")
            return
        object.__setattr__(self, "domains", parse_domains(self.domains))
        if self.dynamic is None:
            object.__setattr__(self, "dynamic", True)
        if self.prompt_template:
            raise UserError("recovery.prompt_template does not apply to [recovery.domains]")
        if self.eval_every < 1 or self.eval_batches < 1:
            raise UserError("[recovery.domains] needs eval_every >= 1 and eval_batches >= 1: the "
                            "domains' held-out losses are measured every eval_every steps")

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> "RecoveryConfig":
        """Builds from a recipe's `[recovery]` table (UserError on any unknown key or bad value)."""
        if not isinstance(section, dict):
            raise UserError("[recovery] must be a table")
        section = dict(section)
        if "kind" not in section:
            raise UserError(f"[recovery] needs a 'kind' ({', '.join(KINDS)})")
        kind = section["kind"]
        if kind not in KINDS:
            raise UserError("recovery: " + _nearest(str(kind), KINDS, "recovery kind"))
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in section:
            if key not in fields:
                raise UserError("recovery: " + _nearest(key, fields, "key"))
        for name, sub in (("distill", DistillConfig), ("lora", LoRAConfig), ("mesh", MeshConfig),
                          ("stream", StreamConfig)):
            if name in section:
                section[name] = _build(sub, section[name], f"recovery.{name}")
        return cls(**section)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v is not None}

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def check(self, config, device_count: int | None = None) -> dict[str, int]:
        """Checks against the model's shapes and the devices; returns the mesh axis sizes.

        `config` is the `LlamaConfig` the recovery will train (after the pruning steps).
        """
        if device_count is None:
            import jax

            device_count = jax.device_count()
        sizes = self.mesh.resolve(device_count)
        batch_axes = sizes["data"] * sizes["fsdp"]
        if self.micro_batch % batch_axes:
            raise UserError(
                f"recovery: the micro-batch (batch_size {self.batch_size} / grad_accum "
                f"{self.grad_accum} = {self.micro_batch}) is not divisible by the data axis "
                f"(data {sizes['data']} x fsdp {sizes['fsdp']} = {batch_axes} devices)")
        if self.seqlen > config.max_position_embeddings:
            raise UserError(f"recovery.seqlen {self.seqlen} is beyond the model's context of "
                            f"{config.max_position_embeddings} tokens")
        if self.lora is not None:
            self.lora.select(layer_projection_names(config.num_layers))
        if self.prompt_template and Path(self.dataset).is_file():
            from nnxprune.data.training import read_instructions

            read_instructions(self.dataset)  # every record checked before any work
        if self.distill is not None:
            from nnxprune.recovery.pairs import check_points

            check_points(self.distill.pairs, config.num_layers, "student")
            for i in self.distill.hidden_layers:
                if i >= config.num_layers:
                    raise UserError(f"recovery.distill.hidden_layers: layer {i} does not exist "
                                    f"(the model has {config.num_layers} layers)")
        return sizes

    def check_teacher(self, student, teacher) -> None:
        """Distillation's teacher against the student (both `LlamaConfig`s, no weights needed):
        the same vocabulary, and for hidden-state MSE the same hidden size and enough layers."""
        if self.distill is None:
            return
        if student.vocab_size != teacher.vocab_size:
            raise UserError(f"the teacher's vocabulary ({teacher.vocab_size}) differs from the "
                            f"student's ({student.vocab_size}); distillation needs the same one")
        from nnxprune.recovery.pairs import check_points

        check_points(self.distill.pairs, teacher.num_layers, "teacher")
        if self.distill.hidden_layers:
            if student.hidden_size != teacher.hidden_size:
                raise UserError(f"recovery.distill.hidden_layers compares hidden states, which "
                                f"needs equal hidden sizes (student {student.hidden_size}, teacher "
                                f"{teacher.hidden_size})")
            bad = [i for i in self.distill.hidden_layers if i >= teacher.num_layers]
            if bad:
                raise UserError(f"recovery.distill.hidden_layers {bad} are beyond the teacher's "
                                f"{teacher.num_layers} layers")
