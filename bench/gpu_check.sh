#!/usr/bin/env bash
# One-shot check of the project on a machine with one NVIDIA GPU, in at most 8 minutes.
#
#   bash bench/gpu_check.sh            # writes $OUT/gpu-check.json, else ./gpu-check.json
#
# Steps, each time-boxed with `timeout` (a failure is recorded and the next step runs):
#   setup      the project's own set-up (scripts/bootstrap.sh test, then the gpu extra if
#              triton is missing); nothing else is installed
#   probe      GPU, driver, torch / CUDA / triton versions, the kernel report for the policy
#   tests      tests/kernels on CUDA (the Triton kernels compiled for this GPU)
#   kernels    bench/kernels.py (attention, SwiGLU, decode with and without left padding,
#              the PaLM model), its JSON
#   generate   generation throughput on CUDA, kernels against PyTorch, equal and mixed
#              prompt lengths; Hugging Face transformers as a peer when it is installed
#   serve      `palm-rlhf up --device cuda` and one best-of-4 chat through the gateway
# Every figure goes into one JSON file; logs of every step sit beside it (gpu-check-logs/).
#
#   bash bench/gpu_check.sh --dry-run  # (or GPU_CHECK_DRY_RUN=1) the same plumbing on the CPU:
#                                      # every step runs, on tiny shapes, the kernels through
#                                      # the Triton interpreter, `up --device cpu`; no figures
set -u
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
if [ "$DRY_RUN" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
export GPU_CHECK_DEVICE="$DEVICE"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
DEST="${OUT:-$ROOT}"
mkdir -p "$DEST"
RESULT="$DEST/gpu-check.json"
LOGS="$DEST/gpu-check-logs"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
mkdir -p "$LOGS" "$WORK/steps"
BUDGET="${GPU_CHECK_BUDGET:-480}"  # seconds for everything
START=$SECONDS
STEPS="$WORK/steps.tsv"
: > "$STEPS"

left() { echo $((BUDGET - (SECONDS - START))); }

# run_step NAME SECONDS CMD...: run CMD with a time limit (capped by what is left of the
# budget), log to $LOGS/NAME.log, record rc and duration
run_step() {
    local name="$1" limit="$2"
    shift 2
    local rest
    rest=$(( $(left) - 10 ))
    if [ "$rest" -lt "$limit" ]; then limit=$rest; fi
    if [ "$limit" -lt 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$limit" >> "$STEPS"
        echo "[gpu-check] $name: skipped (time budget spent)"
        return 1
    fi
    echo "[gpu-check] $name (up to ${limit}s)"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$limit" >> "$STEPS"
    echo "[gpu-check] $name: rc=$rc in $((SECONDS - t0))s"
    return "$rc"
}

# --- setup: the project's own environment -------------------------------------------------
PY=""
pick_python() {
    local candidate
    for candidate in "$ROOT/.venv/bin/python" python3; do
        if command -v "$candidate" > /dev/null 2>&1 && "$candidate" -c "import torch" > /dev/null 2>&1; then
            PY="$candidate"
            return 0
        fi
    done
    return 1
}
run_step setup_bootstrap 90 bash scripts/bootstrap.sh test
pick_python
if [ -n "$PY" ] && ! "$PY" -c "import triton" > /dev/null 2>&1 && [ -x "$ROOT/.venv/bin/pip" ]; then
    run_step setup_gpu_extra 60 "$ROOT/.venv/bin/pip" install -q -e ".[gpu]"
fi
pick_python
if [ -z "$PY" ]; then
    echo "[gpu-check] no Python with torch: nothing else can run"
    printf '{"error": "no Python with torch after set-up", "steps_log": "%s"}\n' "$LOGS" > "$RESULT"
    exit 1
fi
echo "[gpu-check] python: $PY"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset PALM_RLHF_KERNELS
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1
    echo "[gpu-check] dry run: the plumbing on the CPU, no figures"
else
    unset TRITON_INTERPRET
    export PALM_RLHF_KERNEL_TEST_DEVICE=cuda
fi

# --- probe: the device and the kernel report ----------------------------------------------
run_step probe 40 "$PY" - "$WORK/steps/probe.json" <<'EOF'
import json, subprocess, sys

import torch

out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
try:
    import triton

    out["triton"] = triton.__version__
except ImportError as exc:
    out["triton"] = f"not importable: {exc}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
               multiprocessors=p.multi_processor_count)
try:
    out["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as exc:
    out["nvidia_smi"] = f"unavailable: {exc}"
try:
    from kernels.report import format_kernel_report, kernel_report
    from palm_rlhf import PaLM

    model = PaLM(num_tokens=256, dim=256, depth=2, dim_head=64, heads=4)
    out["kernel_report"] = kernel_report(model, "cuda", torch.bfloat16)  # what a GPU would run
    print(format_kernel_report(model, "cuda", torch.bfloat16))
except Exception as exc:  # noqa: BLE001 - recorded, not fatal
    out["kernel_report"] = f"failed: {exc!r}"
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out, indent=2))
EOF

# --- tests: the kernel tests on CUDA ------------------------------------------------------
# one pinned tile configuration per kernel (no autotuning) so the compiles fit the limit
if [ "$DRY_RUN" = 1 ]; then  # one quick kernel test file, interpreted
    TEST_ARGS=(tests/kernels/test_kernels_dispatch.py)
    KERNEL_ARGS=(--smoke)
else
    TEST_ARGS=(tests/kernels)
    KERNEL_ARGS=(--seq-lens 1024,4096)
fi
PALM_RLHF_KERNELS_AUTOTUNE=0 run_step tests 150 "$PY" -m pytest "${TEST_ARGS[@]}" -q -p no:cacheprovider \
    --timeout 120 --junitxml "$WORK/steps/tests.xml"

# --- kernels: bench/kernels.py ------------------------------------------------------------
PALM_RLHF_KERNELS_AUTOTUNE=0 run_step kernels 100 "$PY" bench/kernels.py "${KERNEL_ARGS[@]}" \
    --json "$WORK/steps/kernels.json"

# --- generate: throughput on CUDA ---------------------------------------------------------
run_step generate 50 "$PY" - "$WORK/steps/generate.json" <<'EOF'
import json, os, sys, time

import torch

from kernels import dispatch, fallbacks
from palm_rlhf import PaLM, SamplingParams, generate_tokens

device = os.environ.get("GPU_CHECK_DEVICE", "cuda")
dry = device != "cuda"
# the shape of bench/generate.py: dim 512, depth 8, 8 heads of 64, one K/V head, vocab 256
out = {"model": dict(num_tokens=256, dim=512, depth=8, dim_head=64, heads=8), "dtype": "bfloat16",
       "new_tokens": 128, "device": device}
if dry:  # the plumbing only: a tiny model, the PyTorch path, no peer
    out.update(model=dict(num_tokens=256, dim=64, depth=2, dim_head=16, heads=4), dtype="float32", new_tokens=8)
path = sys.argv[1]


def save():
    json.dump(out, open(path, "w"), indent=2)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


torch.manual_seed(0)
model = PaLM(**out["model"]).to(device=device, dtype=getattr(torch, out["dtype"])).eval()
params = SamplingParams(max_new_tokens=out["new_tokens"], temperature=0.8, seed=0)
cases = {
    "batch1": [list(range(1, 65))],
    "batch8_equal": [list(range(1 + i, 65 + i)) for i in range(8)],
    "batch8_mixed": [list(range(1, 9 + 16 * i)) for i in range(8)],  # left padding in prefill and decode
}
for backend in ("torch",) if dry else ("torch", "triton"):
    for name, prompts in cases.items():
        with dispatch.use_backend(backend):
            generate_tokens(model, prompts, SamplingParams(max_new_tokens=4))  # warm-up / compile
            sync()
            fallbacks.reset()
            t0 = time.perf_counter()
            res = generate_tokens(model, prompts, params)
            sync()
            dt = time.perf_counter() - t0
        toks = sum(len(r[0].token_ids) for r in res)
        out.setdefault(backend, {})[name] = {"seconds": dt, "tokens": toks, "tokens_per_s": toks / dt,
                                             "fallbacks": {f"{k[0]}/{k[1]}": v for k, v in
                                                           fallbacks.snapshot().items()}}
        print(backend, name, f"{toks / dt:.0f} tok/s", flush=True)
        save()
try:
    import transformers
except ImportError:
    transformers = None
    out["hf_transformers"] = "not installed: no Hugging Face peer measured"
if dry:
    transformers = None
if transformers is None:
    out.setdefault("hf_transformers", "dry run: no peer measured")
else:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=1024)
    hf = transformers.LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    row = {"version": transformers.__version__, "model": "LlamaForCausalLM of the same widths, random weights"}
    for name in ("batch1", "batch8_equal"):
        ids = torch.tensor(cases[name], device="cuda")
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gen = hf.generate(ids, max_new_tokens=out["new_tokens"], min_new_tokens=out["new_tokens"],
                              do_sample=True, temperature=0.8, pad_token_id=0)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        toks = (gen.shape[1] - ids.shape[1]) * ids.shape[0]
        row[name] = {"seconds": dt, "tokens": toks, "tokens_per_s": toks / dt}
    out["hf_transformers"] = row
save()
print(json.dumps(out, indent=2))
EOF

# --- serve: palm-rlhf up --device cuda, one best-of-4 chat --------------------------------
serve_check() {
    local port data pid rc=1 t0=$SECONDS
    port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    data="$WORK/data"
    mkdir -p "$data"
    local cli="$ROOT/.venv/bin/palm-rlhf"
    [ -x "$cli" ] || cli="$(command -v palm-rlhf || true)"
    if [ -z "$cli" ]; then
        echo "no palm-rlhf command"
        return 1
    fi
    trap 'kill -KILL -- "-$pid" 2> /dev/null' EXIT
    setsid "$cli" up --device "$GPU_CHECK_DEVICE" --port "$port" --host 127.0.0.1 --free-ports --data-dir "$data" \
        > "$LOGS/serve-up.log" 2>&1 &
    pid=$!
    local ready=0
    for _ in $(seq 1 90); do
        if curl -fsS "http://127.0.0.1:$port/readyz" > /dev/null 2>&1; then ready=1; break; fi
        if ! kill -0 "$pid" 2> /dev/null; then break; fi
        sleep 0.5
    done
    echo "ready=$ready after $((SECONDS - t0))s"
    if [ "$ready" = 1 ]; then
        local c0=$SECONDS
        if curl -fsS -m 25 "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
            -d '{"model": "palm", "messages": [{"role": "user", "content": "How was your weekend?"}], "best_of": 4}' \
            -o "$WORK/steps/chat.json"; then
            rc=0
        fi
        echo "chat rc=$rc in $((SECONDS - c0))s"
        curl -fsS -m 5 "http://127.0.0.1:$port/metrics" 2> /dev/null | grep -E '^palm_rlhf_kernel_fallbacks' \
            > "$WORK/steps/serve-fallbacks.txt" || true
    fi
    kill -INT -- "-$pid" 2> /dev/null || kill -INT "$pid" 2> /dev/null
    for _ in $(seq 1 20); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2> /dev/null || true
    grep -iE "kernels on|triton|fallback" "$LOGS/serve-up.log" | head -40 > "$WORK/steps/serve-kernels.txt" || true
    return "$rc"
}
export -f serve_check
export PY ROOT WORK LOGS
run_step serve 90 bash -c serve_check

# --- one JSON of everything ---------------------------------------------------------------
TOTAL=$((SECONDS - START))
"$PY" - "$WORK" "$RESULT" "$TOTAL" "$LOGS" <<'EOF' || printf '{"error": "could not assemble the results", "logs": "%s"}\n' "$LOGS" > "$RESULT"
import json, os, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, result, total, logs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    status = "skipped" if rc == "skipped" else ("ok" if rc == "0" else ("timed out" if rc in ("124", "137") else "failed"))
    steps[name] = {"status": status, "rc": rc, "seconds": int(secs), "limit_s": int(limit)}
    log = Path(logs) / f"{name}.log"
    if status != "ok" and log.exists():  # what went wrong, without having to fetch the logs
        steps[name]["log_tail"] = log.read_text(errors="replace").splitlines()[-30:]
out = {"total_seconds": total, "steps": steps, "logs": logs, "dry_run": os.environ.get("GPU_CHECK_DEVICE") != "cuda"}


def load(name):
    p = work / "steps" / name
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return {"unparsed": p.read_text()[:4000]}


out["device"] = load("probe.json")
xml = work / "steps" / "tests.xml"
if xml.exists():
    try:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        a = suite.attrib
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        out["tests"] = {k: int(a.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        out["tests"]["time_s"] = float(a.get("time", 0))
        out["tests"]["failed"] = failed[:50]
    except (ET.ParseError, AttributeError) as exc:
        out["tests"] = {"error": repr(exc)}
out["kernels"] = load("kernels.json")
out["generate"] = load("generate.json")
chat = load("chat.json")
serve = {"chat": chat}
for name in ("serve-fallbacks.txt", "serve-kernels.txt"):
    p = work / "steps" / name
    if p.exists():
        serve[name.removesuffix(".txt").replace("serve-", "")] = p.read_text().splitlines()
up_log = Path(logs) / "serve-up.log"
if chat is None and up_log.exists():
    serve["up_log_tail"] = up_log.read_text(errors="replace").splitlines()[-40:]
out["serve"] = serve
result.write_text(json.dumps(out, indent=2))
print(f"[gpu-check] results in {result}")
EOF
echo "[gpu-check] done in ${TOTAL}s: $RESULT"
rm -rf "$WORK"
