#!/usr/bin/env bash
# Run with `bench/tls.sh [--reps N] [--scenarios "A B"] [--out DIR]`: what TLS
# costs. One `switchboard` binary (target/release/switchboard) serves each
# scenario plain and over TLS (--tls-cert, with an ECDSA P-256 certificate from
# a CA made here with openssl), alternating within each repetition; the same
# load generator speaks ws:// or wss:// (--tls-ca). DIR/results.md gives the
# TLS runs' medians divided by the plain runs' (`tls` against `plain`) and p.
# Under TLS a frame pushed to an idle connection is written by its task, not
# directly to its socket (docs/architecture.md, "Direct writes"), so this
# measures both the encryption and the lost direct writes.
#
# Options:
#   --reps N    repetitions (default 5)
#   --scenarios "A B"  subset of: echo fanout fanout-topic relay-k1 (default: all four;
#               the loads are bench/run.sh's full-run loads)
#   --out DIR   where the report goes (default: target/bench-tls)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

command="bench/tls.sh $*"
reps=5 out=target/bench-tls scenarios="echo fanout fanout-topic relay-k1"
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift 2 ;;
    --scenarios) scenarios=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
cargo build --release --quiet -p switchboard-server -p switchboard-loadgen
mkdir -p "$out"
raw="$out/raw.jsonl"
: > "$raw"
bench_log="$out/server.out"

pki=$(mktemp -d)
trap 'rm -rf "$pki"' EXIT
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
openssl req -x509 "${ec[@]}" -keyout "$pki/ca-key.pem" -out "$pki/ca.pem" -days 2 \
  -subj "/CN=switchboard bench CA" 2> /dev/null
openssl req "${ec[@]}" -keyout "$pki/key.pem" -out "$pki/server.csr" -subj "/CN=127.0.0.1" 2> /dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$pki/ext.cnf"
openssl x509 -req -in "$pki/server.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca-key.pem" -CAcreateserial \
  -out "$pki/cert.pem" -days 2 -extfile "$pki/ext.cnf" 2> /dev/null

bin=target/release/switchboard
for rep in $(seq "$reps"); do
  for which in plain tls; do
    server=("$bin" --echo-path /echo)
    client=()
    if [ "$which" = tls ]; then
      server+=(--tls-cert "$pki/cert.pem" --tls-key "$pki/key.pem")
      client=(--tls-ca "$pki/ca.pem")
    fi
    for scenario in $scenarios; do
      case "$scenario" in
        echo) args=(echo --connections 50 --window 10 --size 64 --path /echo) ;;
        fanout) args=(fanout --subscribers 2000 --rate 15 --size 128) ;;
        fanout-topic) args=(fanout --subscribers 2000 --rate 15 --size 128 --topic) ;;
        relay-k1) args=(relay --clients 1000 --targets 1 --rate 10000 --size 128) ;;
        *) usage >&2; exit 2 ;;
      esac
      bench_run_once "${server[@]}" -- "${args[@]}" "${client[@]}" \
        --server "$which" --label "$scenario" --rep "$rep" --out "$raw"
    done
  done
done
target/release/loadgen report --input "$raw" --baseline tls --out-dir "$out" --command "$command"
