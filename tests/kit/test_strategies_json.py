"""``janus-decode strategies --json``: every registered strategy with its distribution, version, hook points, modes,
graph-safety, row coupling and a JSON Schema of its parameters (checked against the class it describes)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from janus_decoding.cli import main
from janus_decoding.plugins.hookspecs import HOOK_POINTS
from janus_decoding.plugins.strategy import MODES, REQUIRED
from janus_decoding.strategies import BUILTINS

_JSON_TYPES = {"integer", "number", "string", "boolean", "array"}


def _listing() -> list[dict]:
    result = CliRunner().invoke(main, ["strategies", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_builtin_is_listed_with_its_declaration():
    by_name = {item["name"]: item for item in _listing()}
    assert set(by_name) >= {cls.name for cls in BUILTINS}
    for cls in BUILTINS:
        item = by_name[cls.name]
        assert item["distribution"] == "janus-decoding" and isinstance(item["version"], str) and item["version"]
        assert item["hooks"] == list(cls.hooks) and set(item["hooks"]) <= set(HOOK_POINTS)
        assert item["modes"] == list(cls.modes) and set(item["modes"]) <= set(MODES)
        assert item["graph_safe"] is cls.graph_safe and item["couples_rows"] is cls.couples_rows
        assert item["summary"] == (cls.__doc__ or "").strip().splitlines()[0]


def test_parameters_are_a_json_schema_of_the_params():
    by_name = {item["name"]: item for item in _listing()}
    for cls in BUILTINS:
        schema = by_name[cls.name]["parameters"]
        assert schema["type"] == "object"
        assert list(schema["properties"]) == [p.name for p in cls.params]
        assert schema["required"] == [p.name for p in cls.params if p.default is REQUIRED]
        for p in cls.params:
            prop = schema["properties"][p.name]
            types = {o["type"] for o in prop.get("anyOf", [prop])}
            assert types <= _JSON_TYPES, (cls.name, p.name, prop)
            if p.low is not None:
                assert prop["exclusiveMinimum" if p.low_open else "minimum"] == p.low
            if p.high is not None:
                assert prop["exclusiveMaximum" if p.high_open else "maximum"] == p.high
            if p.choices is not None:
                assert prop["enum"] == list(p.choices)
            if p.default is not REQUIRED and p.default is not None:
                assert prop["default"] == p.default


def test_hf_processor_accepts_forwarded_parameters():
    item = next(i for i in _listing() if i["name"] == "hf_processor")
    assert item["parameters"]["required"] == ["processor"]
    assert item["parameters"]["additionalProperties"] is True
    assert item["graph_safe"] is False


def test_one_strategy_by_name():
    result = CliRunner().invoke(main, ["strategies", "dola", "--json"])
    assert result.exit_code == 0, result.output
    item = json.loads(result.stdout)
    assert item["name"] == "dola" and item["hooks"] == ["post_cfg"]
