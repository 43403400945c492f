#!/usr/bin/env bash
# Deployment demo on loopback: certificates, 1 aggregator + 3 merchant daemons, federated rounds over TLS with
# SuperNode authentication, then the results: the model every merchant received (the public text prior with the
# merchants' DP statistics, and the trained model at the weight their federated DP evaluation chose) and each
# merchant's own local check of it. Exits 0 only if every round ran, every merchant reported its ε and holds the
# aggregator's fused model.
# Usage: bash scripts/deploy-demo.sh [WORKDIR] [--data FILE [--format FMT]] [--rounds N] [--model-size small|default]
#   default: the embedded synthetic merchants (900 users, titled catalog), 2 rounds, a small model;
#   --data: a real data set cut into 3 merchants by `fedaug synth --data` (e.g. Amazon Beauty).
set -euo pipefail

work="$(mktemp -d -t fedaug-demo-XXXXXX)"
data_args=(--users 900)
rounds=2
model_size=small
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then work="$1"; shift; fi
work="$(realpath -m "$work")"
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data_args=(--data "$(realpath "$2")"); shift 2 ;;
    --format) data_args+=(--format "$2"); shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --model-size) model_size="$2"; shift 2 ;;
    *) echo "deploy-demo: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$work"
cd "$work"
echo "== fedaug deployment demo in $work"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"
metrics_port="$(free_port)"

fedaug certs --out certs --merchants 3
fedaug synth --out data --merchants 3 "${data_args[@]}"
model=$'[model]\nhidden = 32\nblocks = 1'
[ "$model_size" = "small" ] || model=""

cat > aggregator.toml <<TOML
[aggregator]
address = "127.0.0.1:$port"
certificates = "certs"
merchant_keys = ["certs/merchant-1.pub", "certs/merchant-2.pub", "certs/merchant-3.pub"]
state_dir = "state/aggregator"

[data]
catalog = "data/catalog.tsv"

[federation]
rounds = $rounds
min_nodes = 3
min_replies = 3
round_timeout = 600
metrics_port = $metrics_port

$model
TOML

for i in 1 2 3; do
  cat > "merchant-$i.toml" <<TOML
[merchant]
superlink = "127.0.0.1:$port"
root_certificate = "certs/ca.crt"
private_key = "certs/merchant-$i.key"
state_dir = "state/merchant-$i"
runtime_port = $(free_port)

[data]
path = "data/merchant-$i.csv"
catalog = "data/catalog.tsv"

[privacy]
epsilon = 8.0
TOML
  # Trial data made afresh for the demo: a new privacy budget for it is knowingly started (a second demo on this
  # machine would otherwise be refused, as a real merchant's retraining under a new state-dir is).
  sed -i 's/^\[merchant\]$/[merchant]\nnew_budget = true/' "merchant-$i.toml"
done

fedaug aggregator --config aggregator.toml &
aggregator=$!
pids+=("$aggregator")
for i in 1 2 3; do
  fedaug merchant --config "merchant-$i.toml" > "merchant-$i.log" 2>&1 &
  pids+=("$!")
done

status=0
wait "$aggregator" || status=$?
pids=("${pids[@]:1}")  # the aggregator is done; the merchants are stopped on exit
if [ "$status" -ne 0 ]; then
  echo "== demo FAILED: the aggregator exited with $status (merchant logs: $work/merchant-*.log)"
  exit 1
fi

# Each merchant tests the model it received on its own held-out users (locally: nothing is sent, no ε).
for i in 1 2 3; do
  for _ in $(seq 1 180); do [ -f "state/merchant-$i/model-check.json" ] && break; sleep 1; done
done

python - state "$rounds" <<'PY'
import json, sys
from pathlib import Path
from fedaug.common.recommend.bundle import bundle_hash, read_card
state = Path(sys.argv[1])
metrics = json.loads((state / "aggregator" / "metrics.json").read_text())
rounds = [r["round"] for r in metrics["rounds"]]
names = {node: name for name, node in metrics["merchant_keys"].items()}
eps = {names.get(str(m["node"]), m["node"]): m["epsilon"] for m in metrics["merchants"]}
card = read_card(state / "aggregator" / "server" / "model")
expected = bundle_hash(state / "aggregator" / "server" / "model")
print("== results")
print(f"rounds: {rounds}")
print(f"the model handed out: {card.scorer['kind']}"
      + (f" (model weight {card.scorer['weight']}, prior {card.scorer['prior']['kind']})"
         if card.scorer["kind"] == "fused" else ""))
for name in sorted(eps):
    print(f"{name}: ε spent {eps[name]:.3f} of {metrics['privacy']['epsilon_budget']}")
held = {}
for i in (1, 2, 3):
    folder = state / f"merchant-{i}"
    held[i] = (folder / "model").is_dir() and bundle_hash(folder / "model") == expected
    check = folder / "model-check.json"
    if check.is_file():
        figures = json.loads(check.read_text())
        prior = figures.get("text_prior") or {}
        print(f"merchant-{i}'s own check: model NDCG@10 {figures['test']['ndcg@10']:.4f}"
              + (f", text prior {prior['ndcg@10']:.4f}" if prior else "")
              + f", popularity {figures['popularity']['ndcg@10']:.4f} ({figures['test']['users']} users)")
    else:
        print(f"merchant-{i}: no check of the received model")
ok = (rounds == list(range(1, int(sys.argv[2]) + 1)) and len(eps) == 3 and all(e is not None and 0 < e <= 8.0 for e in eps.values())
      and all(held.values()) and card.scorer["kind"] == "fused")
print("== demo OK" if ok else "== demo FAILED: rounds, merchants' ε, the fused model or a merchant's copy missing")
sys.exit(0 if ok else 1)
PY
