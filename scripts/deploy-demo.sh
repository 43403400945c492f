#!/usr/bin/env bash
# Deployment demo on loopback: certificates, 1 aggregator + 3 merchant daemons on the embedded synthetic data,
# 2 federated rounds over TLS with SuperNode authentication, then the results. Exits 0 only if the run completed
# with every round and every merchant reported its ε. Usage: bash scripts/deploy-demo.sh [WORKDIR]
set -euo pipefail

work="${1:-$(mktemp -d -t fedaug-demo-XXXXXX)}"
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
fedaug synth --out data --merchants 3 --users 900

cat > aggregator.toml <<TOML
[aggregator]
address = "127.0.0.1:$port"
certificates = "certs"
merchant_keys = ["certs/merchant-1.pub", "certs/merchant-2.pub", "certs/merchant-3.pub"]
state_dir = "state/aggregator"

[data]
catalog = "data/catalog.tsv"

[federation]
rounds = 2
min_nodes = 3
min_replies = 3
round_timeout = 600
metrics_port = $metrics_port

[model]
hidden = 32
blocks = 1
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

python - state/aggregator/metrics.json <<'PY'
import json, sys
metrics = json.load(open(sys.argv[1]))
rounds = [r["round"] for r in metrics["rounds"]]
names = {node: name for name, node in metrics["merchant_keys"].items()}
eps = {names.get(str(m["node"]), m["node"]): m["epsilon"] for m in metrics["merchants"]}
print("== results")
print(f"rounds: {rounds}")
print("test (merchants' held-out users): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items()))
for name in sorted(eps):
    print(f"{name}: ε spent {eps[name]:.3f} of {metrics['privacy']['epsilon_budget']}")
ok = rounds == [1, 2] and len(eps) == 3 and all(e is not None and 0 < e <= 8.0 for e in eps.values())
print("== demo OK" if ok else "== demo FAILED: rounds or merchants' ε missing")
sys.exit(0 if ok else 1)
PY
