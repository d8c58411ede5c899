#!/usr/bin/env python3
"""Cross-version check of the DoLa parity fixture WITHOUT DoLa.

Runs in the project's normal environment (any transformers version that can
load a Llama checkpoint).  It loads ``model/`` offline, re-tokenizes the
prompts recorded in ``expected.json`` and re-runs plain greedy decoding
(no DoLa) with the recorded settings.  Tokenization and generated tokens must
match what transformers 4.55.4 produced, so that a later DoLa mismatch can be
attributed to the DoLa implementation rather than to a model/version change.

    .venv/bin/python tests/data/dola_parity/check_plain_greedy.py            # check only
    .venv/bin/python tests/data/dola_parity/check_plain_greedy.py --record   # check + record result
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true", help="store the outcome in expected.json")
    args = ap.parse_args()

    transformers.logging.set_verbosity_error()
    expected_path = HERE / "expected.json"
    expected = json.loads(expected_path.read_text())
    folder = HERE / expected["model"]["path"]

    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)

    problems = []
    if model.dtype != torch.float32:
        problems.append(f"model dtype {model.dtype}")
    if model.config.num_hidden_layers != expected["model"]["num_hidden_layers"]:
        problems.append("num_hidden_layers differs")
    if tokenizer.padding_side != "left":
        problems.append(f"padding_side {tokenizer.padding_side}")

    n_ok = 0
    for case in expected["plain_greedy"]["cases"]:
        prompts = case["prompts"]
        enc = tokenizer(prompts, return_tensors="pt", padding=len(prompts) > 1)
        if enc["input_ids"].tolist() != case["input_ids"]:
            problems.append(f"tokenization differs for {prompts!r}")
            continue
        if enc["attention_mask"].tolist() != case["attention_mask"]:
            problems.append(f"attention mask differs for {prompts!r}")
            continue
        kw = dict(
            do_sample=False,
            max_new_tokens=expected["generation_settings"]["max_new_tokens"],
            pad_token_id=case["pad_token_id"],
            eos_token_id=case["eos_token_id"],
        )
        if case["repetition_penalty"] is not None:
            kw["repetition_penalty"] = case["repetition_penalty"]
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        if out.tolist() != case["sequences"]:
            problems.append(f"greedy tokens differ for {prompts!r} rp={case['repetition_penalty']}")
            continue
        n_ok += 1

    total = len(expected["plain_greedy"]["cases"])
    ok = not problems and n_ok == total
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {n_ok}/{total} plain greedy cases match")
    for p in problems:
        print("  MISMATCH:", p)

    if args.record:
        expected["plain_greedy"]["cross_version_check"] = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizer_class": type(tokenizer).__name__,
            "loaded_with": "LlamaForCausalLM.from_pretrained / AutoTokenizer.from_pretrained, local_files_only=True",
            "cases_matching": f"{n_ok}/{total}",
            "identical_tokens": ok,
        }
        expected_path.write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
        print(f"recorded in {expected_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
