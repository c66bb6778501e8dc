#!/usr/bin/env bash
# The fault, redelivery, reconciler and broker-restart tests, N times in a row with every core
# kept busy by stress-ng; prints each run's outcome and time, then the pass count.
#   bench/fault_loop.sh [N]      (N=20 by default; PYTHON and VIDEOQA_TEST_REDIS_DB as for tests)
# FAULT_LOOP_TESTS: the test files to loop over instead of the five below (space-separated).
# FAULT_LOOP_STRESS_CPUS: how many busy stress-ng workers (every core by default; 0 for none, when
# other work already keeps the machine busy).
# FAULT_LOOP_FINISH_BY (a time `date -d` reads): no run starts that, as long as the previous one,
# would end after it; the count is of the runs made.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
python=${PYTHON:-.venv/bin/python}
tests=(tests/test_worker_faults.py tests/test_kill_moments.py tests/test_redelivery.py
       tests/test_reconciler.py tests/test_broker_restart.py)
# shellcheck disable=SC2206  # the list is split on spaces on purpose
[ -z "${FAULT_LOOP_TESTS:-}" ] || tests=(${FAULT_LOOP_TESTS})
stress_cpus=${FAULT_LOOP_STRESS_CPUS:-$(nproc)}
logs=${FAULT_LOOP_LOGS:-$(mktemp -d -t fault-loop.XXXX)}
mkdir -p "$logs"
if [ "$stress_cpus" -gt 0 ]; then
  command -v stress-ng >/dev/null || { echo "needs stress-ng (apt-get install -y stress-ng)" >&2; exit 2; }
  stress-ng --cpu "$stress_cpus" --timeout 0 --quiet &
  load=$!
  trap 'kill "$load" 2>/dev/null; wait "$load" 2>/dev/null' EXIT
fi
finish_by=$(date -d "${FAULT_LOOP_FINISH_BY:-next year}" +%s)
passed=0
made=0
took=0
for run in $(seq 1 "$runs"); do
  [ $(($(date +%s) + took)) -lt "$finish_by" ] || break
  made=$run
  started=$(date +%s)
  if OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD "$python" -m pytest -q -p no:cacheprovider \
      --basetemp "$logs/tmp-$run" "${tests[@]}" >"$logs/run-$run.log" 2>&1; then
    passed=$((passed + 1)); outcome=passed
  else
    outcome=FAILED
  fi
  took=$(($(date +%s) - started))
  echo "run $run: $outcome in $took s ($logs/run-$run.log)"
done
echo "$passed/$made passed ($runs asked) with stress-ng --cpu $stress_cpus beside them"
