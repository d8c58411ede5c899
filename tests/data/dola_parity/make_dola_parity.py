#!/usr/bin/env python3
"""Generate DoLa parity fixtures with transformers 4.55.4 (reference implementation).

This script must run ONLY in a side virtual environment that has
torch==2.13.0 (CPU) and transformers==4.55.4 installed; see README.md in
this folder for the exact command. It is not imported by the test-suite.

It (re)creates, deterministically, in the folder containing this file:

* ``model/``        tiny byte-level BPE tokenizer + tiny random LlamaForCausalLM
* ``expected.json`` prompts, DoLa generations, per-step premature layers,
                    resolved candidate-layer buckets and plain greedy outputs.

The premature layer chosen by transformers at each step is observed by
wrapping two private module-level helpers of ``transformers.generation.utils``
(``_dola_select_contrast`` and ``_relative_top_filter``).  The wrappers only
look at the arguments and then call the original functions with the very
same arguments, so the generated tokens are unaffected.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import transformers.generation.utils as gen_utils  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

REFERENCE_TRANSFORMERS = "4.55.4"

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"
EXPECTED = HERE / "expected.json"

SEED = 1234
VOCAB_SIZE = 384
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

MODEL_KWARGS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=10,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    initializer_range=0.35,
)

MAX_NEW_TOKENS = 16
DOLA_LAYER_SETTINGS = ["low", "high", [2, 4, 6], [3], [1, 3, 8, 10, 12]]
REPETITION_PENALTIES = [None, 1.2]
EARLY_EOS_SETTINGS = [("high", 1.2), ([2, 4, 6], None)]
EARLY_EOS_STEP = 5

SINGLE_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, there was",
    "In the morning the market",
]
BATCH_PROMPTS = [
    "The cat sat",
    "A long time ago in a small village by the river",
]

# Small built-in English training text for the tokenizer (written for this fixture).
CORPUS = """
Once upon a time there was a small village by a slow river. Every morning the
people of the village walked to the market to sell bread, apples, fish and
cheese. The baker woke up before the sun and lit the oven. The fisherman
pushed his boat into the water and sang a quiet song. Children ran along the
road with their dogs, and the old teacher opened the school at eight o'clock.
The quick brown fox jumps over the lazy dog. A cat sat on the warm wall and
watched the birds in the tall green trees. In the afternoon the wind came from
the hills and the sky turned grey. It started to rain, and everyone hurried
home. In the evening the families ate soup and told stories about the past.
They talked about the long winter, the great flood, and the summer when the
river was almost dry. The mayor said that the village would build a new bridge
next year, and the people were happy. The library had many books about
science, history, music and the stars. A young girl read about the moon and
the planets, and she wanted to become an astronomer. Her brother liked to
build small machines from wood and metal. Their mother worked at the hospital
and their father repaired bicycles in a little shop near the station. On
Sundays the whole family walked through the forest and counted the animals
they could see: deer, rabbits, squirrels, and once even a red fox. Time passed,
the seasons changed, and the village grew into a town, but the river still
flowed slowly past the houses, and the market still opened every morning.
What is the capital of France? Paris is the capital of France. Water boils at
one hundred degrees. The number seven comes after six and before eight.
"""


# ----------------------------------------------------------------------------
# tokenizer + model
# ----------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
    )
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **MODEL_KWARGS,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


# ----------------------------------------------------------------------------
# observation of the premature layer chosen by transformers
# ----------------------------------------------------------------------------


class DolaRecorder:
    """Records, per decoding step, the candidate layers and the chosen one."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._pending: dict | None = None
        self._orig_select = gen_utils._dola_select_contrast
        self._orig_filter = gen_utils._relative_top_filter

    # wrappers --------------------------------------------------------------
    def _select(self, candidate_premature_layers, candidate_premature_logits, final_logits):
        self._pending = {
            "candidates": list(candidate_premature_layers),
            "logits": dict(candidate_premature_logits),
            "final": final_logits,
            "chosen": None,
        }
        out = self._orig_select(candidate_premature_layers, candidate_premature_logits, final_logits)
        pending, self._pending = self._pending, None
        if pending["chosen"] is None:
            raise RuntimeError("could not identify the premature layer used by transformers")
        diag = own_jsd_diagnostics(pending["candidates"], pending["logits"], pending["final"])
        step = {
            "candidate_layers": pending["candidates"],
            "premature_layer": pending["chosen"],
            "kept_tokens": pending["kept"],
        }
        if diag is not None:
            step["jsd_diag"] = diag["jsd"]
            step["jsd_diag_argmax_agrees"] = diag["argmax_layer"] == pending["chosen"]
        self.steps.append(step)
        return out

    def _filter(self, scores, baseline_scores, *args, **kwargs):
        pending = self._pending
        if pending is not None:
            hits = [layer for layer, t in pending["logits"].items() if t is baseline_scores]
            if len(hits) != 1:
                raise RuntimeError(f"ambiguous baseline identity: {hits}")
            pending["chosen"] = hits[0]
        out_scores, out_base = self._orig_filter(scores, baseline_scores, *args, **kwargs)
        if pending is not None:
            pending["kept"] = torch.isfinite(out_scores).sum(-1).tolist()
        return out_scores, out_base

    # context management ----------------------------------------------------
    def __enter__(self):
        self.steps = []
        gen_utils._dola_select_contrast = self._select
        gen_utils._relative_top_filter = self._filter
        return self

    def __exit__(self, *exc):
        gen_utils._dola_select_contrast = self._orig_select
        gen_utils._relative_top_filter = self._orig_filter
        return False


def own_jsd_diagnostics(candidates, cand_logits, final_logits):
    """Independent recomputation of the layer score (diagnostic only, fp32).

    Score per candidate layer q (mature distribution p, m = (p + q) / 2):
        0.5 * (mean_v m*(log m - log p) + mean_v m*(log m - log q)), then mean over batch.
    Returns None for a single candidate (transformers skips the selection then).
    """
    if len(candidates) == 1:
        return None
    with torch.no_grad():
        p = torch.softmax(final_logits.float(), -1)
        logp = torch.log_softmax(final_logits.float(), -1)
        scores = []
        for layer in candidates:
            ql = cand_logits[layer].float()
            q = torch.softmax(ql, -1)
            logq = torch.log_softmax(ql, -1)
            m = 0.5 * (p + q)
            logm = torch.log(m)
            a = torch.where(m > 0, m * (logm - logp), torch.zeros_like(m)).mean(-1)
            b = torch.where(m > 0, m * (logm - logq), torch.zeros_like(m)).mean(-1)
            scores.append((0.5 * (a + b)).mean().item())
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return {"jsd": [float("%.9g" % s) for s in scores], "argmax_layer": candidates[best]}


# ----------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------


def gen_kwargs(tokenizer, dola_layers, repetition_penalty, eos_token_id=None):
    kw = dict(
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
    )
    if dola_layers is not None:
        kw["dola_layers"] = dola_layers
    if repetition_penalty is not None:
        kw["repetition_penalty"] = repetition_penalty
    return kw


def run_case(model, tokenizer, prompts, dola_layers, repetition_penalty, eos_token_id=None):
    enc = tokenizer(prompts, return_tensors="pt", padding=len(prompts) > 1)
    kw = gen_kwargs(tokenizer, dola_layers, repetition_penalty, eos_token_id)
    with torch.no_grad():
        if dola_layers is None:
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
            steps = None
        else:
            with DolaRecorder() as rec:
                out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
            steps = rec.steps
    prompt_len = enc["input_ids"].shape[1]
    case = {
        "prompts": prompts,
        "input_ids": enc["input_ids"].tolist(),
        "attention_mask": enc["attention_mask"].tolist(),
        "dola_layers": dola_layers,
        "repetition_penalty": repetition_penalty,
        "eos_token_id": kw["eos_token_id"],
        "pad_token_id": kw["pad_token_id"],
        "generated_ids": out[:, prompt_len:].tolist(),
        "sequences": out.tolist(),
        "generated_text": tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=False),
    }
    if steps is not None:
        if len(steps) != out.shape[1] - prompt_len:
            raise RuntimeError("recorded step count does not match the number of generated tokens")
        case["steps"] = steps
        case["premature_layers"] = [s["premature_layer"] for s in steps]
        case["candidate_layers"] = steps[0]["candidate_layers"]
    return case


def main() -> int:
    if transformers.__version__ != REFERENCE_TRANSFORMERS:
        print(
            f"error: needs transformers=={REFERENCE_TRANSFORMERS}, found {transformers.__version__}",
            file=sys.stderr,
        )
        return 2
    transformers.logging.set_verbosity_error()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)

    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    for f in MODEL_DIR.iterdir():
        if f.is_file():
            f.unlink()
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(MODEL_DIR)

    # Reload from disk so that the data corresponds exactly to the saved files.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(MODEL_DIR, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True, torch_dtype=torch.float32)
    model.eval()

    prompt_sets = [("single", [p]) for p in SINGLE_PROMPTS] + [("batch_left_padded", BATCH_PROMPTS)]

    dola_cases = []
    plain_cases = []
    for kind, prompts in prompt_sets:
        for rp in REPETITION_PENALTIES:
            c = run_case(model, tokenizer, prompts, None, rp)
            c["kind"] = kind
            plain_cases.append(c)
            for dl in DOLA_LAYER_SETTINGS:
                c = run_case(model, tokenizer, prompts, dl, rp)
                c["kind"] = kind
                c["name"] = f"{kind}|{prompts[0]!r}|dola={dl}|rp={rp}"
                dola_cases.append(c)

    # Early-finishing row inside a DoLa batch: reuse a batch run and declare the
    # token that row 0 produced at step EARLY_EOS_STEP to be the EOS token.  Row 0
    # then finishes early, is padded with pad_token_id, and keeps taking part in
    # the (batch-mean) layer selection while row 1 continues.
    for dl, rp in EARLY_EOS_SETTINGS:
        ref = next(
            c
            for c in dola_cases
            if c["kind"] == "batch_left_padded" and c["dola_layers"] == dl and c["repetition_penalty"] == rp
        )
        eos = ref["generated_ids"][0][EARLY_EOS_STEP]
        c = run_case(model, tokenizer, BATCH_PROMPTS, dl, rp, eos_token_id=eos)
        c["kind"] = "batch_left_padded_early_eos"
        c["name"] = f"{c['kind']}|{BATCH_PROMPTS[0]!r}|dola={dl}|rp={rp}|eos={eos}"
        dola_cases.append(c)

    # candidate layers that transformers resolved for every requested setting
    resolved = {}
    for c in dola_cases:
        key = json.dumps(c["dola_layers"])
        if key in resolved and resolved[key] != c["candidate_layers"]:
            raise RuntimeError("candidate layers differ between runs")
        resolved[key] = c["candidate_layers"]

    # distribution of chosen premature layers (only multi-candidate settings matter)
    dist: dict[str, dict[str, int]] = {}
    for c in dola_cases:
        key = json.dumps(c["dola_layers"])
        d = dist.setdefault(key, {})
        for layer in c["premature_layers"]:
            d[str(layer)] = d.get(str(layer), 0) + 1
    varying_runs = sum(
        1 for c in dola_cases if len(c["candidate_layers"]) > 1 and len(set(c["premature_layers"])) > 1
    )
    multi_runs = sum(1 for c in dola_cases if len(c["candidate_layers"]) > 1)

    cfg = model.config
    expected = {
        "description": "DoLa parity fixtures produced by make_dola_parity.py with transformers 4.55.4",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "model": {
            "path": "model",
            "num_hidden_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "seed": SEED,
            "init": MODEL_KWARGS,
            "dtype": "float32",
        },
        "special_tokens": {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "generation_settings": {
            "do_sample": False,
            "max_new_tokens": MAX_NEW_TOKENS,
            "dola_layers": DOLA_LAYER_SETTINGS,
            "repetition_penalty": REPETITION_PENALTIES,
            "padding_side": "left",
            "relative_top": 0.1,
            "relative_top_base_filter_value": -1e-3,
            "early_eos_settings": [list(x) for x in EARLY_EOS_SETTINGS],
            "early_eos_step": EARLY_EOS_STEP,
            "note": "repetition_penalty null means the argument was not passed (equivalent to 1.0)",
        },
        "resolved_candidate_layers": resolved,
        "premature_layer_distribution": dist,
        "runs_with_varying_premature_layer": f"{varying_runs}/{multi_runs}",
        "dola_cases": dola_cases,
        "plain_greedy": {
            "description": "greedy decoding WITHOUT DoLa; check_plain_greedy.py verifies the same tokens "
            "with the project's transformers",
            "transformers": transformers.__version__,
            "cases": plain_cases,
        },
    }
    EXPECTED.write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {EXPECTED}")
    print("resolved candidate layers:", resolved)
    print("premature layer distribution:", dist)
    print(f"runs with varying premature layer: {varying_runs}/{multi_runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
