#!/usr/bin/env bash
# The GPU check of a lent GPU machine (issue 16): bf16 BERT-base training throughput and MFU
# next to the Hugging Face Trainer, a DDP smoke run over NCCL, the data-stage benchmark on
# all cores. One JSON line per figure on stdout (and in $OUT/gpu_check.jsonl when $OUT is
# set, with the logs in $OUT/gpu_check_logs.tgz); logs on stderr; under 8 minutes.
#
#   bash scripts/gpu_check.sh --stage     here, with PyPI: the wheels the lent machine lacks
#                                         and the base dataset, into .gpu/ (git-ignored)
#   bash scripts/gpu_check.sh             there (device run, carry [".gpu"]): install, check
#   bash scripts/gpu_check.sh --dry-run   anywhere, no GPU: validate the plan, print it
#
# The lent machine reaches no package index: with .gpu/wheels it installs from there
# (pip --no-index); without, it tries `pip install -e '.[test]'`, keeping the CUDA torch
# it has. The steps themselves are mlm/bench/gpu.py's.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
STAGE="$ROOT/.gpu"
WORK="${MLM_GPU_WORK:-/tmp/mlm-gpu-check}"
JSONL="${OUT:+$OUT/gpu_check.jsonl}"
STARTED=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" MLM_HOME="${MLM_HOME:-$WORK/home}"

# one JSON line from KEY=VALUE arguments (a VALUE that is JSON, e.g. true or 3, stays JSON)
emit() {
  local line
  line=$("$PY" -c 'import json, sys
def value(v):
    try:
        return json.loads(v)
    except ValueError:
        return v
print(json.dumps({k: value(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}))' "$@")
  echo "$line"
  if [ -n "$JSONL" ]; then echo "$line" >>"$JSONL"; fi
}

if [ -f "$STAGE/wheels/requirements.txt" ]; then
  SOURCE="carried wheels ($STAGE/wheels)"
  INSTALL=("$PY" -m pip install -q --no-index --no-cache-dir --find-links "$STAGE/wheels" -r "$STAGE/wheels/requirements.txt")
else
  SOURCE="PyPI"
  INSTALL=("$PY" -m pip install -q --retries 1 --timeout 20 -c "$WORK/torch-constraint.txt" -e "$ROOT[test]")
fi
CHECK=("$PY" -m mlm.bench.gpu check --work "$WORK")
if [ -f "$STAGE/data-base/manifest.json" ]; then CHECK+=(--data "$STAGE/data-base"); fi
if [ -n "$JSONL" ]; then CHECK+=(--jsonl "$JSONL"); fi

case "${1:-}" in
  --dry-run)
    emit check=install dry_run=true "source=$SOURCE" "command=${INSTALL[*]}"
    exec "${CHECK[@]}" --dry-run ;;
  --stage)
    exec "$PY" -m mlm.bench.gpu stage "$STAGE" ;;
  "") ;;
  *)
    echo "usage: $0 [--dry-run | --stage]" >&2
    exit 2 ;;
esac

if ! TORCH=$("$PY" -c 'import torch; assert torch.cuda.is_available(); print(torch.__version__)' 2>/dev/null); then
  emit check=gpu status=error "why=no CUDA GPU visible to torch ($PY): run this on the lent GPU machine, or --dry-run to validate the plan"
  exit 3
fi

mkdir -p "$WORK/logs"
echo "torch==$TORCH" >"$WORK/torch-constraint.txt"  # the machine's CUDA torch stays
t0=$SECONDS
echo "gpu_check: installing from $SOURCE" >&2
if "${INSTALL[@]}" >"$WORK/logs/install.log" 2>&1; then
  STATUS=ok
else
  STATUS=error
  if [ -f "$STAGE/wheels/requirements.txt" ]; then  # a requirement the image does not meet: every carried wheel, unresolved
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "$STAGE"/wheels/*.whl >>"$WORK/logs/install.log" 2>&1
  fi
fi
tail -n 15 "$WORK/logs/install.log" | sed 's/^/[install] /' >&2
# what the steps need, importable or not, with the versions that matter
LINE=$("$PY" - "$STATUS" "$SOURCE" "$((SECONDS - t0))" "$WORK/logs/install.log" <<'EOF'
import importlib, json, sys
status, source, seconds, log = sys.argv[1:]
needed = ["torch", "pydantic", "ray", "ray.data", "ray.train.torch", "ray.dashboard.optional_deps",
          "transformers", "accelerate", "tokenizers", "pyarrow", "datasets", "psutil", "mlm.bench.gpu"]
missing, versions = {}, {}
for name in needed:
    try:
        module = importlib.import_module(name)
        versions[name] = getattr(module, "__version__", None) if "." not in name else None
    except Exception as e:  # noqa: BLE001 - reported, not raised
        missing[name] = f"{type(e).__name__}: {e}"
import torch
line = {"check": "install", "status": "error" if missing else "ok", "pip": status, "source": source, "seconds": int(seconds),
        "missing": missing, "versions": {k: v for k, v in versions.items() if v},
        "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
if status != "ok":
    tail = [s for s in open(log, encoding="utf-8", errors="replace").read().splitlines() if s.strip()]
    line["pip_error"] = tail[-1][-500:] if tail else "pip failed"
print(json.dumps(line))
EOF
)
echo "$LINE"
if [ -n "$JSONL" ]; then echo "$LINE" >>"$JSONL"; fi

"${CHECK[@]}" --started-at "$STARTED"
RC=$?
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/gpu_check_logs.tgz" -C "$WORK" logs 2>/dev/null; fi
echo "gpu_check: done in $(( $(date +%s) - STARTED )) s, exit $RC" >&2
exit $RC
