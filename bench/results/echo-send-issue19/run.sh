#!/bin/bash
for rep in 1 2 3 4 5 6; do
for which in old new; do
  bin=/tmp/old-target/release/examples/echo; [ $which = new ] && bin=target/release/examples/echo
  log=$(mktemp)
  taskset -c 1 $bin 127.0.0.1:0 > $log 2>&1 &
  pid=$!
  for i in $(seq 50); do addr=$(sed -n 's/^listening on //p' $log | head -1); [ -n "$addr" ] && break; sleep 0.1; done
  taskset -c 0 target/release/loadgen echo --connections 50 --window 10 --size 64 --path / --warmup 2 --duration 5 --drain 2 --addr $addr --pid $pid --server $which --label echo --rep $rep --out raw.jsonl 2>&1 | grep -E "^loadgen: echo" | sed -E 's/.*(server [0-9.]+ cores, [0-9.]+ us CPU\/echo).*/\1/' | sed "s/^/$which /"
  kill $pid; wait $pid 2>/dev/null
done; done
