#!/usr/bin/env bash
# Fuzzes the decoder and the inflater with libFuzzer for a bounded time each.
#
#   scripts/fuzz.sh            # 60 s per target
#   FUZZ_SECONDS=600 scripts/fuzz.sh
#
# With a nightly toolchain, `cd fuzz && cargo +nightly fuzz run decode` does the
# same with sanitizers. This script needs only stable Rust: it passes the
# coverage instrumentation flags that cargo-fuzz would pass.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_EACH=${FUZZ_SECONDS:-60}
TARGET=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --bins --target "$TARGET"

for fuzz_target in decode deflate; do
  mkdir -p "corpus/$fuzz_target" artifacts
  echo "==> $fuzz_target for ${SECONDS_EACH}s"
  "target/$TARGET/release/$fuzz_target" -max_total_time="$SECONDS_EACH" -max_len=4096 \
    -artifact_prefix=artifacts/ "corpus/$fuzz_target"
done
