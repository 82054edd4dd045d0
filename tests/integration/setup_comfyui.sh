#!/usr/bin/env bash
# Prepares a virtual environment for a ComfyUI source tree, for the real-host tests. The environment lives outside
# the tree (which may be read-only), sees this Python's packages (torch included) and adds ComfyUI's own
# requirements without replacing torch: ComfyUI's requirements.txt lists unpinned torch/torchvision/torchaudio,
# which would pull CUDA builds.
#
#   bash tests/integration/setup_comfyui.sh /path/to/ComfyUI [VENV_DIR]
#   COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=VENV_DIR/bin/python python -m pytest tests/integration
#
# VENV_DIR defaults to ${XDG_CACHE_HOME:-~/.cache}/vqcore-comfyui/<tree folder name>. A second run with the same
# tree, requirements and torch finds the environment ready and returns at once; the last line printed is always
# the interpreter's path.
#
# The torch family is installed without dependencies, beside the CPU torch:
# - torchvision matching torch's minor release (torch 2.N <-> torchvision 0.(N+15)). Its C++ ops do not load beside
#   a CPU-only torch; the test harness starts ComfyUI with an import hook that makes its Python parts importable.
# - torchaudio (ComfyUI 0.33 imports it at start-up): the newest release on the registry whose version does not exceed
#   torch's, with its compiled libraries moved aside (they are CUDA builds that do not load here). Its pure-Python
#   functions still import, which is all the server needs at start-up.
# - spandrel and kornia (upscale models, some core nodes), which depend on torchvision.
set -euo pipefail

comfy_dir="${1:?usage: setup_comfyui.sh COMFYUI_DIR [VENV_DIR]}"
comfy_dir=$(cd "$comfy_dir" && pwd)
requirements="$comfy_dir/requirements.txt"
[ -f "$requirements" ] || { echo "no requirements.txt in $comfy_dir" >&2; exit 1; }
venv="${2:-${XDG_CACHE_HOME:-$HOME/.cache}/vqcore-comfyui/$(basename "$comfy_dir")}"

base_python=${PYTHON:-python}
torch_version=$("$base_python" -c "import torch; print(torch.__version__.split('+')[0])")
stamp_key=$( { cat "$requirements" "$0"; echo "$torch_version"; "$base_python" -c "import sys; print(sys.prefix)"; } \
             | sha256sum | cut -d' ' -f1)
python="$venv/bin/python"
if [ -f "$venv/.vqcore-ready" ] && [ "$(cat "$venv/.vqcore-ready")" = "$stamp_key" ] && [ -x "$python" ]; then
    echo "ComfyUI environment for $comfy_dir already ready (torch $torch_version)."
    echo "$python"
    exit 0
fi

rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$base_python" -m venv --system-site-packages "$venv"
pip=("$python" -m pip install --quiet --disable-pip-version-check)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "torch==$torch_version" > "$work/pin.txt"

# Every requirement except the torch family and the packages that depend on it, torch pinned. requests is imported
# by 0.3.64's app/frontend_management.py without being listed.
grep -v -E '^\s*(#|$)' "$requirements" | grep -v -E '^(torch|torchvision|torchaudio|spandrel|kornia)\b' > "$work/req.txt"
echo requests >> "$work/req.txt"
"${pip[@]}" -c "$work/pin.txt" -r "$work/req.txt"

torch_minor=$("$python" -c "import torch; print(int(torch.__version__.split('.')[1]))")
"${pip[@]}" --no-deps "torchvision==0.$((torch_minor + 15)).*" spandrel kornia kornia_rs
# The newest torchaudio not newer than torch (the pip constraint keeps the resolver from looking at later ones).
echo "torchaudio<=$torch_version" > "$work/audio_pin.txt"
"${pip[@]}" --no-deps -c "$work/audio_pin.txt" torchaudio
torchaudio_dir=$("$python" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torchaudio').origin))")
mkdir -p "$venv/torchaudio-compiled-libraries"
find "$torchaudio_dir" -name "*.so*" -exec mv -t "$venv/torchaudio-compiled-libraries" {} +

installed=$("$python" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$installed" != "$torch_version" ]; then
    echo "torch changed from $torch_version to $installed" >&2
    exit 1
fi
echo "$stamp_key" > "$venv/.vqcore-ready"
echo "ComfyUI environment for $comfy_dir ready in $venv (torch $installed kept)."
echo "$python"
