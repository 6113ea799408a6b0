# Shared by the bench scripts; source it, do not run it.

# `switchboard serve`'s flags in every benchmark, less `--compression`: the
# peers have no rate limits, idle timeouts or pings, so Switchboard runs
# without them too, with room for every load generator client under one id
# and for a fan-out to every id; no snapshot is written when a server stops.
bench_serve_flags=(--listen 127.0.0.1:0 --persist false --log-level warn
  --rate-limit-messages-per-sec 0 --rate-limit-bytes-per-sec 0
  --max-connections-per-client 100000 --idle-timeout-secs 0 --ping-interval-secs 0
  --max-outbound-bytes 67108864 --max-targets 100000)

# Prints the calling script's header comment (its usage): every line after the
# shebang up to the first that is not a comment, so it cannot fall out of step
# with the header as a fixed line range did.
usage() {
  awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"
}
