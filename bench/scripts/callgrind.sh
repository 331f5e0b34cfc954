#!/usr/bin/env bash
# Instruction counts per request of one app/route under callgrind (valgrind has no SHA-NI: HMAC is
# overstated, ~7k instructions per request here). Example:
#   bench/scripts/callgrind.sh bench/target/release/herd-bench herd counter herd_counter
# Writes /tmp/cg/NAME.*; needs valgrind, redis-server, wrk, curl.
# usage: cg.sh BIN APP ROUTE OUTNAME  — instruction counts per request of one app/route under callgrind
set -u
mkdir -p /tmp/cg
BIN=$1; APP=$2; ROUTE=$3; OUT=$4
RP=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
AP=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
redis-server --port $RP --bind 127.0.0.1 --save "" --appendonly no --daemonize no --logfile /dev/null >/dev/null 2>&1 &
RPID=$!
sleep 0.5
valgrind --tool=callgrind --callgrind-out-file=/tmp/cg/$OUT.cg $BIN serve --app $APP --port $AP --redis redis://127.0.0.1:$RP >/dev/null 2>/tmp/cg/$OUT.vg &
VPID=$!
for i in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:$AP/untouched && break; sleep 0.3; done
# sessions
: > /tmp/cg/$OUT.cookies
for i in $(seq 1 8); do
  curl -s -D - -o /dev/null http://127.0.0.1:$AP/counter | grep -i '^set-cookie' | sed 's/^[Ss]et-[Cc]ookie: //; s/;.*//' | tr -d '\r' >> /tmp/cg/$OUT.cookies
done
C=$(head -1 /tmp/cg/$OUT.cookies)
[ "$APP" = plain ] && C="herd_session=x"
# warm
for i in $(seq 1 50); do curl -s -o /dev/null -H "Cookie: $C" http://127.0.0.1:$AP/$ROUTE; done
callgrind_control -z $VPID >/dev/null
cat > /tmp/cg/$OUT.lua <<LUA
request = function() return wrk.format(nil, nil, { ["Cookie"] = "$C" }) end
done = function(s) io.write(string.format("REQS %d\n", s.requests)) end
LUA
wrk -t1 -c4 -d8s -s /tmp/cg/$OUT.lua http://127.0.0.1:$AP/$ROUTE | grep REQS > /tmp/cg/$OUT.reqs
callgrind_control -d $VPID >/dev/null
sleep 1
kill $VPID $RPID; wait 2>/dev/null
N=$(awk '{print $2}' /tmp/cg/$OUT.reqs)
F=$(ls -t /tmp/cg/$OUT.cg* | grep -v '\.cg$' | head -1)
TOT=$(callgrind_annotate $F 2>/dev/null | grep "PROGRAM TOTALS" | awk '{gsub(",","",$1); print $1}')
echo "$APP $ROUTE reqs=$N instr=$TOT per_req=$((TOT / N)) file=$F"
