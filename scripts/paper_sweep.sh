#!/usr/bin/env bash
# The paper sweep: every registered method on the default model (constructed testbed, needle at 1K and 2K tokens,
# 11 depths each, query-aware), at 3 kept fractions, then the tables and figures in paper_tables/.
#   bash scripts/paper_sweep.sh [results/paper.jsonl]
# Reruns skip configurations already in the results file (resume after an interruption).
set -euo pipefail
results=${1:-results/paper.jsonl}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(print_summary=false "results=$results" "eval.lengths=[1024,2048]")
ratio_methods=streaming,random,snapkv,pyramidkv,h2o,tova,knorm,expected_attention,merge,adaptive_heads,heads,heads_random,layers,layer_budget,lowrank,think
python -m kvcompress.run -m "method=$ratio_methods" ratio=0.1,0.25,0.5 "${common[@]}"
python -m kvcompress.run -m method=full,share "${common[@]}"
python -m kvcompress.run -m method=quant method.quant.bits=2,4,8 "${common[@]}"
python -m kvcompress.run -m method=snapkv+quant,heads+quant ratio=0.25 "${common[@]}"
python -m kvcompress.tables "$results" --out paper_tables
