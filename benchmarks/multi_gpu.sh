#!/usr/bin/env bash
# The multi-GPU benchmark as run on the lent machines: every GPU of the host, funzero and FSDP2 in
# one process per model, each DeepSpeed system in a process of its own (its engine keeps GPU
# memory after it is dropped). Stops launching once DEADLINE seconds have passed.
#   MODELS="1.5b" FZ="fz2-compile,fz3-compile,fsdp2" DS="ds-zero2,ds-zero3" benchmarks/multi_gpu.sh $OUT
set -u
out=${1:-runs/multi_gpu}
MODELS=${MODELS:-1.5b,7b}
FZ=${FZ-fz1-compile,fz2-compile,fz3-compile,fsdp2}  # set but empty: none
DS=${DS-ds-zero1,ds-zero2,ds-zero3}  # set but empty: none
CORRECTNESS=${CORRECTNESS:-1}
DEADLINE=${DEADLINE:-100000}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
start=$SECONDS
run() {  # name, then multi_gpu.py's arguments
  local left=$((DEADLINE - (SECONDS - start)))
  if [ "$left" -lt 60 ]; then echo "skipped $1: deadline"; return; fi
  local name=$1; shift
  timeout "$left" torchrun --standalone --nproc-per-node="$n" "$(dirname "$0")/multi_gpu.py" --out "$out/$name" "$@" 2>&1 \
    | grep -v -i "warn\|^\s*$" | tail -40
}
first=1
for m in ${MODELS//,/ }; do
  flag=--no-correctness
  if [ "$first" = 1 ] && [ "$CORRECTNESS" = 1 ]; then flag=--correctness; fi
  first=0
  [ -n "$FZ" ] && run "$m-fz" --models "$m" --systems "$FZ" $flag
  for s in ${DS//,/ }; do run "$m-$s" --models "$m" --systems "$s" --no-correctness; done
done
python3 "$(dirname "$0")/multi_gpu.py" --out "$out" --plot "$out"/*/multi_gpu.json
