"""The README's examples are run: its Bundles commands and its Python snippet."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_setup_commands_are_the_ones_ci_runs():
    commands = _blocks("bash")
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    test_command = next(c.strip() for c in commands if "pytest" in c)
    assert test_command in ci
    assert any("edgerun demo" in c and "pip install" in c for c in commands)


def _script(block: str) -> str:
    return block.replace(".venv/bin/", str(Path(sys.executable).parent) + "/")


def test_bundle_server_and_python_examples_run(tmp_path):
    bundles = next(c for c in _blocks("bash") if "bundle create" in c)
    result = subprocess.run(["bash", "-ec", _script(bundles)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert '"label":{"dtype":"int64","shape":[1],"data":[2]}' in result.stdout

    serving = next(c for c in _blocks("bash") if "edgerun serve" in c)
    result = subprocess.run(["bash", "-ec", _script(serving) + "wait\n"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert '"outputs":[{"name":"label","datatype":"INT64","shape":[1],"data":[2]}' in \
        result.stdout
    assert '{"outputs":{"label":[2],"probabilities":' in result.stdout
    assert 'edgerun_requests_total{model="digits",version="1",transport="http",outcome="ok"} 2' \
        in result.stdout

    (snippet,) = _blocks("python")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first, batched = result.stdout.splitlines()
    assert first == "[2]" and batched.startswith("[2, ") and batched.count(",") == 63
