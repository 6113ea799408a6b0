# Shared by the test scripts; source it, do not run it.

# wait_listening FILE PID: waits (up to 10 s) for the process PID to print
# `listening on ADDR` into FILE, as every Switchboard server does on port 0,
# and prints ADDR. Fails if the process dies first or never says it.
wait_listening() {
  local file=$1 pid=$2 addr=""
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/^listening on //p' "$file")
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
