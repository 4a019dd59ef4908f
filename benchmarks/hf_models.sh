#!/usr/bin/env bash
# The Hugging Face benchmark (issue 21) as one device call: installs what the GPU image lacks from
# the carried wheels (.whl/, see benchmarks/NOTES.md: optree, DeepSpeed, Liger-Kernel, pydantic, ...)
# into /tmp/site, funzero itself (editable, no deps, no network), then runs hf_models.py, one process
# per system, the first system again at the end (A-B-A). Stops starting systems so that the whole
# run ends within DEADLINE seconds (the closing reference run is kept).
#   MODELS=llama-1b SYSTEMS=torch-compile,liger,fz2,fz2-patched benchmarks/hf_models.sh $OUT
# Device tool: carry [".whl"]; one call of at most 10 minutes, so one model and ~5 systems a call
# (estimates and a plan of calls: benchmarks/NOTES.md, hf_models).
set -eu
cd "$(dirname "$0")/.."
out=${1:-runs}/hf_models
MODELS=${MODELS:-llama-1b}
SYSTEMS=${SYSTEMS:-torch-compile,liger,fz2,fz2-patched,ds-zero2,liger-compile}
BURN=${BURN:-30}          # seconds of matmuls before the first system (its own process)
REHEAT=${REHEAT:-10}      # seconds of matmuls in each system's process before its last warm-up step
DEADLINE=${DEADLINE:-540} # seconds for hf_models.py; the device call's limit is 600
missing=$(python3 - <<'PY'
import importlib.util
print(" ".join(m for m in ("optree", "deepspeed", "liger_kernel", "hjson", "pydantic") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing the carried wheels (missing: $missing)"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import funzero.ops" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv,noheader 2>/dev/null || true
python3 benchmarks/hf_models.py --out "$out" --models "$MODELS" --systems "$SYSTEMS" --burn "$BURN" \
  --reheat "$REHEAT" --deadline "$DEADLINE" ${EXTRA:-} 2>&1 | grep -v -i "warn\|^\s*$" | tail -${TAIL:-60}
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv,noheader 2>/dev/null || true
