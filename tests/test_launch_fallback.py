"""launch/*.sh find the deepspeed launcher without the `deepspeed` script on PATH.

Some GPU images (wheels installed with --target) have the package but not its console
script; the scripts then run `$PYTHON -m deepspeed.launcher.runner`. Checked with a real
launcher start of one rank that prints `es-llm train --help`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port


def _bare_path(tmp_path: Path) -> str:
    """A PATH with python3 (this interpreter) and the system tools, without `deepspeed`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    if shutil.which("deepspeed", path=path) is not None:
        pytest.fail(f"this machine has a deepspeed script in {path}; the check would not hold")
    return path


@pytest.mark.multiproc
def test_single_node_script_falls_back_to_the_launcher_module(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _bare_path(tmp_path), "MASTER_PORT": str(free_port())}
    env.pop("DEEPSPEED", None)
    env.pop("PYTHON", None)
    proc = subprocess.run(
        ["bash", "launch/single_node.sh", "1", "--help"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--max-train-samples" in proc.stdout  # es-llm train's help, printed by the rank


def test_deepspeed_variable_names_the_launcher(tmp_path: Path) -> None:
    """$DEEPSPEED replaces the launcher command (here a stand-in that prints its arguments)."""
    stand_in = tmp_path / "fake_launcher"
    stand_in.write_text('#!/bin/sh\necho "launcher:$*"\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "DEEPSPEED": f"{stand_in} --extra", "MASTER_PORT": "29999"}
    env.pop("ES_LLM_VERBOSE", None)
    proc = subprocess.run(
        ["bash", "launch/single_node.sh", "2", "--max-steps", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # quiet by default: the launcher's own --log_level, where this DeepSpeed has the flag
    import deepspeed.launcher.runner as runner

    quiet = " --log_level error" if "--log_level" in Path(runner.__file__).read_text() else ""
    assert proc.stdout.strip() == (
        f"launcher:--extra{quiet} --num_gpus 2 --master_port 29999 --module "
        "es_llm.cli train --max-steps 3"
    )
    verbose = subprocess.run(
        ["bash", "launch/single_node.sh", "2", "--verbose", "--max-steps", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verbose.stdout.strip() == (
        "launcher:--extra --num_gpus 2 --master_port 29999 --module es_llm.cli train --verbose "
        "--max-steps 3"
    )
