"""What a rerun reuses: importance statistics and the key of a pruning run (generated calibration text is
cached by :mod:`serve_pruned.compress.generation`).

Both live under the serve_pruned cache (``SERVE_PRUNED_CACHE``) and are keyed by what they depend on:
the source weights' fingerprint, the calibration text's, and the options that change the result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from serve_pruned.cache import cache_root
from serve_pruned.compress.progress import progress_bar
from serve_pruned.options import PackageOptions

Log = Callable[[str], None]


def cached_stats(model: Any, samples: Any, key: str, *, batch_size: int, ffn_order: bool, progress: bool,
                 log: Log) -> Any:
    """Importance statistics of the source model (a :class:`Streamed` one), from the cache when this key was
    collected before."""
    from safetensors.torch import load_file, save_file

    from serve_pruned.compress.importance import LayerStats, collect_stats

    path = cache_root() / "stats" / f"{key}.safetensors"
    if path.is_file():
        log(f"importance statistics: reusing {path}")
        return LayerStats.from_dict(load_file(path))
    with progress_bar(model.num_layers, "scoring (calibration pass)", progress, unit="layer") as bar:
        stats = collect_stats(model, samples, batch_size=batch_size, progress=bar, ffn_order=ffn_order)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(stats.to_dict(), str(tmp))
    tmp.replace(path)
    return stats


def stats_key(opts: PackageOptions, fingerprint: str, calib_fp: str, *, obs: bool) -> str:
    """Statistics depend on the weights, the text, how it is sampled and the precision (obs adds its FFN order).

    v2: the statistics hold the weight norms too; v3: and the hidden channels' squares at every norm."""
    return hashlib.sha256(
        f"{fingerprint}|{calib_fp}|{opts.num_samples}|{opts.seq_len}|{opts.seed}|"
        f"{opts.compute_dtype}|v3{'|obs' if obs else ''}".encode()).hexdigest()[:32]


def run_key(opts: PackageOptions, fingerprint: str, calib_fp: str) -> str:
    """Identifies the pruning + recovery a run does: every option but those marked as not affecting it
    (output, evaluation, quantization...), so a new option is part of the key unless it says otherwise."""
    body = opts.recovery_options()
    # v2: a step's model is a sharded folder (step-K/model), no longer step-K/model.safetensors; v3: a step's
    # done.json holds the shape's hidden size
    return hashlib.sha256(f"{fingerprint}|{calib_fp}|{json.dumps(body, sort_keys=True)}|v3".encode()).hexdigest()[:24]
