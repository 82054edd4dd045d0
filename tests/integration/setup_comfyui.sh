#!/usr/bin/env bash
# Prepares a ComfyUI source checkout for the real-host tests: a virtual environment at COMFYUI_DIR/.venv that
# sees this Python's packages (torch included) and adds ComfyUI's own requirements, without replacing torch.
# ComfyUI's requirements.txt lists unpinned torch/torchvision/torchaudio, which would pull CUDA builds.
#
#   bash tests/integration/setup_comfyui.sh /path/to/ComfyUI
#   COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/integration
#
# torchvision lives only in that environment: beside a CPU-only torch its C++ ops do not load, and an import
# of it fails (which breaks transformers wherever it is installed). The test harness starts ComfyUI with
# COMFYUI_DIR/.venv/bin/python and an import hook that makes torchvision importable there.
set -euo pipefail

comfy_dir="${1:?usage: setup_comfyui.sh COMFYUI_DIR}"
requirements="$comfy_dir/requirements.txt"
[ -f "$requirements" ] || { echo "no requirements.txt in $comfy_dir" >&2; exit 1; }

base_python=${PYTHON:-python}
venv="$comfy_dir/.venv"
"$base_python" -m venv --system-site-packages "$venv"
python="$venv/bin/python"

torch_version=$("$python" -c "import torch; print(torch.__version__.split('+')[0])")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "torch==$torch_version" > "$work/pin.txt"

# Every requirement except the torch family (and spandrel, which depends on torchvision), torch pinned.
grep -v -E '^\s*(#|$)' "$requirements" | grep -v -E '^(torch|torchvision|torchaudio|spandrel)\b' > "$work/req.txt"
echo requests >> "$work/req.txt"   # imported by app/frontend_management.py, missing from requirements.txt
"$python" -m pip install -c "$work/pin.txt" -r "$work/req.txt"

# torchvision matching torch's minor release (torch 2.N <-> torchvision 0.(N+15)), and spandrel, without deps.
tv_minor=$("$python" -c "import torch; print(int(torch.__version__.split('.')[1]) + 15)")
"$python" -m pip install --no-deps "torchvision==0.$tv_minor.*" spandrel

installed=$("$python" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$installed" != "$torch_version" ]; then
    echo "torch changed from $torch_version to $installed" >&2
    exit 1
fi
echo "ComfyUI environment ready in $venv (torch $installed kept)."
