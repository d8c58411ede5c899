"""The fast path (core/graph.py) against the core loop.

On CPU (fp32) the graph-free fast step must give the core loop's tokens, probabilities, history and cache exactly
enough that every token agrees, for each layer implementation and read-length bucket, with per-step hooks, schedule
hooks, KV injections and boundary flags. On CUDA the captured graphs must give the graph-free path's tokens.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import janus_decoding
from janus_decoding.core import graph as graph_module
from janus_decoding.core.decode_attention import decode_attention_unavailable
from janus_decoding.core.graph import EagerStepWarning, FastLoop, FastOptions
from janus_decoding.core.loop import Sampler, run
from janus_decoding.core.protocol import KVAppend, LayerKeep, Rollback
from janus_decoding.core.runs import ImageRequest, run_images
from janus_decoding.models.tiny import write_tiny_checkpoint
from janus_decoding.plugins.decoder import Decoder, StrategyOutputError
from janus_decoding.plugins.strategy import Strategy

REQUESTS = [ImageRequest("a red fox in fresh snow", 3, k) for k in range(3)] + [ImageRequest("a cat", 5, 0)]
SAME_PROMPT = REQUESTS[:3]

# The Triton kernels on the CPU model: through the interpreter where CUDA is absent (tests/conftest.py), else skipped.
NO_CPU_TRITON = pytest.mark.skipif(decode_attention_unavailable(torch.device("cpu"), 64) is not None,
                                   reason="Triton's interpreter is off (a CUDA host runs the kernels in the CUDA tests)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-janus", seed=0)


@pytest.fixture(scope="module")
def model(folder):
    # Its own instance: the fused step re-points q/k/v and gate/up weights at shared concatenations.
    return janus_decoding.load_model(str(folder))


def _generate(model, decoder, loop, requests=REQUESTS, **sampler):
    if "rng" in sampler and sampler["rng"] == "torch":
        sampler["generator"] = torch.Generator(device=model.device).manual_seed(7)
    with torch.inference_mode():
        return run_images(model, decoder, requests, cfg=decoder.cfg, sampler=Sampler(**sampler), loop=loop)


def _same_run(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.state.history, b.state.history)
    assert torch.equal(a.state.history_valid, b.state.history_valid)
    assert torch.equal(a.state.next_positions, b.state.next_positions)
    assert a.state.cache.fill == b.state.cache.fill
    assert torch.equal(a.state.cache.valid, b.state.cache.valid)
    assert int(a.state.step_t) == int(b.state.step_t) and a.state.step == b.state.step
    torch.testing.assert_close(a.state.last_probs, b.state.last_probs, rtol=1e-5, atol=1e-6)
    assert a.boundaries == b.boundaries


GRAPH_FREE = [
    FastOptions(graphs=False),
    FastOptions(graphs=False, bucket=4),
    FastOptions(graphs=False, bucket=0),
    FastOptions(graphs=False, layers="transformers", bucket=8),
    FastOptions(graphs=False, compile="eager"),  # the layer pieces traced by dynamo (fullgraph), run as traced
]
SPECS = [
    "",
    'top_k(top_k=50) > temperature(temperature=0.9) > cfg(schedule="linear")',
    "repetition_penalty(penalty=1.3) > top_p(top_p=0.8)",
    "dola(layers=[0, 2])",
]


@pytest.mark.parametrize("options", GRAPH_FREE, ids=lambda o: f"{o.layers}-b{o.bucket}-{o.compile}")
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("sampler", [{}, {"greedy": True}, {"rng": "torch"}], ids=["row", "greedy", "torch"])
def test_graph_free_step_equals_core_loop(model, options, spec, sampler):
    decoder = Decoder.from_spec(spec)
    loop = FastLoop(options)
    _same_run(_generate(model, decoder, run, **sampler), _generate(model, decoder, loop, **sampler))
    steps = model.image_grid[0] * model.image_grid[1]
    assert loop.stats["graph_free_steps"] == steps - 1  # token 0 comes from the prefill


@NO_CPU_TRITON
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]])  # (each run is ~13 s in Triton's interpreter)
def test_triton_attention_step_equals_core_loop(model, spec):
    """The split-KV Triton kernels (on CPU: Triton's interpreter) in place of sdpa: the core loop's tokens, with
    left padding (the "a cat" prompt is shorter) read through the cache's validity bits."""
    decoder = Decoder.from_spec(spec)
    loop = FastLoop(FastOptions(graphs=False, attention="triton", split=32))
    _same_run(_generate(model, decoder, run), _generate(model, decoder, loop))
    assert loop.stats["attention"] == "triton" and loop.stats["graph_free_steps"] > 0


@NO_CPU_TRITON
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]])
def test_triton_gemm_step_equals_core_loop(model, spec):
    """The layer GEMMs through core/skinny_gemm.py (on CPU: Triton's interpreter) give the core loop's tokens (fp32:
    only the summation order differs)."""
    decoder = Decoder.from_spec(spec)
    loop = FastLoop(FastOptions(graphs=False, gemm="triton"))
    _same_run(_generate(model, decoder, run), _generate(model, decoder, loop))
    assert loop.stats["gemm"] == "triton" and loop.stats["graph_free_steps"] > 0
    assert loop.stats["rotary_in_gemm"]  # q/k/v GEMM, rotary and the k/v store in one kernel (core/qkv_rope.py)
    apart = FastLoop(FastOptions(graphs=False, gemm="triton", rotary_in_gemm=False))
    _same_run(_generate(model, decoder, run), _generate(model, decoder, apart))
    assert not apart.stats["rotary_in_gemm"]


def test_gemm_form_by_rows_device_and_options(model):
    """"auto" keeps cuBLAS on CPU; "triton" past its 64 rows says once why it cannot run and falls back; "matvec"
    without compiled pieces falls back too."""
    loop = FastLoop(FastOptions(graphs=False))
    _generate(model, Decoder(), loop)
    assert loop.stats["gemm"] == "cublas"
    graph_module._SAID.clear()
    loop = FastLoop(FastOptions(graphs=False, gemm="matvec"))
    with pytest.warns(EagerStepWarning, match="gemm='matvec' needs"):
        _generate(model, Decoder(), loop)
    assert loop.stats["gemm"] == "cublas"


@NO_CPU_TRITON
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_triton_gemm_under_compiled_pieces_equals_core_loop(model, backend):
    """The GEMM is one custom op, so dynamo keeps it as a call (the interpreter runs under it on CPU); compiled, the
    output projection is split and its parts summed in the graph, SiLU·mul comes from the GEMM's epilogue — and
    the tokens stay the core loop's (fp32: summation order only)."""
    decoder = Decoder.from_spec(SPECS[3])
    loop = FastLoop(FastOptions(graphs=False, gemm="triton", compile=backend))
    _same_run(_generate(model, decoder, run), _generate(model, decoder, loop))
    assert loop.stats["gemm"] == "triton"


def test_auto_attention_picks_by_rows_and_heads(model, monkeypatch):
    """"auto": the Triton kernels only on CUDA with few (row, head) pairs; CPU runs (and many pairs) keep sdpa."""
    loop = FastLoop(FastOptions(graphs=False))
    _generate(model, Decoder(), loop)
    assert loop.stats["attention"] == "sdpa"  # CPU: auto never picks the interpreter
    from janus_decoding.core import decode_attention as kernels
    assert kernels.few_programs(torch.device("cpu"), 1, 32) and not kernels.few_programs(torch.device("cpu"), 32, 32)
    assert kernels.launch_config(torch.device("cpu"), 1, 32) == kernels.FEW
    assert kernels.launch_config(torch.device("cpu"), 32, 32) == kernels.MANY
    assert kernels.launch_config(torch.device("cpu"), 32, 32, chunk=32) == kernels.Launch(32, 32, 4, 3, True)


def test_triton_attention_falls_back_to_sdpa_where_it_cannot_run(model, monkeypatch):
    monkeypatch.setattr(graph_module, "_SAID", set())
    monkeypatch.setattr(graph_module, "decode_attention_unavailable", lambda device, head_dim: "no Triton here")
    loop = FastLoop(FastOptions(graphs=False, attention="triton"))
    with pytest.warns(EagerStepWarning, match="no Triton here"):
        fast = _generate(model, Decoder(), loop)
    assert loop.stats["attention"] == "sdpa"
    _same_run(_generate(model, Decoder(), run), fast)


def test_fused_projections_share_memory(model):
    fused = graph_module.fuse_projections(model)
    layer = model.layers[0]
    assert fused[0].qkv.data_ptr() == layer.self_attn.q_proj.weight.data_ptr()
    rows = layer.self_attn.q_proj.weight.shape[0]
    assert torch.equal(fused[0].qkv[rows: rows + layer.self_attn.k_proj.weight.shape[0]], layer.self_attn.k_proj.weight)
    assert graph_module.fuse_projections(model) is fused  # done once


class _RollbackOnce(Strategy):
    """At step 6, regenerate the last 3 tokens once with RNG stream 1 (a graph-safe strategy with a host hook)."""

    name = "test_rollback_once"
    hooks = ("schedule",)

    def schedule_points(self, state):
        return [6]

    def schedule(self, state):
        if state.memory.get(self.name):
            return None
        state.memory[self.name] = True
        return Rollback(3, 1)


class _InjectAt5(Strategy):
    """Before step 5, append two entries for the rows of image 1 only (the other rows get masked slots)."""

    name = "test_inject_at_5"
    hooks = ("kv_inject",)

    def kv_growth(self, state):
        return 2

    def kv_inject(self, state):
        if state.step != 5:
            return []
        rows = torch.zeros(state.rows, dtype=torch.bool, device=state.adapter.device)
        rows[2:4] = True
        ids = torch.full((state.rows, 2), 7, dtype=torch.long, device=state.adapter.device)
        return [KVAppend(ids=ids, rows=rows)]


class _PrunePrompt(Strategy):
    """Entering layer 2 of the prefill, keep all but 5 prompt positions; layers >= 2 are allocated 5 slots shorter."""

    name = "test_prune_prompt"
    hooks = ("layer",)

    def kv_layer_reduction(self, state):
        return {2: 5}

    def layer_points(self, state):
        return [2]

    def layer(self, state, layer, hidden):
        b, t = hidden.shape[:2]
        kept = torch.arange(5, t, device=hidden.device)[None].expand(b, -1)  # [B, T - 5]
        return LayerKeep(kept)


class _NaNAt9(Strategy):
    """Post-CFG: NaN logits for image 0 at step 9 only (read from the device step, so it survives capture)."""

    name = "test_nan_at_9"
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        hit = (state.step_t == 9) & (torch.arange(logits.shape[0], device=logits.device) == 0)  # [P]
        return torch.where(hit[:, None], torch.full_like(logits, float("nan")), logits)


class _Unsafe(Strategy):
    name = "test_unsafe"
    hooks = ("post_cfg",)
    graph_safe = False

    def post_cfg(self, state, logits):
        return logits


@pytest.mark.parametrize("compile_backend", [None, "eager"])
@pytest.mark.parametrize("strategy", [_RollbackOnce, _InjectAt5, _PrunePrompt], ids=["rollback", "inject", "prune"])
def test_host_hooks_run_eagerly_between_fast_steps(model, strategy, compile_backend):
    """Host hooks between fast steps; traced (``compile="eager"``), the first half's cache store meets layers of two
    lengths (pruning) and a cache truncated by a rollback."""
    decoder = Decoder([strategy()])
    loop = FastLoop(FastOptions(graphs=False, bucket=4, compile=compile_backend))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerStepWarning)
        fast = _generate(model, decoder, loop)
    _same_run(_generate(model, decoder, run), fast)
    assert loop.stats["graph_free_steps"] > 0


@NO_CPU_TRITON
@pytest.mark.parametrize("strategy", [_RollbackOnce, _InjectAt5, _PrunePrompt], ids=["rollback", "inject", "prune"])
def test_triton_attention_with_host_hooks(model, strategy):
    """A schedule rollback (truncated cache), a masked KV injection and a pruning layer (shorter layers with their
    own validity) through the kernels."""
    decoder = Decoder([strategy()])
    loop = FastLoop(FastOptions(graphs=False, attention="triton", split=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerStepWarning)
        fast = _generate(model, decoder, loop)
    _same_run(_generate(model, decoder, run), fast)
    assert loop.stats["attention"] == "triton"


def test_boundary_flags_survive_the_fast_step(model):
    decoder = Decoder([_NaNAt9()])
    for loop in (run, FastLoop(FastOptions(graphs=False))):
        result = _generate(model, decoder, loop)
        with pytest.raises(StrategyOutputError, match="test_nan_at_9"):
            decoder.raise_on_bad_boundaries(result.state)


def test_unsafe_strategy_runs_eagerly_and_says_so_once(model, monkeypatch):
    monkeypatch.setattr(graph_module, "_SAID", set())
    decoder = Decoder([_Unsafe()])
    loop = FastLoop(FastOptions(graphs=False))
    with pytest.warns(EagerStepWarning, match="test_unsafe"):
        fast = _generate(model, decoder, loop)
    assert "eager_run" in loop.stats
    with warnings.catch_warnings():
        warnings.simplefilter("error", EagerStepWarning)  # not said twice
        _generate(model, decoder, loop)
    _same_run(_generate(model, decoder, run), fast)


def test_options_are_checked():
    with pytest.raises(ValueError, match="layers"):
        FastOptions(layers="triton")
    with pytest.raises(ValueError, match="bucket"):
        FastOptions(bucket=-1)
    with pytest.raises(ValueError, match="compile"):
        FastOptions(compile="")
    with pytest.raises(ValueError, match="split"):
        FastOptions(split=48)
    with pytest.raises(ValueError, match="attention"):
        FastOptions(attention="xformers")
    with pytest.raises(ValueError, match="gemm"):
        FastOptions(gemm="cutlass")
    with pytest.raises(ValueError, match="rotary_in_gemm"):
        FastOptions(rotary_in_gemm=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["sdpa", "flash", "triton"])
@pytest.mark.parametrize("spec", SPECS[:2] + [""])
@pytest.mark.parametrize("sampler", [{}, {"rng": "torch"}], ids=["row", "torch"])
def test_cuda_graphs_replay_the_graph_free_step(folder, attention, spec, sampler):
    cuda = janus_decoding.load_model(str(folder), device="cuda", dtype="bf16")
    decoder = Decoder.from_spec(spec)
    loop = FastLoop(FastOptions(attention=attention, bucket=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerStepWarning)
        graphed = _generate(cuda, decoder, loop, SAME_PROMPT, **sampler)
        plain_loop = FastLoop(FastOptions(graphs=False, attention=attention, bucket=8, check_syncs=True))
        plain = _generate(cuda, decoder, plain_loop, SAME_PROMPT, **sampler)
    assert loop.stats["replays"] > 0 and loop.stats["captures"] >= 1
    assert loop.stats["attention"] == attention  # one prompt: no padding, so flash stays on
    _same_run(graphed, plain)
    again = _generate(cuda, decoder, loop, SAME_PROMPT, **sampler)  # fresh numbers per replay, same per seed
    assert torch.equal(again.tokens, graphed.tokens)


def _halve(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


class _UsesCompiled(Strategy):
    """Sends the guided logits through ``state.compiled`` (halve, then double outside: exact in binary)."""

    name = "uses_compiled"
    hooks = ("post_cfg",)

    def begin(self, state) -> None:
        self.handed_back = state.compiled(_halve) is _halve
        self.backend = state.compile_backend

    def post_cfg(self, state, logits):
        return state.compiled(_halve)(logits) * 2


def test_service_compiled(model):
    """The loop decides: the eager loop and an uncompiled fast loop hand ``fn`` back; a compiling one compiles it
    (once per function and backend), and the run gives the same tokens."""
    plain, fast = _UsesCompiled(), _UsesCompiled()
    eager = _generate(model, Decoder([plain]), run)
    assert plain.handed_back and plain.backend is None
    loop = FastLoop(FastOptions(graphs=False, compile="eager"))
    compiled = _generate(model, Decoder([fast]), loop)
    assert not fast.handed_back and fast.backend == "eager"
    assert torch.equal(eager.tokens, compiled.tokens)
    state = compiled.state
    assert state.compiled(_halve) is state.compiled(_halve)


def test_generate_images_takes_fast_options(model):
    decoder = Decoder()
    plain = decoder.generate_images(model, "a fox", n=2, seed=3, fast=False)
    chosen = decoder.generate_images(model, "a fox", n=2, seed=3, fast=FastOptions(graphs=False, compile="eager"))
    assert torch.equal(plain.tokens, chosen.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gemm", ["auto", "triton"])
def test_cuda_graphs_replay_the_compiled_step(folder, gemm):
    """Inductor-compiled layer pieces (with cuBLAS or the Triton GEMM inside) and a strategy's compiled math (DoLa)
    captured and replayed: the replay gives what the same compiled step gives without capture."""
    cuda = janus_decoding.load_model(str(folder), device="cuda", dtype="bf16")
    decoder = Decoder.from_spec("dola(layers=[0, 2])")
    loop = FastLoop(FastOptions(bucket=8, compile="inductor", gemm=gemm))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerStepWarning)
        graphed = _generate(cuda, decoder, loop, SAME_PROMPT)
        plain = _generate(cuda, decoder, FastLoop(FastOptions(graphs=False, bucket=8, compile="inductor", gemm=gemm)),
                          SAME_PROMPT)
    assert loop.stats["replays"] > 0 and graphed.state.compile_backend == "inductor"
    assert loop.stats["gemm"] == ("triton" if gemm == "triton" else "cublas")  # 6 rows: auto keeps cuBLAS
    _same_run(graphed, plain)


def test_copy_by_kernel_is_exact_for_every_dtype_the_step_copies():
    from janus_decoding.core.graph import _copy_by_kernel

    floats = torch.tensor([0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 3e-39])
    for src in (floats, floats.to(torch.bfloat16), torch.tensor([0, -3, 2**62], dtype=torch.long),
                torch.tensor([True, False, True])):
        dst = torch.empty_like(src)
        _copy_by_kernel(dst, src)
        if src.is_floating_point():  # bit for bit (the sign of zero, inf, subnormals); NaN stays NaN
            bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[src.dtype]
            number = ~src.isnan()
            assert torch.equal(dst.view(bits)[number], src.view(bits)[number])
            assert torch.equal(dst.isnan(), src.isnan())
        else:
            assert torch.equal(dst, src) and dst.dtype == src.dtype
