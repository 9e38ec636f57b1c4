"""Calibration and evaluation text: files, folders, jsonl, or a `datasets` name; deterministic samples."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_pruned.errors import CalibrationDataError, DatasetUnavailableError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst")


@dataclass
class TextSource:
    """One named body of text (a file, a folder of files, or a dataset split)."""

    name: str
    docs: list[str]
    generate: int = 0  # ``generated:N``: N continuations the original model writes (filled in after loading)

    @property
    def chars(self) -> int:
        return sum(len(d) for d in self.docs)


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text, a stray bad byte replaced; a file that is mostly not UTF-8 text (binary, another encoding)
    is refused, since its replacement characters would be scored and pruned on as if they were language."""
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if b"\x00" in data[:1 << 16] or bad > max(8, len(text) // 100):
        raise CalibrationDataError(
            f"{path} is not UTF-8 text (binary data, or another encoding: {bad} of its {len(text)} characters "
            "do not decode)", path=str(path), hint="pass plain UTF-8 text files (convert others with iconv)")
    return text


def _read_file(path: Path, text_field: str) -> list[str]:
    try:
        raw = _decode(path, path.read_bytes())
    except OSError as exc:
        raise CalibrationDataError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(
                    f"{path}:{lineno} is not valid JSON ({exc.msg})", path=str(path),
                    hint="each line of a .jsonl file must be an object with a text field") from exc
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise CalibrationDataError(
                    f"{path}:{lineno} has no string field {text_field!r}", path=str(path),
                    hint="set --text-field to the field that holds the text")
            docs.append(row[text_field])
        return docs
    return [raw]


def _load_dataset(name: str, text_field: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise DatasetUnavailableError(name, "the `datasets` package is not installed") from exc
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types when offline; all mean "not available"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetUnavailableError(name, reason[:200]) from exc
    if text_field not in ds.column_names:
        raise CalibrationDataError(f"dataset {name} has no column {text_field!r} (has {ds.column_names})",
                                   path=name, hint="set --text-field")
    return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]


def read_source(spec: str, *, text_field: str = "text", split: str = "train") -> TextSource:
    """Read one source: a .txt/.md/.rst file, a .jsonl file, a folder of those, or ``hf:NAME``/``owner/name``."""
    path = Path(spec).expanduser()
    if spec.startswith("generated:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise CalibrationDataError(f"{spec}: the number of generated samples must be a positive integer",
                                       path=spec, hint="e.g. --calib generated:64")
        return TextSource(spec, [], generate=int(count))
    if spec.startswith("hf:"):
        return TextSource(spec, _load_dataset(spec[3:], text_field, split))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES + (".jsonl",)
                                                                      or p.name.endswith(".rst.txt")))
        if not files:
            raise CalibrationDataError(f"folder {path} has no .txt/.md/.rst/.jsonl files", path=str(path))
        docs = [d for f in files for d in _read_file(f, text_field)]
        source = TextSource(str(path), docs)
    elif path.is_file():
        source = TextSource(str(path), _read_file(path, text_field))
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return TextSource(spec, _load_dataset(spec, text_field, split))
    else:
        raise CalibrationDataError(f"calibration/evaluation text {spec} does not exist", path=spec,
                                   hint="pass a .txt/.jsonl file, a folder of them, or hf:DATASET")
    if not any(d.strip() for d in source.docs):
        raise CalibrationDataError(f"{spec} holds no text", path=spec, hint="pass a file with some prose in it")
    return source


def read_sources(specs: list[str] | tuple[str, ...], *, text_field: str = "text") -> list[TextSource]:
    if not specs:
        raise CalibrationDataError("no calibration text given", path="",
                                   hint="pass --calib FILE (repeat it to mix sources)")
    return [read_source(s, text_field=text_field) for s in specs]


def fingerprint_sources(sources: list[TextSource]) -> str:
    h = hashlib.sha256()
    for s in sources:
        for d in s.docs:
            h.update(hashlib.sha256(d.encode()).digest())
        h.update(b"\x00source\x00")
    return h.hexdigest()


def _tokenize(tokenizer: Any, docs: list[str]) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        if not d.strip():
            continue
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return ids


def calibration_samples(
    tokenizer: Any,
    sources: list[TextSource],
    *,
    num_samples: int,
    seq_len: int,
    seed: int,
) -> Any:
    """``num_samples`` windows of ``seq_len`` tokens, drawn evenly from every source, deterministic.

    Each source is tokenized and cut into non-overlapping windows; windows are shuffled with ``seed``
    and taken round-robin over sources so a mix of sources stays a mix.

    Returns:
        A LongTensor of shape (n, seq_len), n <= num_samples.
    """
    import torch

    if num_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"need at least 1 sample of 2 tokens (got {num_samples} x {seq_len})",
                                   path="", hint="raise --num-samples / --seq-len")
    rng = random.Random(seed)
    pools: list[list[list[int]]] = []
    for s in sources:
        ids = _tokenize(tokenizer, s.docs)
        windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        if not windows:
            raise CalibrationDataError(
                f"{s.name} is too short: {len(ids)} tokens, one sample needs {seq_len}",
                path=s.name, hint="add more text or lower --seq-len")
        rng.shuffle(windows)
        pools.append(windows)
    picked: list[list[int]] = []
    while len(picked) < num_samples and any(pools):
        for pool in pools:
            if pool and len(picked) < num_samples:
                picked.append(pool.pop())
    if len(picked) < num_samples:
        log.warning("only %d calibration samples of %d tokens available (asked for %d)",
                    len(picked), seq_len, num_samples)
    return torch.tensor(picked, dtype=torch.long)


def eval_tokens(tokenizer: Any, sources: list[TextSource], *, max_tokens: int | None) -> list[int]:
    """All evaluation text as one token stream (capped at ``max_tokens``)."""
    ids: list[int] = []
    for s in sources:
        ids.extend(_tokenize(tokenizer, s.docs))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise CalibrationDataError("evaluation text has fewer than 2 tokens", path=",".join(s.name for s in sources))
    return ids


# Facts a small instruct model knows; a pruned model that still continues them like the original has
# kept more than the calibration domain.
FACT_PROMPTS = (
    "The capital of France is",
    "The largest planet in our solar system is",
    "Water is made of hydrogen and",
    "The first president of the United States was",
    "The chemical symbol for gold is",
    "The Great Wall is in",
    "A week has seven days. The day after Monday is",
    "The opposite of hot is",
)


# Openings across everyday domains: the original model's own continuations of them are calibration
# text that keeps what it knows beyond the user's domain (general prose, facts), with no dataset needed.
GENERATION_PROMPTS = (
    "The history of the Roman Empire", "Photosynthesis is the process", "The best way to cook rice is",
    "In the year 1969, astronauts", "The human heart has four chambers", "Paris is the capital of France and",
    "A healthy breakfast usually includes", "The theory of evolution explains", "Football is played by two teams",
    "The Amazon rainforest is home to", "To write a good essay, you should", "The moon orbits the Earth",
    "Mount Everest is the highest", "Shakespeare wrote many plays, including", "Electricity flows through",
    "The United Nations was founded", "Dogs have been companions to humans", "The stock market is a place where",
    "Climate change refers to", "Music has been part of human culture", "The Pacific Ocean is the largest",
    "A computer program is a set of instructions", "The French Revolution began in", "Vitamins are nutrients that",
    "The Great Wall of China was built", "Learning a new language takes", "Volcanoes form when",
    "The solar system consists of the Sun and", "Once upon a time, in a small village,", "Dear friend, I am writing to",
    "The recipe for a simple tomato soup", "Bees are important because",
)


def generation_prompts(count: int) -> list[str]:
    """The prompt of each of ``count`` generated texts: :data:`GENERATION_PROMPTS` in turn."""
    return [GENERATION_PROMPTS[i % len(GENERATION_PROMPTS)] for i in range(count)]


def generate_texts(model: Any, tokenizer: Any, count: int, *, max_new_tokens: int, seed: int,
                   temperature: float = 0.8, top_p: float = 0.95, batch_size: int = 32,
                   progress: Any = None) -> list[str]:
    """``count`` sampled continuations of :func:`generation_prompts`, in this process (transformers).

    Decoding a small model on a CPU is bound by reading the weights once per step, so a wide batch costs
    little more per step than a narrow one.
    """
    import torch

    torch.manual_seed(seed)
    prompts = generation_prompts(count)
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts: list[str] = []
    try:
        for i in range(0, count, batch_size):
            batch = prompts[i : i + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            for prompt, row in zip(batch, out[:, enc["input_ids"].shape[1] :], strict=True):
                texts.append(prompt + tokenizer.decode(row, skip_special_tokens=True))
            if progress is not None:
                progress.update(len(batch))
    finally:
        tokenizer.padding_side = side
        tokenizer.pad_token = pad
    return texts
