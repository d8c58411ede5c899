#!/usr/bin/env bash
# Benchmarks on the GPU machine (no network), from the repository root of the working tree the device tool sends.
#
#   bash benchmarks/gpu.sh STAGE...      stages: tests | tiny | 1b | 7b | write-bg | load | repeat | text | scaling |
#                                        attention | gemm
#
# `write-bg` starts writing the random 7B DeepSeek-format folder in the background (one CPU core) so that a later
# `load` only waits for it. Per shape: GENERATE_ARGS_<shape> adds arguments, LIMIT_<shape> bounds the seconds,
# TAG_<shape> suffixes the result file (TEXT_ARGS, LIMIT_text, TAG_text for the text stage).
#
# Carry `.whl` (wheels of what the machine's image lacks or has too old: transformers 5.24, pluggy 1.7, regex), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.24.0 pluggy==1.7.0 regex
# Results go to $OUT (default ./out): generate-SHAPE.json, load-7b.json, pytest-cuda.log, versions.json.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
# Editable: the package maps core/, plugins/, ... onto janus_decoding.*; a plain path entry cannot.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
python3 - <<'PY' | tee "$OUT/versions.json"
import json, torch, transformers, pluggy, click, tqdm, safetensors, tokenizers
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                  "pluggy": pluggy.__version__, "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
PY
status=0
for stage in "$@"; do
  echo "== $stage $(date -u +%T)"
  case "$stage" in
    tests)
      timeout ${LIMIT_tests:-300} python3 -m pytest -q -p no:cacheprovider tests/core/test_decode_attention.py tests/core/test_fused.py tests/core/test_skinny_gemm.py tests/core/test_graph.py tests/core/test_graph_text.py tests/core/test_graph_reuse.py tests/core/test_prefill_rows.py tests/core/test_qkv_rope.py tests/core/test_embedding_table.py tests/core/test_sampling.py -rs 2>&1 | tee "$OUT/pytest-cuda.log" | tail -15 ;;
    tiny|1b|7b)
      limit_var="LIMIT_$stage"; args_var="GENERATE_ARGS_$stage"; tag_var="TAG_$stage"
      limit=${!limit_var:-$([ "$stage" = 7b ] && echo 300 || echo 200)}
      name="generate-$stage${!tag_var:-}"
      timeout "$limit" python3 -m benchmarks.generate --shape "$stage" --parallel 16 --json \
        --out "$OUT/$name.json" ${!args_var:---check} >/dev/null 2>"$OUT/$name.log"
      rc=$?; grep -v Warning "$OUT/$name.log" | tail -4; [ $rc -eq 0 ] || { echo "generate $stage: exit $rc"; status=1; } ;;
    repeat)  # issue 12: does one process repeat itself bit for bit; a second process; a control without determinism
      r=benchmarks.repeatability; log="$OUT/repeatability-1b.log"
      timeout 300 python3 -m $r --shape 1b --device cuda --deterministic --repeats 2 \
        --out "$OUT/repeatability-1b.json" >/dev/null 2>"$log" || { tail -5 "$log"; status=1; }
      timeout 120 python3 -m $r --shape 1b --device cuda --deterministic --loops graph --repeats 1 \
        --out "$OUT/repeatability-1b-again.json" >/dev/null 2>>"$log" || status=1
      timeout 120 python3 -m $r --shape 1b --device cuda --loops graph --repeats 2 \
        --out "$OUT/repeatability-1b-cudnn.json" >/dev/null 2>>"$log" || status=1
      python3 - "$OUT" <<'PY'
import json, sys
a, b, c = (json.load(open(f"{sys.argv[1]}/repeatability-1b{s}.json")) for s in ("", "-again", "-cudnn"))
for label, d in (("deterministic", a), ("second process", b), ("default kernels", c)):
    for name, loop in d["loops"].items():
        print(label, name, loop["tokens_sha256"], [(r["tokens_equal"], r["first_step_logits_differ"])
              for r in loop["repeats_vs_first"]], "other order equal", loop["other_order_tokens_equal"])
print("two processes agree:", a["loops"]["graph"]["tokens_sha256"][0] == b["loops"]["graph"]["tokens_sha256"][0])
PY
      ;;
    text)  # issue 5's text line: transformers' generate vs this project's loops, 7B shape, batch 1
      timeout "${LIMIT_text:-480}" python3 -m benchmarks.text --shape 7b --device cuda --json \
        --out "$OUT/text-7b${TAG_text:-}.json" ${TEXT_ARGS:-} >/dev/null 2>"$OUT/text-7b.log"; rc=$?
      grep -v Warning "$OUT/text-7b.log" | tail -4
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(' ', k, round(e.get('tok_s', 0), 1), 'tok/s') for k, e in d['paths'].items()]" "$OUT/text-7b${TAG_text:-}.json"
      [ $rc -eq 0 ] || { echo "text: exit $rc"; status=1; } ;;
    scaling)  # issue 12: the batch job in one process and in two (needs 2 GPUs)
      timeout 560 python3 -m benchmarks.batch_scaling --shape 1b --prompts 64 -n 4 --micro-batch 16 --device cuda \
        --work /tmp/scaling --out "$OUT/batch_scaling-1b.json" 2>"$OUT/batch_scaling-1b.log" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || { tail -5 "$OUT/batch_scaling-1b.log"; status=1; } ;;
    gemm)  # the image step's GEMMs alone: cuBLAS vs core/skinny_gemm.py's launch configurations
      timeout "${LIMIT_gemm:-400}" python3 -m benchmarks.gemm --device cuda --out "$OUT/gemm.json" \
        ${GEMM_ARGS:-} 2>"$OUT/gemm.log" >/dev/null; grep -v Warning "$OUT/gemm.log" | tail -12 ;;
    attention)  # the decode attention alone: SDPA over buckets vs the Triton kernels' launch configurations
      timeout "${LIMIT_attention:-400}" python3 -m benchmarks.attention --device cuda --out "$OUT/attention.json" \
        ${ATTENTION_ARGS:-} 2>"$OUT/attention.log" | tail -3; tail -3 "$OUT/attention.log" ;;
    write-bg)
      (timeout 500 python3 -m benchmarks.load --shape 7b --format deepseek --folder /tmp/janus-pro-7b-deepseek \
        --write-only >/tmp/write-7b.log 2>&1) &
      writer=$! ;;
    load)
      [ -n "${writer:-}" ] && { wait "$writer"; echo "writer exit $? at $(date -u +%T)"; tail -c 600 /tmp/write-7b.log; }
      timeout 200 python3 -m benchmarks.load --shape 7b --format deepseek --folder /tmp/janus-pro-7b-deepseek --json \
        --load-only --out "$OUT/load-7b.json" 2>"$OUT/load-7b.log" | tail -30 ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
python3 - "$OUT" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/generate-*.json")):
    d = json.load(open(path))
    print(d["shape"], d["versions"].get("gpu"), "floor", round(d.get("floor", {}).get("total_s", 0), 3), "s")
    for name, e in d["paths"].items():
        if e and "median_s" in e:
            print(f"  {name:14s} {e['median_s']:8.3f} s  peak {e.get('peak_gib', 0):6.2f} GiB")
    if d.get("compare_decoder"):
        print("  compare", d["compare_decoder"])
    if d.get("profile"):
        print("  profile us/step", d["profile"]["total_us_per_step"], d["profile"]["groups"])
    for e in d["errors"]:
        print("  error", e["section"], e["error"][:300])
    if d.get("check"):
        c = d["check"]
        print("  check rel err max", c.get("guided_logits_rel_err_max"), "first div", min(c["first_divergence_per_image"]),
              "ok", c.get("divergence_only_at_or_after_a_near_tie"))
PY
exit $status
