"""One error hierarchy for serve_pruned.

Every error carries a one-line ``message`` (what failed and why) and a ``hint`` (what to run next).
Each also subclasses the builtin a caller would naturally catch (ValueError, FileNotFoundError, ...),
so library users are not forced to import our types. The CLI prints ``error: <message>; <hint>`` on
one line and exits 1; no traceback unless ``SERVE_PRUNED_DEBUG=1``.
"""

from __future__ import annotations


class ServePrunedError(Exception):
    """Base class of every error serve_pruned raises on purpose."""

    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class UsageError(ServePrunedError, ValueError):
    """Options that cannot work together, or a value outside its range."""


class InvalidTargetError(UsageError):
    """A pruning target that cannot be met (outside (0, 1), already met, or below the smallest shape)."""

    def __init__(self, message: str, *, field: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


class GQAGroupingError(UsageError):
    """Head counts that would break grouped-query attention (uneven groups)."""

    def __init__(self, message: str, *, field: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


class UnsupportedArchitectureError(ServePrunedError, ValueError):
    """The model's architecture is not one we can prune into a stock-vLLM checkpoint."""

    def __init__(self, architecture: str, supported: list[str]) -> None:
        super().__init__(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported)}",
            hint="see the support table in README.md, or open an issue with the model's config.json",
        )
        self.architecture = architecture
        self.supported = supported


class ModelLoadError(ServePrunedError, OSError):
    """The model folder or Hub id could not be read."""

    def __init__(self, message: str, *, path: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class MissingWeightsError(ModelLoadError, FileNotFoundError):
    """No safetensors weights, or a shard named by the index is missing."""

    default_hint = "convert the checkpoint to safetensors (save_pretrained(safe_serialization=True))"


class CorruptWeightsError(ModelLoadError):
    """A safetensors file is truncated or its header is unreadable."""

    default_hint = "re-download or re-save the model; the file on disk is damaged"


class RemoteCodeRefusedError(ServePrunedError, PermissionError):
    """The model needs code from its repository and the user did not allow it."""

    def __init__(self, repo: str) -> None:
        super().__init__(
            f"{repo} needs custom code from its repository (auto_map in config.json) and remote code is off",
            hint="read that code, then pass --trust-remote-code if you trust it",
        )
        self.repo = repo


class CalibrationDataError(ServePrunedError, ValueError):
    """Calibration or evaluation text that is missing, empty or too short."""

    def __init__(self, message: str, *, path: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class DatasetUnavailableError(ServePrunedError, ConnectionError):
    """A `datasets` name was given but the Hub cannot be reached (offline)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"calibration dataset {name!r} could not be loaded: {reason}",
            hint="pass a local .txt or .jsonl file with --calib, or run where the Hub is reachable",
        )
        self.name = name


class OutputExistsError(ServePrunedError, FileExistsError):
    """The output exists and --overwrite was not given."""

    def __init__(self, path: str, *, kind: str = "folder") -> None:
        super().__init__(
            f"output {kind} {path} already exists",
            hint="pass --overwrite to replace it (it is only replaced after the new output is complete)",
        )
        self.path = path


class OutputNotOwnedError(ServePrunedError, FileExistsError):
    """The output exists and holds something this command did not write: it is never replaced."""

    def __init__(self, path: str, what: str, foreign: list[str], *, kind: str | None = None) -> None:
        if kind is not None:
            message = f"{path} is {kind}; the output is a {what}"
        else:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            message = f"{path} holds files that are not a {what} this tool wrote ({shown}); nothing was changed"
        super().__init__(message, hint="choose another output path (this one is never replaced, even with "
                                       "--overwrite), or move its contents away first")
        self.path = path
        self.foreign = foreign


class ManifestError(ServePrunedError, ValueError):
    """A folder without a readable serve_pruned.json manifest, or one that fails verification."""

    def __init__(self, message: str, *, path: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class ServingEnvironmentError(ServePrunedError, FileNotFoundError):
    """The serving virtual environment (vLLM) is missing or broken."""

    default_hint = "run `make setup-serve` (or set SERVE_PRUNED_SERVE_PYTHON to a Python that has vLLM)"


class MissingExtraError(ServePrunedError, ImportError):
    """A heavy optional dependency (torch, transformers, llmcompressor) is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this command needs {module!r}, which is not installed",
            hint=f"pip install 'serve-pruned[{extra}]' (or run `make setup`)",
        )
        self.module = module


class VLLMStartError(ServePrunedError, RuntimeError):
    """A vLLM server did not come up; the reason is taken from its log."""

    def __init__(self, message: str, *, log_path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.log_path = log_path


class HubError(ServePrunedError, OSError):
    """Talking to the Hugging Face Hub (or a mirror) failed."""

    def __init__(self, message: str, *, repo_id: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.repo_id = repo_id


class HubAuthError(HubError, PermissionError):
    """The Hub refused the token (401/403)."""

    default_hint = ("set HF_TOKEN (or pass --token) to a token with access to this repo; "
                    "a push needs write access")


class HubRepoNotFoundError(HubError, LookupError):
    """The repo, or the revision asked for, does not exist (or is private)."""


class ChecksumMismatchError(ServePrunedError, ValueError):
    """Downloaded files differ from the sha256 the manifest records."""

    def __init__(self, files: list[str], *, repo_id: str, revision: str) -> None:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        super().__init__(
            f"{repo_id}@{revision}: {shown} do(es) not match the sha256 in serve_pruned.json; nothing was kept",
            hint="the repo or a mirror serves altered files; re-push from a verified package, or check HF_ENDPOINT",
        )
        self.files = files
        self.repo_id = repo_id


class QualityGuardError(ServePrunedError, ValueError):
    """No candidate compression kept within --max-ppl-ratio (and --min-fact-agreement); nothing was written."""

    def __init__(self, guard: str, frontier: list[str]) -> None:
        super().__init__(f"no candidate kept {guard}; measured: " + "; ".join(frontier) + "; nothing was written",
                         hint="loosen --max-ppl-ratio, add weaker --guard-fractions (closer to 1, e.g. 0.95), recover "
                              "more (--distill-steps), or quantize less (w4a16 -> w8a8 -> --quant none)")
        self.guard = guard
        self.frontier = frontier


class OptionError(UsageError):
    """An option (CLI flag or recipe key) that is unknown, out of range, or impossible with another one."""

    def __init__(self, message: str, *, field: str, source: str | None = None, hint: str | None = None) -> None:
        if source and source.startswith("--"):  # the flag names the field
            where = f"{source}: "
        else:
            where = f"{source}: {field}: " if source else f"{field}: "
        super().__init__(f"{where}{message}", hint=hint)
        self.field = field
        self.source = source


class ManifestCheckError(ServePrunedError, ValueError):
    """Kubernetes manifests that break a rule linters miss (GPU limit != request, no /dev/shm, bytes over budget)."""

    def __init__(self, findings: list[str], *, hint: str | None = None) -> None:
        shown = "; ".join(findings[:3]) + (f" (and {len(findings) - 3} more)" if len(findings) > 3 else "")
        super().__init__(f"{len(findings)} manifest check(s) failed: {shown}",
                         hint=hint if hint is not None else "fix the spec (or the chart values) and render again")
        self.findings = findings


class KubectlError(ServePrunedError, RuntimeError):
    """kubectl is missing, no cluster answers, or the API server refused the objects."""

    def __init__(self, message: str, *, argv: list[str], returncode: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv
        self.returncode = returncode


def yaml_problem(exc: Exception) -> str:
    """A PyYAML error as one phrase (``not valid YAML at line 3: expected ',' or ']'``), without its caret block."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None)
    return f"not valid YAML{where}" + (f": {problem}" if problem else "")
