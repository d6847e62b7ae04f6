#!/usr/bin/env bash
# The GPU checks of a lent device machine (see the README's "GPU and multiple processes"), in one call:
#   bash benchmarks/device_check.sh bench   # train_speed + explain_speed on cuda, the MNIST demo on cuda
#   bash benchmarks/device_check.sh suite   # the test suite with --device cuda
# The machine has torch with CUDA but no captum/quantus: they travel as wheels in .whl/, MNIST in .mnist/
# (both ignored by git, named in the call's carry). Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src" DIGITLENS_DATA="$PWD/.mnist" MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
nproc
case "${1:-bench}" in
bench)
  timeout 120 python3 benchmarks/train_speed.py --device cuda --models cnn,cnn-long,ref --epochs-ref 2 --threads 4 \
    2>&1 | tee "$OUT/train_speed.log" | grep -v "^\[" ; echo "train_speed exit $?"
  timeout 90 python3 benchmarks/train_speed.py --device cuda --precision bf16 --models cnn,cnn-long --threads 4 \
    2>&1 | tee "$OUT/train_speed_bf16.log" | grep "^|" ; echo "train_speed bf16 exit $?"
  timeout 170 python3 benchmarks/explain_speed.py --device cuda --tables attribution --captum-ig-n 10000 --threads 4 \
    2>&1 | tee "$OUT/explain_speed.log" | grep -v "^done" ; echo "explain_speed exit $?"
  start=$(date +%s.%N)
  timeout 200 python3 -m digitlens demo --dataset mnist --device cuda --out /tmp/runs > "$OUT/demo.log" 2>&1
  echo "demo exit $? after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s (command wall clock)"
  python3 - <<'PY'
import json
d = json.load(open("/tmp/runs/demo-mnist/demo.json"))
print("demo seconds", d["seconds"], "device", d.get("device"))
for s in d["steps"]:
    print(f"  {s['seconds']:7.1f} s  {s['step']}")
print(json.dumps(d["summary"], indent=1)[:1500])
PY
  cp /tmp/runs/demo-mnist/demo.json "$OUT/" 2>/dev/null
  ;;
suite)
  timeout 420 python3 -m pytest -q -p no:cacheprovider --device cuda --deselect tests/test_browser.py tests/ \
    2>&1 | tee "$OUT/suite.log" | tail -25
  ;;
esac
