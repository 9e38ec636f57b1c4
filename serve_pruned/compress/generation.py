"""Generated calibration text (``--calib generated:N``): the original model's own continuations, cached.

Generation runs every layer for every token, so unlike the other stages it cannot stream layer by layer. It
runs in vLLM from the serving environment when there is one: the model whole in vLLM's own process (on the
accelerator where there is one), every prompt batched by its scheduler, nothing of it held here. Without a
serving environment, or when vLLM cannot start on the model, it runs in this process with transformers'
``generate`` on the whole model, which only a model that fits can do: under ``--max-memory`` the whole
model must fit the host limit, or the run stops with what to do before the model is loaded.

The texts are cached by the source's fingerprint, the count, the length, the seed and the backend that wrote
them; a rerun reuses whichever backend's texts are there, so it never needs the model again (vLLM seeds each text,
but how its requests batch can move its floats, so only the cache makes a rerun's texts the same).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_pruned.cache import cache_root
from serve_pruned.compress.progress import progress_bar
from serve_pruned.errors import ServingEnvironmentError, VLLMStartError

Log = Callable[[str], None]
BACKENDS = ("vllm", "transformers")  # in the order they are tried (and their caches looked up)
TEMPERATURE, TOP_P = 0.8, 0.95  # both backends sample alike


@dataclass(frozen=True)
class GenerationJob:
    """What to generate, from which model."""

    folder: Path  # the source model's resolved folder (what vLLM serves)
    config: dict[str, Any]
    count: int
    seq_len: int  # new tokens per text
    seed: int
    fingerprint: str
    trust_remote_code: bool = False

    def cache_path(self, backend: str) -> Path:
        return (cache_root() / "generated"
                / f"{self.fingerprint[:24]}-{self.count}x{self.seq_len}-s{self.seed}-{backend}.json")


def generated_texts(job: GenerationJob, *, load_whole: Callable[[], Any], tokenizer: Any,
                    in_process_refused: str | None = None, progress: bool, log: Log) -> list[str]:
    """The ``generated:N`` texts of ``job``: cached, else through vLLM, else in this process.

    ``load_whole`` loads the whole original model (the in-process path only). ``in_process_refused`` says why the
    in-process path may not run (the whole model passes ``--max-memory``), or is None.

    Raises:
        ServingEnvironmentError: no vLLM could generate and the in-process path is refused.
    """
    from serve_pruned.atomic import atomic_write_text

    for backend in BACKENDS:
        path = job.cache_path(backend)
        if path.is_file():
            log(f"generated calibration text: reusing {path}")
            return list(json.loads(path.read_text()))
    try:
        texts, backend = _through_vllm(job, progress=progress, log=log), "vllm"
    except (ServingEnvironmentError, VLLMStartError) as exc:
        if in_process_refused is not None:
            raise ServingEnvironmentError(
                f"generated:{job.count} needs vLLM for this model ({exc.message}), and it cannot run in this "
                f"process: {in_process_refused}",
                hint=f"{exc.hint}; or raise --max-memory, or calibrate on text files only") from exc
        log(f"generated calibration text: not through vLLM ({exc.message}); in this process, the whole model "
            "loaded")
        texts, backend = _in_process(job, load_whole(), tokenizer, progress=progress), "transformers"
    path = job.cache_path(backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(texts))
    return texts


def _through_vllm(job: GenerationJob, *, progress: bool, log: Log) -> list[str]:
    """Every text sampled by a vLLM server on the source folder, started for this and stopped after."""
    from serve_pruned.compress.data import generation_prompts
    from serve_pruned.serving.vllm import VLLMServer, find_serve_python, free_port, serve_dtype

    python = find_serve_python()  # raises ServingEnvironmentError when there is none
    prompts = generation_prompts(job.count)
    args = ["--max-num-seqs", "32", *(["--trust-remote-code"] if job.trust_remote_code else [])]
    server = VLLMServer(str(job.folder), free_port(), serve_python=python, dtype=serve_dtype(job.config),
                        max_model_len=job.seq_len + 64, args=args)
    log(f"generating {job.count} calibration texts through vLLM ({python})")
    server.start(timeout=1800)

    def one(i: int) -> str:
        # a seed per text: prompts repeat once there are more texts than prompts, their samples must not
        out = server.post("/v1/completions", {
            "model": server.model, "prompt": prompts[i], "max_tokens": job.seq_len, "min_tokens": job.seq_len,
            "temperature": TEMPERATURE, "top_p": TOP_P, "seed": job.seed * 1_000_003 + i}, timeout=3600)
        bar.update(1)
        return prompts[i] + out["choices"][0]["text"]

    try:
        with progress_bar(job.count, f"generating {job.count} calibration texts (vLLM)", progress) as bar, \
                ThreadPoolExecutor(32) as pool:
            return list(pool.map(one, range(job.count)))
    finally:
        server.stop()


def _in_process(job: GenerationJob, model: Any, tokenizer: Any, *, progress: bool) -> list[str]:
    from serve_pruned.compress.data import generate_texts

    with progress_bar(job.count, f"generating {job.count} calibration texts with the original model", progress) as bar:
        return generate_texts(model, tokenizer, job.count, max_new_tokens=job.seq_len, seed=job.seed,
                              temperature=TEMPERATURE, top_p=TOP_P, progress=bar)
