"""The third-party example (examples/example-plugin) installs, is discovered through its entry point, and decodes.

Self-contained and hermetic: the example is pip-installed (no network: ``--no-deps --no-build-isolation``) into a
temporary target folder that only the subprocesses see on ``PYTHONPATH``; the shared environment is left as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "example-plugin"
DISTRIBUTION = "janus-decoding-min-p"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for subprocesses: the example installed on PYTHONPATH, autoload ENABLED, a private cache."""
    tmp = tmp_path_factory.mktemp("example-plugin")
    target = tmp / "site"
    # A copy, so the non-isolated build leaves no build/ or egg-info in the repository.
    source = shutil.copytree(EXAMPLE, tmp / "source", ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True, cwd=tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JANUS_DECODING_")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JANUS_DECODING_CACHE"] = str(tmp / "cache")
    return env


def janus_decode(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "janus_decoding", *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_min_p_is_listed_with_its_distribution(plugin_env):
    items = json.loads(janus_decode(plugin_env, "strategies", "--json").stdout)
    by_name = {item["name"]: item for item in items}
    assert "min_p" in by_name, sorted(by_name)
    assert by_name["min_p"]["distribution"] == DISTRIBUTION
    assert by_name["min_p"]["hooks"] == ["post_cfg"]
    assert by_name["temperature"]["distribution"] == "janus-decoding"


def test_generate_with_min_p(plugin_env, tmp_path):
    out = tmp_path / "out"
    janus_decode(plugin_env, "generate", "x", "--decoder", "min_p(min_p=0.1)", "-n", "1", "--model", "tiny",
                 "--out", str(out))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 1 and manifest[0]["decoder"] == "min_p(min_p=0.1)"
    assert all((out / name).is_file() for name in manifest[0]["files"])


def test_example_tests_pass(plugin_env):
    """The example's own suite (public kit only) passes in its own pytest rootdir."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE)],
                            env=plugin_env, capture_output=True, text=True, cwd=EXAMPLE, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
