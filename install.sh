#!/usr/bin/env bash
# Install fastcls and its dependencies into ./.venv (or the active virtual environment, with --here).
# torch and torchvision are installed first as a known-good pair: on CPU-only machines the CPU torch build has no
# matching torchvision wheel, while the default (CUDA) builds of this pair also run on the CPU.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_PAIR=${FASTCLS_TORCH_PAIR:-"torch==2.14.1 torchvision==0.29.1"}
if [[ "${1:-}" != "--here" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip
python -m pip install -q $TORCH_PAIR
python -m pip install -q -e ".[dev]"
# a Jupyter kernel "Python (fastcls)" that runs this environment's python, for the notebooks in nbs/
if python -c "import ipykernel" 2>/dev/null; then
  python -m ipykernel install --sys-prefix --name fastcls --display-name "Python (fastcls)" >/dev/null
fi
python -c "import torch, torchvision, fastai, timm; print('installed: torch', torch.__version__, '| torchvision', torchvision.__version__, '| fastai', fastai.__version__, '| timm', timm.__version__)"
# the dev extra includes the onnx extra (fastcls export --onnx, fastcls predict --runtime onnx)
python -c "import onnx, onnxruntime; print('installed: onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__)"
