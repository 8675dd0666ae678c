#!/usr/bin/env bash
# The paper sweep on the default model (the constructed testbed), then the tables and figures in paper_tables/.
#   bash scripts/paper_sweep.sh [ROWS] [OUT]      (also: python -m kvcompress.sweep methods)
# ROWS: the rows file (default paper_tables/rows/methods.jsonl, committed beside the tables so that
# `python -m kvcompress.tables` regenerates them); OUT: where the tables go (default paper_tables).
# * needle (1K and 2K tokens, 11 depths each, query-aware): every registered method that takes a `ratio` at 3 kept
#   fractions, the others at their defaults (a method with a `bits` field at 2, 4 and 8 bits), and two compositions;
# * RULER (1K tokens, 1 sample per task): every registered method once, at ratio 0.25 where it takes one. Tasks: the
#   niah tasks with numeric values, the ones the testbed's retrieval circuit can answer with the full cache (UUID
#   values, vt, cwe and fwe score 0 even uncompressed: they would add time and no signal). answer_prefix=lead_in: the
#   prompt ends with the needle's lead-in ("... for KEY is"), which the testbed completes.
# * LongBench: not run; its data are not available offline (the generated table says why the column is empty).
# The method lists come from the registry (kvcompress.available_methods() and each method's dataclass fields), so a
# newly registered method is swept without editing this file. Reruns skip configurations already in the results
# file (resume after an interruption; delete it to measure anew). Runtime: 8 min 20 s for 74 rows on 2 shared CPU cores (2026-11-30);
# the wall time is printed at the end.
set -euo pipefail
start=$SECONDS
results=${1:-paper_tables/rows/methods.jsonl}
out=${2:-paper_tables}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(print_summary=false "results=$results")
needle=("${common[@]}" eval=needle "eval.lengths=[1024,2048]")
ruler=("${common[@]}" eval=ruler "eval.lengths=[1024]" eval.samples=1 eval.answer_prefix=lead_in
       "eval.tasks=[niah_single_1,niah_single_2,niah_multikey_1,niah_multikey_2,niah_multivalue,niah_multiquery]")

# Three comma-separated lists (one may be empty): methods with a `ratio` field, methods with a `bits` field (and no
# ratio), every other method.
mapfile -t lists < <(python - <<'EOF'
import dataclasses

import kvcompress
from kvcompress.registry import get_method

names = kvcompress.available_methods()
fields = {name: {f.name for f in dataclasses.fields(get_method(name))} for name in names}
ratio = [n for n in names if "ratio" in fields[n]]
bits = [n for n in names if n not in ratio and "bits" in fields[n]]
print(",".join(ratio), ",".join(bits), ",".join(n for n in names if n not in ratio and n not in bits), sep="\n")
EOF
)
ratio_methods=${lists[0]} bits_methods=${lists[1]} other_methods=${lists[2]}
echo "ratio methods: $ratio_methods"
echo "bits methods:  ${bits_methods:-none}"
echo "other methods: $other_methods"

sweep() {  # sweep METHODS [OVERRIDES...]: one Hydra multirun over METHODS (skipped when the list is empty)
  local methods=$1
  shift
  [[ -z $methods ]] || python -m kvcompress.run -m "method=$methods" "$@"
}

sweep "$ratio_methods" ratio=0.1,0.25,0.5 "${needle[@]}"
sweep "$other_methods" "${needle[@]}"
for method in ${bits_methods//,/ }; do
  sweep "$method" "method.$method.bits=2,4,8" "${needle[@]}"
done
sweep snapkv+quant,heads+quant ratio=0.25 "${needle[@]}"
sweep "$ratio_methods" ratio=0.25 "${ruler[@]}"
sweep "$other_methods${bits_methods:+,$bits_methods}" "${ruler[@]}"
python -m kvcompress.tables methods "rows=$results" "out=$out"
elapsed=$((SECONDS - start))
printf 'paper sweep: wall time %d min %02d s\n' $((elapsed / 60)) $((elapsed % 60))
