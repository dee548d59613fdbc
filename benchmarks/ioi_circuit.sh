#!/usr/bin/env bash
# The IOI circuit of the default model, found by query and tested by intervention (README: Circuit validation).
#
#   benchmarks/ioi_circuit.sh [TRANSCODERS_DIR] [N_PROMPTS] [TOP_K]     (defaults: runs/demo/transcoders 16 5)
#
# 1. writes N shipped IOI prompts whose answer is " Mary" (spread over the templates, the model's p(answer) highest
#    first) to runs/ioi/ioi_mary.jsonl, tagged task "ioi-mary", plus 8 capital/antonym prompts as a control set;
# 2. ingests them with the dictionary, the answer " Mary" as the logit target (a managed Neo4j is started if none);
# 3. `atlas paths` from the features on the input token " Mary" to the " Mary" logit (with a cut-off sweep);
# 4. `atlas validate --from-paths` with the same query: the first TOP_K features along its strongest paths as the
#    circuit, on every ioi-mary prompt; stored;
# 5. `atlas edit`: ablate that circuit on the ioi-mary prompts, controls from the file; stored and saved.
# Rerun it when the demo dictionary changes. Use your own store with ATLAS_CACHE_DIR=... (and `atlas db stop` after).
set -euo pipefail
cd "$(dirname "$0")/.."
TC=${1:-runs/demo/transcoders}
N=${2:-16}
TOP_K=${3:-5}
OUT=runs/ioi
ATLAS=${ATLAS:-.venv/bin/atlas}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

"$PY" - "$N" "$OUT" <<'EOF'
import json, sys
from itertools import zip_longest
from ingest.demo_corpus import demo_corpus_path

n, out = int(sys.argv[1]), sys.argv[2]
rows = [json.loads(line) for line in demo_corpus_path().read_text().splitlines() if line]
mary = [r for r in rows if r["task"] == "ioi" and r["answer"] == " Mary"]
by_template = {}
for r in sorted(mary, key=lambda r: -r["p_answer"]):
    by_template.setdefault(r["template"], []).append(r)
chosen = [r for group in zip_longest(*by_template.values()) for r in group if r is not None][:n]
if len(chosen) < n:
    sys.exit(f"only {len(chosen)} IOI prompts answered ' Mary' in the demo corpus")
with open(f"{out}/ioi_mary.jsonl", "w") as f:
    for r in chosen:
        f.write(json.dumps({"text": r["text"], "task": "ioi-mary", "answer": r["answer"]}) + "\n")
control = [r for r in rows if r["task"] == "capitals"][:4] + [r for r in rows if r["task"] == "antonyms"][:4]
with open(f"{out}/control.jsonl", "w") as f:
    for r in control:
        f.write(json.dumps({"text": r["text"], "task": r["task"], "answer": r["answer"]}) + "\n")
print(f"{len(chosen)} IOI prompts (mean p(' Mary') {sum(r['p_answer'] for r in chosen) / len(chosen):.3f} as "
      f"shipped), {len(control)} control prompts")
EOF

"$ATLAS" db start
"$ATLAS" ingest --corpus "$OUT/ioi_mary.jsonl" --transcoders "$TC" --targets answer --max-feature-nodes 256 \
    --run ioi-mary --workers 1
"$ATLAS" paths --at-token ' Mary' --target ' Mary' --limit 25 --cut-off 0.01 --cut-off 0.05
"$ATLAS" validate --transcoders "$TC" --task ioi-mary --from-paths --at-token ' Mary' --target ' Mary' \
    --top-k "$TOP_K" --label ioi-mary-paths
# the circuit just stored: the features of the newest Validation labelled ioi-mary-paths
FEATURES=$("$PY" - <<'EOF'
import duckdb
from ingest.validation import default_validations_path
with duckdb.connect(str(default_validations_path()), read_only=True) as con:
    row = con.execute("SELECT circuit FROM validations WHERE label = 'ioi-mary-paths' ORDER BY created_at DESC "
                      "LIMIT 1").fetchone()
print(" ".join(f"--feature {key}" for key in row[0]))
EOF
)
# shellcheck disable=SC2086
"$ATLAS" edit --transcoders "$TC" $FEATURES --target-task ioi-mary --control-file "$OUT/control.jsonl" \
    --label ioi-mary-ablation --save "$OUT/ioi_mary_edit.json"
