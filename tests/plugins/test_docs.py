"""Meta-tests (datasette's pattern): every hook point is documented under its exact signature and has a test; the
spec's order is the execution order."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from janus_decoding import Decoder
from janus_decoding.plugins.hookspecs import HOOK_POINTS, StrategyHookPoints
from janus_decoding.plugins.registry import build_registry
from plugins_fixtures import recorders

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "hook-points.md"
HOOK_TESTS = Path(__file__).with_name("test_hooks.py")


def _signature(name: str) -> str:
    params = list(inspect.signature(getattr(StrategyHookPoints, name)).parameters)[1:]  # drop self
    return f"{name}({', '.join(params)})"


def _headings() -> list[str]:
    return re.findall(r"^### `(.+?)`\s*$", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)


@pytest.mark.parametrize("name", HOOK_POINTS)
def test_hook_point_is_documented_with_its_signature(name):
    assert _signature(name) in _headings(), f"docs/hook-points.md lacks a section `### \\`{_signature(name)}\\``"


@pytest.mark.parametrize("name", HOOK_POINTS)
def test_hook_point_has_a_test(name):
    tests = re.findall(r"^def (test_hook_\w+)\(", HOOK_TESTS.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert f"test_hook_{name}" in tests


@pytest.mark.parametrize("name", HOOK_POINTS)
def test_hook_point_has_a_docstring(name):
    assert (getattr(StrategyHookPoints, name).__doc__ or "").strip()


def test_documented_sections_are_hook_points_in_loop_order():
    names = [h.split("(")[0] for h in _headings()]
    assert names == list(HOOK_POINTS)


def test_three_strategies_run_in_the_specs_order_not_pluggys(janus):
    """pluggy calls hookimpls last-registered-first; the decoder must call strategies in the spec's order."""
    registry = build_registry(extra_plugins=[recorders])
    for order in (["tag_a", "tag_b", "tag_c"], ["tag_c", "tag_a", "tag_b"], ["tag_b", "tag_c", "tag_a"]):
        spec = " > ".join(f"{name}(mark={i + 1}.0)" for i, name in enumerate(order))
        result = Decoder.from_spec(spec, registry=registry).generate_images(janus, "a cat", seed=0)
        calls = [e for e in result.trace if e["strategy"] == "order"][0]["calls"]
        assert [name for name, _ in calls] == order
        # each one received the logits as left by the ones before it (marks 1, 2 added in turn)
        base = calls[0][1]
        assert calls[1][1] == pytest.approx(base + 1.0) and calls[2][1] == pytest.approx(base + 3.0)


def _ebnf_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if ":=" in line]


def test_composition_doc_has_the_parsers_grammar():
    """docs/composition.md publishes the EBNF of plugins/spec.py, rule for rule (so the two cannot drift)."""
    from janus_decoding.plugins import spec

    doc = (ROOT / "docs" / "composition.md").read_text(encoding="utf-8")
    block = re.search(r"```ebnf\n(.*?)```", doc, flags=re.DOTALL)
    assert block, "docs/composition.md lacks an ```ebnf block"
    source = Path(spec.__file__).read_text(encoding="utf-8")  # the source, not __doc__: its backslashes are escaped
    assert _ebnf_lines(block.group(1)) == _ebnf_lines(source.split('"""')[1])


def test_fast_path_page_lists_every_option():
    """docs/fast-path.md's option table names each field of FastOptions with its default (so the two cannot drift)."""
    import ast
    import dataclasses

    from janus_decoding.core.graph import FastOptions

    page = (Path(__file__).resolve().parents[2] / "docs" / "fast-path.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", page, re.M))
    for option in dataclasses.fields(FastOptions):
        assert option.name in rows, f"docs/fast-path.md lacks a row for FastOptions.{option.name}"
        assert ast.literal_eval(rows[option.name]) == option.default, \
            f"docs/fast-path.md gives {option.name}'s default as {rows[option.name]}, the code {option.default!r}"
