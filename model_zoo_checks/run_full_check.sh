#!/usr/bin/env bash
# The full check (nerofy zoo) over every timm model, in shards run one after another into one
# resumable JSONL. Re-run it to continue where it stopped: rows already written are kept, a torn
# last line is cut. Then the report is rendered next to the results.
#   SHARDS=8 JOBS=2 TIMEOUT=300 BIG_TIMEOUT=1800 BIG_MEM=21000 model_zoo_checks/run_full_check.sh
set -u
cd "$(dirname "$0")/.."
N=${SHARDS:-8}
for i in $(seq 0 $((N - 1))); do
  nerofy zoo --shard "$i/$N" --resume --out model_zoo_checks/check.jsonl --jobs "${JOBS:-2}" \
    --timeout "${TIMEOUT:-300}" --steps 3 || exit $?
done
# then the models over --max-params (structural rows with 'skipped_size'): batch 1, sampled axis
# checks, smallest first, one worker with the memory to itself
nerofy zoo --resume --retry skipped_size,oom --order size --max-params 0 --batch 1 --verify-sample \
  --out model_zoo_checks/check.jsonl --jobs 1 --threads 2 --max-mem "${BIG_MEM:-21000}" \
  --timeout "${BIG_TIMEOUT:-1800}" --steps 3 || exit $?
# last, the models whose activations did not fit: again with gradient checkpointing (those that
# need more than the guard at 13 bytes a parameter, the least measured, stay 'oom', not run)
nerofy zoo --resume --retry oom --order size --max-params 0 --batch 1 --verify-sample --grad-checkpointing \
  --out model_zoo_checks/check.jsonl --jobs 1 --threads 2 --max-mem "${BIG_MEM:-21000}" \
  --timeout "${BIG_TIMEOUT:-1800}" --steps 3 || exit $?
nerofy report model_zoo_checks/check.jsonl --out-dir model_zoo_checks --name report \
  --expected-out model_zoo_checks/expected.json
