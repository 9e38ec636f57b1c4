"""The memory plan: each stage's predicted peak host and device bytes, before any weight is loaded (torch-free).

A stage's peak is the process's own baseline (the libraries, measured: see ``BASELINE_BYTES``) plus what the
stage holds at its widest point: one decoder layer onloaded (two in the refit: the original's and the pruned
one's), the calibration hidden states carried from layer to layer, the statistics it gathers, the embedding or
the head with a batch of logits, llmcompressor's Hessians, or (distillation, which is not streamed) student,
teacher, gradients and optimizer state whole. Each term is named, so a refusal can say what to change.
On an accelerator the weights and activations go to the device; the host keeps the baseline and what is
read from disk on its way there.

``--max-memory`` is checked against these numbers up front (:meth:`MemoryPlan.check`); the quantize stage
fits any host limit above its other terms, because weights beyond it stay on disk (it is planned to fill
``HEADROOM`` of the limit; without one, up to the streamed stages' peak, so the run's peak does not grow with
the depth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve_pruned.compress.shards import OUTPUT_SHARD_BYTES
from serve_pruned.errors import UsageError
from serve_pruned.model.shapes import Shape
from serve_pruned.options import MemoryLimit, PackageOptions

# The process before any weight is read: Python, torch, transformers and llmcompressor imported, the tokenizer
# loaded. Measured as the "load" stage's peak RSS on this machine kind (docs/benchmarks.md, scale section).
BASELINE_BYTES = int(0.45 * 2**30)
# On an accelerator the process also maps its runtime (CUDA's context and libraries): measured as the load stage's
# peak RSS on an H200, 0.96 GiB against 0.42 on the CPU (docs/benchmarks.md, gpu-package-8b).
ACCELERATOR_RUNTIME = "accelerator runtime"
ACCELERATOR_RUNTIME_BYTES = int(0.5 * 2**30)
# The terms that are weights read from disk: on an accelerator they pass through the host on their way there.
READ_FROM_DISK = ("layer", "embedding", "head")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30
# The share of a host limit that named terms may fill: the rest is for what no term names (the allocator's slack,
# llmcompressor's bookkeeping), so a stage that fills its share (quantization, holding weights) stays under it.
HEADROOM = 0.9

PROCESS = "the process itself"
# What to change when a term is too big, by term.
_REMEDIES = {
    PROCESS: "give it more memory: Python and the libraries take this before a weight is read",
    ACCELERATOR_RUNTIME: "give it more memory: the accelerator's runtime takes this before a weight is read",
    "layer": "run on an accelerator (--device cuda), or give more memory: one decoder layer is the least a "
             "stage holds",
    "hidden states": "fewer --num-samples or a shorter --seq-len",
    "eval hidden states": "fewer --eval-max-tokens",
    "logits": "a smaller --batch-size",
    "embedding": "run on an accelerator (--device cuda), or give more memory: a stage reads the embedding whole",
    "head": "run on an accelerator (--device cuda), or give more memory: a stage reads the head whole",
    "statistics": "--scorer activation (obs collects FFN Gram matrices)",
    "Gram matrices": "--no-refit, or run on an accelerator",
    "Hessians": "run on an accelerator (--device cuda)",
    "student + teacher": "--distill-steps 0 (distillation holds both models whole)",
    "optimizer": "--distill-steps 0 (distillation holds both models whole)",
}


@dataclass(frozen=True)
class StageMemory:
    """One stage's predicted peak: named terms on the host and on the device, in bytes."""

    stage: str
    host: dict[str, int] = field(default_factory=dict)
    device: dict[str, int] = field(default_factory=dict)

    @property
    def host_bytes(self) -> int:
        return BASELINE_BYTES + sum(self.host.values())

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())

    def terms(self, where: str) -> dict[str, int]:
        """The named parts of the peak on ``where`` (host: the process's own baseline is one of them)."""
        return {PROCESS: BASELINE_BYTES, **self.host} if where == "host" else dict(self.device)

    def largest(self, where: str) -> str:
        terms = self.terms(where)
        return max(terms, key=lambda k: terms[k]) if terms else "layer"


@dataclass(frozen=True)
class MemoryPlan:
    """Every stage this run will go through, in order, with its predicted peak."""

    stages: tuple[StageMemory, ...]
    on_device: bool
    # how much of the pruned weights quantization may hold in host memory (None: no host limit, all of them)
    quantize_host_bytes: int | None = None
    # the source model whole in this process, in the compute dtype (what in-process text generation loads)
    whole_model_bytes: int = 0
    compute_dtype: str = "bfloat16"

    def stage(self, name: str) -> StageMemory:
        return next(s for s in self.stages if s.stage == name)

    @property
    def peak_host_bytes(self) -> int:
        return max(s.host_bytes for s in self.stages)

    @property
    def peak_device_bytes(self) -> int:
        return max(s.device_bytes for s in self.stages)

    def check(self, limit: MemoryLimit) -> None:
        """Refuse, naming the first stage that would pass ``limit``, its largest term and what to change.

        Raises:
            UsageError: a stage's predicted peak passes the host or the device limit.
        """
        for s in self.stages:
            for where, bound, need in (("host", limit.host, s.host_bytes), ("device", limit.device, s.device_bytes)):
                if bound is not None and need > bound:
                    term = s.largest(where)
                    raise UsageError(
                        f"--max-memory: the {s.stage} stage needs about {need / GIB:.2f} GiB of {where} memory, "
                        f"more than the {bound / GIB:.2f} GiB allowed (its largest part: {term}, "
                        f"{s.terms(where)[term] / GIB:.2f} GiB)",
                        hint=self._remedy(term))

    def _remedy(self, term: str) -> str:
        if self.compute_dtype == "float32" and term in ("layer", "embedding", "head", "hidden states"):
            return "--compute-dtype bfloat16 halves it"
        return _REMEDIES.get(term, "give the stage more memory")

    def whole_model_refused(self, limit: MemoryLimit) -> str | None:
        """Why the whole source model may not be loaded in this process (it passes the host limit), or None."""
        if limit.host is None or self.whole_model_bytes <= limit.host:
            return None
        return (f"the whole model takes about {self.whole_model_bytes / GIB:.2f} GiB, more than --max-memory's "
                f"{limit.host / GIB:.2f} GiB")

    def lines(self) -> list[str]:
        where = "device" if self.on_device else "host"
        out = [f"memory plan (predicted peak per stage; {where} holds the weights and activations):"]
        for s in self.stages:
            terms = s.device if self.on_device else s.host
            top = sorted(terms.items(), key=lambda kv: -kv[1])[:3]
            size = s.device_bytes if self.on_device else s.host_bytes
            extra = f", host {s.host_bytes / GIB:.2f} GiB" if self.on_device else ""
            out.append(f"  {s.stage:<9} {size / GIB:6.2f} GiB{extra}  ("
                       + ", ".join(f"{k} {v / GIB:.2f}" for k, v in top) + ")")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"host_gib": {s.stage: round(s.host_bytes / GIB, 3) for s in self.stages},
                "device_gib": {s.stage: round(s.device_bytes / GIB, 3) for s in self.stages},
                "baseline_gib": round(BASELINE_BYTES / GIB, 3)}


@dataclass(frozen=True)
class _Sizes:
    """The sizes every term is built from."""

    shape: Shape  # the source's
    hidden: int
    vocab: int
    tied: bool
    compute: int  # bytes per element in the compute dtype
    save: int  # bytes per element in the save dtype
    kept: float  # fraction of the FFN and attention widths kept (an upper bound until the search has chosen)

    def layer(self, fraction: float = 1.0) -> int:
        s, h = self.shape, self.hidden
        attn = h * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads)
        mlp = 3 * h * s.intermediate_size
        return int((attn + mlp) * fraction)

    @property
    def largest_tensor(self) -> int:  # an FFN projection: parameters
        return self.hidden * max(self.shape.intermediate_size, self.shape.head_dim * self.shape.num_heads)

    @property
    def table(self) -> int:  # the embedding (or an untied head): parameters
        return self.vocab * self.hidden


def plan_memory(opts: PackageOptions, *, before: Shape, config: dict[str, Any], total_params: int,
                save_dtype: str, has_eval: bool, on_device: bool, scorer: str) -> MemoryPlan:
    """The memory plan of one ``package`` run with ``opts`` on the source ``before``.

    llmcompressor holds as much of the pruned weights in host memory while it quantizes as the host limit, or
    without one the streamed stages' peak, leaves (:func:`_hold_while_quantizing`); the rest stays on disk.
    """
    hidden = int(config["hidden_size"])
    vocab = int(config["vocab_size"])
    tied = bool(config.get("tie_word_embeddings", False))
    kept = opts.target_params if opts.target_params is not None else 1.0
    z = _Sizes(before, hidden, vocab, tied, DTYPE_BYTES[opts.compute_dtype], DTYPE_BYTES.get(save_dtype, 4), kept)
    c = z.compute
    n, seq, b = opts.num_samples, opts.seq_len, opts.batch_size
    calib = opts.calib and (opts.prunes or opts.quant not in ("none", "fp8"))
    hidden_states = 2 * n * seq * hidden * c if calib else 0  # a layer's inputs and outputs, every sample
    ffn_act = 3 * b * seq * before.intermediate_size * c  # gate, up and their product for one batch
    stages: list[StageMemory] = []

    def eval_stage(name: str, fraction: float) -> StageMemory:
        tokens = min(opts.eval_max_tokens, 10**9)
        return StageMemory(name, **_place(on_device, {
            "layer": z.layer(fraction) * c, "eval hidden states": 2 * tokens * hidden * c,
            "head": z.table * c, "logits": 2 * b * opts.eval_seq_len * vocab * 4}))

    if opts.prunes and calib:
        ffn = before.intermediate_size
        # obs: the float32 Gram matrix of a layer's down_proj input, then its elimination beside it: two float64
        # [F, F] matrices at a time and the float64 weight with its compacted copy (measured: 2.2x one float64
        # [F, F] matrix at F = 5632 beside the Gram matrix)
        stats = 4 * ffn ** 2 + 2 * 8 * ffn ** 2 + 12 * hidden * ffn if scorer == "obs" else 0
        stages.append(StageMemory("score", **_place(on_device, {
            "layer": z.layer() * c, "hidden states": hidden_states, "activations": ffn_act,
            "statistics": stats, "embedding": z.table * c})))
    if has_eval:
        stages.append(eval_stage("eval", 1.0))
    if opts.prunes:
        search = 2 * min(opts.search_samples, n) * seq * hidden * c
        stages.append(StageMemory("prune", **_place(on_device, {
            # a candidate's layer, sliced as stored before it is cast, so the one tensor being sliced is in the
            # stored dtype and only the kept part of the layer is in the compute dtype
            "layer": z.layer(kept) * c + z.largest_tensor * z.save,
            "hidden states": search, "head": z.table * c,
            # the logits, the shifted copy log_softmax reads, and its output
            "logits": 3 * min(b, opts.search_samples) * seq * vocab * 4})))
        if opts.recover and opts.refit and calib:
            wide = max(int(before.intermediate_size * kept), before.num_heads * before.head_dim)
            stages.append(StageMemory("refit", **_place(on_device, {
                "layer": z.layer() * c + z.layer(kept) * c, "hidden states": 2 * hidden_states,
                "activations": ffn_act,
                # float64 Gram and cross-covariance of the widest refit input (FFN or attention output, one at
                # a time), the solve's factorized copy and its solution
                "Gram matrices": 8 * (2 * wide ** 2 + 2 * wide * hidden)})))
        if opts.distills:
            student = int(total_params * kept)
            dbytes = 4 if opts.distill_dtype in ("auto", "float32") else 2
            tokens = opts.distill_batch_size * opts.distill_seq_len
            stages.append(StageMemory("distill", **_place(on_device, {
                "student + teacher": student * 4 + total_params * c,
                "optimizer": student * (4 + 2 * dbytes),  # gradients and AdamW's two moments
                "activations": tokens * (before.num_layers * hidden * 16 * c + 3 * vocab * 4)})))
    weights = int(total_params * kept) * z.save
    if opts.quant != "none":
        in_widths = 5 * hidden ** 2 + (before.num_heads * before.head_dim) ** 2 + int(
            before.intermediate_size * kept) ** 2
        stages.append(StageMemory("quantize", **_place(on_device, {
            "layer": z.layer(kept) * z.save * 2,  # onloaded, and its quantized copy
            "hidden states": 2 * n * seq * hidden * z.save if opts.quant != "fp8" else 0,
            "Hessians": 4 * in_widths if opts.quant != "fp8" else 0})))
    # quantized, the output is written from the weights llmcompressor holds (its "weights" term, added below)
    # and a shard's worth read back from disk; unquantized, from the streamed layers and the tables
    tables = {} if opts.quant != "none" else {"embedding": z.table * z.save * (1 if tied else 2)}
    stages.append(StageMemory("write", **_place(on_device, {
        "layer": z.layer(kept) * z.save, "shard": min(weights, OUTPUT_SHARD_BYTES), **tables}, weights_stay=True)))
    quantize_host = _hold_while_quantizing(stages, weights, opts.memory_limit.host, on_device=on_device) \
        if opts.quant != "none" else None
    return MemoryPlan(tuple(stages), on_device=on_device, quantize_host_bytes=quantize_host,
                      whole_model_bytes=BASELINE_BYTES + total_params * c, compute_dtype=opts.compute_dtype)


def _hold_while_quantizing(stages: list[StageMemory], weights: int, host_limit: int | None, *,
                           on_device: bool) -> int | None:
    """How much of the pruned weights llmcompressor holds in host memory while it quantizes, while the quantized
    model is evaluated and while it is written (None: all of them); what is not held stays on disk. The amount
    becomes those stages' "weights" term.

    The write stage holds them too: transformers loads the held weights memory-mapped from the checkpoint, and
    saving reads every page of them, so they count in its peak beside the shard it writes (measured: the scale
    section of docs/benchmarks.md).

    Under a host limit: what ``HEADROOM`` of it leaves beside the stages' other terms. Without one, on the host:
    what the streamed stages' peak leaves beside quantization's other terms, so quantization never raises the
    run's peak (holding every weight would make the peak grow with the depth, which streaming is for); the write
    stage then adds its shard to them. On a device with no host limit, all of them: the host is not where the
    weights are worked on.
    """
    holding = [st for st in stages if st.stage in ("quantize", "eval", "write")]
    others = max(st.host_bytes for st in holding if st.stage != "write")
    if host_limit is not None:
        held: int | None = min(weights, max(0, int(HEADROOM * host_limit) - max(st.host_bytes for st in holding)))
    elif not on_device:
        # the stages before quantization: their peak does not grow with the depth (the write stage's shard does,
        # up to its cap, so it does not count)
        streamed_peak = max((st.host_bytes for st in stages if st not in holding), default=others)
        held = min(weights, max(0, streamed_peak - others))
    else:
        held = None
    for st in holding:
        st.host["weights"] = weights if held is None else held
    return held


def _place(on_device: bool, terms: dict[str, int], *, weights_stay: bool = False) -> dict[str, Any]:
    """Terms on the host, or on the device: the host then holds the accelerator's runtime and what passes through
    it on the way there, the largest of the weights read from disk (what is computed on the device, statistics and
    activations, never is on the host)."""
    terms = {k: int(v) for k, v in terms.items() if v}
    if not on_device:
        return {"host": terms}
    runtime = {ACCELERATOR_RUNTIME: ACCELERATOR_RUNTIME_BYTES}
    if weights_stay:
        return {"host": {**runtime, **terms}}
    return {"device": terms, "host": {**runtime, "staging": max((terms.get(k, 0) for k in READ_FROM_DISK), default=0)}}
