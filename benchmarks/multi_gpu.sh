#!/usr/bin/env bash
# The multi-GPU benchmark as run on the lent machines: every GPU of the host, funzero and FSDP2 in
# one process per model, each DeepSpeed system in a process of its own (its engine keeps GPU
# memory after it is dropped). Stops launching once DEADLINE seconds have passed. Installs what the
# GPU image lacks from the carried wheels (.whl/: optree, DeepSpeed, ...) into /tmp/site first.
#   MODELS="1.5b" FZ="fz2-compile,fz3-compile,fsdp2" DS="ds-zero2,ds-zero3" benchmarks/multi_gpu.sh $OUT
# With MODEL (a Llama shape: tiny, 1b, 8b) the Llama systems run instead of the GPT models (FZ: the
# funzero and FSDP2 ones, in one process; DS: each DeepSpeed one in its own):
#   MODEL=8b FZ="fz3-compile,fz3-compile-tp2,fsdp2-tp2" DS="ds-zero1-autotp2" benchmarks/multi_gpu.sh $OUT
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/multi_gpu}
MODEL=${MODEL:-}
MODELS=${MODELS:-1.5b,7b}
if [ -n "$MODEL" ]; then
  FZ=${FZ-fz3-compile,fz3-compile-tp2,fz3-compile-sp2,fz3-compile-hsdp2,fsdp2-tp2,fsdp2-hsdp2}  # set but empty: none
  DS=${DS-ds-zero1-autotp2,ds-zero1-sp2}
else
  FZ=${FZ-fz1-compile,fz2-compile,fz3-compile,fsdp2}  # set but empty: none
  DS=${DS-ds-zero1,ds-zero2,ds-zero3}  # set but empty: none
fi
CORRECTNESS=${CORRECTNESS:-1}
DEADLINE=${DEADLINE:-100000}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
missing=$(python3 -c 'import importlib.util as u; print(" ".join(m for m in ("optree", "deepspeed", "hjson", "pydantic") if u.find_spec(m) is None))')
if [ -n "$missing" ] && ls .whl/*.whl >/dev/null 2>&1; then
  echo "installing the carried wheels (missing: $missing)"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
n=${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}  # NPROC=4 EXTRA=--smoke: the CPU
start=$SECONDS
run() {  # name, then multi_gpu.py's arguments
  local left=$((DEADLINE - (SECONDS - start)))
  if [ "$left" -lt 60 ]; then echo "skipped $1: deadline"; return; fi
  local name=$1; shift
  timeout "$left" torchrun --standalone --nproc-per-node="$n" benchmarks/multi_gpu.py --out "$out/$name" "$@" 2>&1 \
    | grep -v -i "warn\|^\s*$" | tail -40
}
if [ -n "$MODEL" ]; then
  [ -n "$FZ" ] && run "$MODEL-fz" --model "$MODEL" --systems "$FZ" ${EXTRA:-}
  for s in ${DS//,/ }; do run "$MODEL-$s" --model "$MODEL" --systems "$s" ${EXTRA:-}; done
else
  first=1
  for m in ${MODELS//,/ }; do
    flag=--no-correctness
    if [ "$first" = 1 ] && [ "$CORRECTNESS" = 1 ]; then flag=--correctness; fi
    first=0
    [ -n "$FZ" ] && run "$m-fz" --models "$m" --systems "$FZ" $flag
    for s in ${DS//,/ }; do run "$m-$s" --models "$m" --systems "$s" --no-correctness; done
  done
fi
python3 benchmarks/multi_gpu.py --out "$out" --plot "$out"/*/multi_gpu.json
