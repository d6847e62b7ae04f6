#!/usr/bin/env bash
# The GPU checks of a lent device machine (README: "GPU and multiple processes"), in one call:
#   bash benchmarks/device_check.sh [bench] [suite] [demo]
#     bench: benchmarks/train_speed.py (fp32 and bf16) and explain_speed.py (attribution table) on cuda
#     suite: the test suite with --device cuda (the browser tests need Playwright: left out there)
#     demo:  digitlens demo --dataset mnist --device cuda, with its step times
# The machine has torch with CUDA but not captum, quantus, cachetools or skl2onnx: they travel as wheels
# in .whl/ and MNIST in .mnist/ (both ignored by git, named in the call's carry). Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/tests" DIGITLENS_DATA="$PWD/.mnist" MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(bench suite demo)
for part in "${parts[@]}"; do
case "$part" in
bench)
  timeout 100 python3 benchmarks/train_speed.py --device cuda --models cnn,cnn-long,ref --epochs-ref 2 --threads 4 \
    > "$OUT/train_speed.log" 2>&1; echo "train_speed exit $?"; grep "^|\|^MNIST" "$OUT/train_speed.log"
  timeout 50 python3 benchmarks/train_speed.py --device cuda --precision bf16 --models cnn --threads 4 \
    > "$OUT/train_speed_bf16.log" 2>&1; echo "train_speed bf16 exit $?"; grep "^| cnn" "$OUT/train_speed_bf16.log"
  timeout 150 python3 benchmarks/explain_speed.py --device cuda --tables attribution --captum-ig-n 10000 --threads 4 \
    > "$OUT/explain_speed.log" 2>&1; echo "explain_speed exit $?"; grep "^|\|^Model" "$OUT/explain_speed.log" || tail -5 "$OUT/explain_speed.log"
  ;;
suite)
  start=$(date +%s)
  timeout 240 python3 -m pytest -q -p no:cacheprovider --device cuda --deselect tests/test_browser.py tests/ \
    > "$OUT/suite.log" 2>&1; echo "suite exit $? after $(( $(date +%s) - start )) s"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/suite.log" | tail -15
  ;;
demo)
  start=$(date +%s)
  timeout 150 python3 -m digitlens demo --dataset mnist --device cuda --out /tmp/runs > "$OUT/demo.log" 2>&1
  echo "demo exit $? after $(( $(date +%s) - start )) s (command wall clock)"
  python3 - <<'PY'
import json
d = json.load(open("/tmp/runs/demo-mnist/demo.json"))
print("demo seconds", d.get("seconds"), "device", d.get("device"))
for s in d.get("steps", []):
    print(f"  {s['seconds']:7.1f} s  {s['step']}")
print(json.dumps(d.get("summary", {}))[:1200])
PY
  cp /tmp/runs/demo-mnist/demo.json "$OUT/" 2>/dev/null; tail -3 "$OUT/demo.log"
  ;;
esac
done
