#!/usr/bin/env bash
# Installs pyproject's torch pin into the venv whose python is $1, the CPU build wherever one can be had, so that
# no step downloads gigabytes without saying so. Sources, in order:
#   1. a wheel pip finds without any index (its find-links: pip.conf or PIP_FIND_LINKS): nothing is downloaded;
#   2. PyTorch's CPU index, when it lists torch within a few seconds: a download of 192 MB (2.13.0, x86_64);
#   3. PyPI, after a one-line notice: PyPI's Linux x86_64 wheel is the CUDA build, which downloads 2.7 GB with its
#      nvidia-* and triton wheels (2.13.0: measured with `pip download torch==2.13.0`).
# Only torch itself is installed here (--no-deps); its small dependencies come with the project from PyPI.
set -euo pipefail
python=$1
cd "$(dirname "$0")/.."
version=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
[ -n "$version" ] || { echo "install-torch: no \"torch==VERSION\" pin in pyproject.toml" >&2; exit 2; }
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
pip=("$python" -m pip install --quiet --disable-pip-version-check --no-deps)

installed=$("$python" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
if [ "${installed%%+*}" = "$version" ]; then
  exit 0
fi
if "${pip[@]}" --no-index "torch==$version" 2>/dev/null; then
  echo "torch $version: installed from a local wheel"
# Asked through pip, with pip's own certificates and settings: a bare Debian has no CA bundle for Python's urllib.
elif "$python" -m pip index versions --disable-pip-version-check --timeout 5 --retries 0 --index-url "$cpu_index" \
     torch >/dev/null 2>&1; then
  echo "torch $version: installing the CPU build from $cpu_index (about 190 MB)"
  "${pip[@]}" --index-url "$cpu_index" "torch==$version"
else
  echo "torch $version: no local wheel and $cpu_index unreachable: installing from PyPI, the CUDA build on x86_64 (2.7 GB to download)"
  "${pip[@]}" "torch==$version"
fi
