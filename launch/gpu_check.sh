#!/usr/bin/env bash
# The GPU check, on one lent GPU with torch + Lightning but without hydra-core, omegaconf or
# deepspeed (installed from wheels carried in .whl: ../shared/tools/gpu-wheels.sh .whl) and
# without `datasets` (the data is prepared here and carried in .gpucheck/data):
#
#   here:   ../shared/tools/gpu-wheels.sh .whl && launch/gpu_check.sh --prepare-only
#   there:  launch/gpu_check.sh            (<= 9 minutes on one H200; each line also lands in $OUT/gpu_check.log
#           at once: do not pipe it through grep/tail, which hold output back until the end)
set -euo pipefail
cd "$(dirname "$0")/.."
data=.gpucheck/data

if [[ "${1:-}" == "--prepare-only" ]]; then
  # A 32k-token BPE over the Python standard library, prepared once and carried to the GPU machine.
  out=$(python -m lmtrain prepare data=python_stdlib tokenizer=bpe tokenizer.vocab_size=32000 data.cache_dir=.gpucheck/cache | tail -1)
  rm -rf "$data" && mkdir -p .gpucheck && cp -r "${out#prepared: }" "$data"
  du -sh "$data"; exit 0
fi

if [[ -d .whl ]]; then
  # The wheels were fetched for one Python (../shared/tools/gpu-wheels.sh: --python-version); a compiled
  # one (pydantic-core) only installs on that version, so say which one this machine has if it does not.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || {
    echo "gpu_check: the wheels in .whl do not install on $(python3 --version) here; fetch them for this version" \
         "(gpu-wheels.sh --python-version $(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'))" >&2
    exit 2
  }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DS_BUILD_OPS=0 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
[[ -f "$data/meta.json" ]] || { echo "gpu_check: $data is missing: run 'launch/gpu_check.sh --prepare-only' first" >&2; exit 2; }
exec python3 launch/gpu_check.py --data "$data" "$@"
