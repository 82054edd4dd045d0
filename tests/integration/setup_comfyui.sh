#!/usr/bin/env bash
# Installs what a ComfyUI source checkout needs to start headless on CPU, into the current Python,
# without replacing the torch that is already installed (ComfyUI's requirements.txt lists unpinned
# torch/torchvision/torchaudio, which would pull CUDA builds).
#
#   bash tests/integration/setup_comfyui.sh /path/to/ComfyUI
#   COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/integration
#
# torchvision is installed without its dependencies; its C++ ops do not load beside a CPU-only torch,
# so the integration harness puts a small import hook (sitecustomize) on ComfyUI's PYTHONPATH.
set -euo pipefail

comfy_dir="${1:?usage: setup_comfyui.sh COMFYUI_DIR}"
requirements="$comfy_dir/requirements.txt"
[ -f "$requirements" ] || { echo "no requirements.txt in $comfy_dir" >&2; exit 1; }

python=${PYTHON:-python}
torch_version=$("$python" -c "import torch; print(torch.__version__.split('+')[0])")
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "torch==$torch_version" > "$pin"

# Every requirement except the torch family, with torch pinned to the installed build.
grep -v -E '^\s*(#|$)' "$requirements" | grep -v -E '^(torch|torchvision|torchaudio)\b' \
    | grep -v -E '^spandrel\b' > "$pin.req"
echo requests >> "$pin.req"   # imported by app/frontend_management.py, missing from requirements.txt
"$python" -m pip install -c "$pin" -r "$pin.req"
rm -f "$pin.req"

# torchvision matching torch's minor release (torch 2.N <-> torchvision 0.(N+15)), no dependencies.
tv_minor=$("$python" -c "import torch; print(int(torch.__version__.split('.')[1]) + 15)")
"$python" -m pip install --no-deps "torchvision==0.$tv_minor.*"
# spandrel declares torchvision as a dependency; install it alone.
"$python" -m pip install --no-deps spandrel

installed=$("$python" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$installed" != "$torch_version" ]; then
    echo "torch changed from $torch_version to $installed" >&2
    exit 1
fi
echo "ComfyUI requirements installed; torch $installed kept."
