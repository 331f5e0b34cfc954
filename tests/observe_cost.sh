#!/bin/bash
# Worker CPU time per request, metrics off vs on, interleaved (robust to a busy machine).
# Usage: ROUNDS=4 DUR=5 tests/observe_cost.sh   (needs redis-server, wrk and bc on PATH)
set -u
cd "$(dirname "$0")/.." && cargo build --release --features cli,metrics --bin herd --example multi_worker || exit 1
mkdir -p /tmp/obs-bench
R=target/release
redis-server --port 16399 --save "" --daemonize yes --logfile /tmp/obs-bench/redis.log --pidfile /tmp/obs-bench/redis.pid
sleep 0.5
ROUNDS=${ROUNDS:-4}; DUR=${DUR:-5}
export REDIS_URL=redis://127.0.0.1:16399 HERD_PREFIX=bench RUST_LOG=warn HERD_LOG=warn HERD_SECRET=$(head -c 64 /dev/urandom | base64 -w0)
ticks() { local t=0; for p in $(pgrep -P $HERD); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
start() {
  $R/herd run --workers 2 --bind 127.0.0.1:18090 --socket /tmp/obs-bench/herd.sock "$@" -- $R/examples/multi_worker >/tmp/obs-bench/herd.out 2>&1 &
  HERD=$!
  for i in $(seq 100); do curl -sf 127.0.0.1:18090/healthz >/dev/null && break; sleep 0.1; done
  sleep 1
}
stop() { kill -TERM $HERD; wait $HERD 2>/dev/null; }
COOKIE=""
for round in $(seq $ROUNDS); do
  for mode in off on; do
    if [ $mode = on ]; then start --metrics 127.0.0.1:18091 --dashboard 127.0.0.1:18092; else start; fi
    if [ -z "$COOKIE" ]; then COOKIE=$(curl -si 127.0.0.1:18090/counter | grep -i '^set-cookie' | sed 's/^[^:]*: //; s/;.*//'); fi
    for ep in whoami counter; do
      t0=$(ticks)
      n=$(wrk -t2 -c32 -d${DUR}s -H "Cookie: $COOKIE" http://127.0.0.1:18090/$ep | awk '/requests in/ {print $1}')
      t1=$(ticks)
      echo "round=$round mode=$mode ep=$ep requests=$n cpu_us_per_req=$(echo "scale=2; ($t1-$t0)*10000/$n" | bc)"
    done
    stop
  done
done
kill $(cat /tmp/obs-bench/redis.pid)
