#!/usr/bin/env bash
# Three "providers" on this machine at different prices, places and speeds, one node with a
# (simulated) GPU; the same function placed by each strategy, and `treadle explain` on why.
#
#   examples/placement-demo.sh            # after scripts/up (or with treadle on PATH)
#
# Environment: PORT (default 8791), TREADLE (default: treadle on PATH, else .venv/bin/treadle).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8791}
TREADLE=${TREADLE:-$(command -v treadle || echo .venv/bin/treadle)}
export TREADLE_HOME
TREADLE_HOME=$(mktemp -d -t treadle-demo-XXXXXX)
export TREADLE_URL=http://127.0.0.1:$PORT
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TREADLE_HOME"
}
trap cleanup EXIT

"$TREADLE" weaver --port "$PORT" >"$TREADLE_HOME/weaver.log" 2>&1 &
pids+=($!)
until [ -s "$TREADLE_HOME/join.token" ] && "$TREADLE" nodes >/dev/null 2>&1; do sleep 0.2; done

node() {  # name, then shuttle options
  local name=$1
  shift
  TREADLE_SHUTTLE_TOKEN=$(cat "$TREADLE_HOME/join.token") "$TREADLE" shuttle \
    --weaver "$TREADLE_URL" --home "$TREADLE_HOME/$name" --name "$name" \
    --runtime namespace "$@" >"$TREADLE_HOME/$name.log" 2>&1 &
  pids+=($!)
}
node budget-eu --provider lease --region eu-west --zone eu-west-1a --country IE \
  --price 0.08 --perf-score 1.0
node cloud-us --provider cloud --region us-east --zone us-east-1a --country US \
  --price 0.40 --perf-score 2.5
node gpu-de --provider gpucloud --region eu-central --zone eu-central-1a --country DE \
  --price 1.20 --perf-score 3.0 --simulate-gpus 1:l4
until [ "$("$TREADLE" nodes --json | python3 -c 'import json,sys; print(sum(n["connected"] for n in json.load(sys.stdin)))')" = 3 ]; do
  sleep 0.2
done
COLUMNS=120 "$TREADLE" nodes

"$TREADLE" fn create hello -c 'python3 -c "print(13)"' >/dev/null
for strategy in lowest_cost best_performance balanced high_availability; do
  id=$("$TREADLE" invoke hello --strategy "$strategy" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  echo
  echo "\$ treadle invoke hello --strategy $strategy; treadle explain $id"
  "$TREADLE" explain "$id"
done

"$TREADLE" fn create train --gpus 1:l4 -c 'sh -c "echo $CUDA_VISIBLE_DEVICES"' >/dev/null
id=$("$TREADLE" invoke train --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo
echo "\$ treadle invoke train  # needs 1 l4 GPU; treadle explain $id"
"$TREADLE" explain "$id"
