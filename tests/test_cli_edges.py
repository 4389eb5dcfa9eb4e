"""The command line's edges: help and bad input answer without heavy imports or DeepSpeed noise,
a non-empty --out is refused unless --overwrite or --resume, and the helpers behind them."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

import pytest
from conftest import REPO, TINY_RUN_ARGS, run_cli

from es_llm.ds_ops import SHM_OP, extension_dir, shm_op_build_pending
from es_llm.errors import InputError
from es_llm.preflight import prepare_out_dir
from es_llm.quiet import KnownHarmlessFilter

HEAVY = ("torch", "deepspeed", "datasets", "transformers")
DS_NOISE = ("Setting accelerator to CPU", "Attempting to get learning rate", "[WARNING]")


def _cli_with_importtime(args: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, set]:
    """Run `python -X importtime -m es_llm.cli ARGS`; return the process and the top-level
    packages it imported."""
    env = {"ES_LLM_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "es_llm.cli", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    stderr = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:"))
    proc.stderr = stderr
    return proc, imported


@pytest.mark.parametrize(
    "args",
    [["--help"], ["train", "--help"], ["compare", "--help"], ["bench", "--help"]],
)
def test_help_imports_no_heavy_package(args, tmp_path):
    proc, imported = _cli_with_importtime(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: es-llm" in proc.stdout
    assert imported.isdisjoint(HEAVY), imported & set(HEAVY)


def test_a_bad_flag_imports_no_heavy_package(tmp_path):
    proc, imported = _cli_with_importtime(["train", "--epochs", "zero"], tmp_path)
    assert proc.returncode == 2
    assert "--epochs: expected a positive integer" in proc.stderr
    assert imported.isdisjoint(HEAVY), imported & set(HEAVY)


def test_every_flag_has_help():
    from es_llm.cli import build_parser

    parser = build_parser(["bench", "kernels"])  # also load the kernel benchmark's flags
    todo = [("es-llm", parser)]
    while todo:
        name, p = todo.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend((f"{name} {n}", sp) for n, sp in action.choices.items())
            elif action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"{name} {action.option_strings[0]} has no help"


def _bad_config(tmp_path):
    path = tmp_path / "bad_es.json"
    path.write_text(json.dumps({"train_batch_size": 8, "evolved_sampling": {"beta1": 2}}))
    return path


BAD_INPUT = {
    "missing data": (lambda t: ["--data", str(t / "nope.txt")], "data path does not exist"),
    "missing config": (lambda t: ["--config", str(t / "nope.json")], "nope.json"),
    "unknown config": (lambda t: ["--config", "no_such_preset"], "unknown ds preset"),
    "invalid ES section": (lambda t: ["--config", str(_bad_config(t))], "evolved_sampling.beta1"),
    "unknown model": (lambda t: ["--model", "gpt9"], "model 'gpt9' is neither a preset"),
    "not a model directory": (lambda t: ["--model", str(_folder(t))], "has no config.json"),
    "tiny text file": (lambda t: ["--data", str(_small_text(t))], "needs at least 2000"),
    "executable as text": (lambda t: ["--data", str(_binary_text(t))], "x.txt is not text"),
}


def _folder(tmp_path):
    path = tmp_path / "not_a_model"
    path.mkdir()
    return path


def _binary_text(tmp_path):
    import shutil

    path = tmp_path / "x.txt"
    shutil.copyfile("/bin/ls", path)
    return path


def _small_text(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("to be or not to be\n\n" * 20)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_before_any_engine(case, tmp_path):
    make_args, message = BAD_INPUT[case]
    out = tmp_path / "out"
    proc, imported = _cli_with_importtime(["train", *make_args(tmp_path), "--out", str(out)],
                                          tmp_path)  # fmt: skip
    assert imported.isdisjoint(HEAVY), imported & set(HEAVY)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("es-llm: error: "), proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    for noise in DS_NOISE:
        assert noise not in proc.stdout + proc.stderr
    assert not out.exists()


def test_resume_without_checkpoint_fails_before_any_engine(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    proc, imported = _cli_with_importtime(["train", "--resume", str(run)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("es-llm: error: no checkpoint directory")
    assert "deepspeed" not in imported
    for noise in DS_NOISE:
        assert noise not in proc.stdout + proc.stderr


def test_a_non_empty_out_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"old": true}\n')
    proc, imported = _cli_with_importtime(["train", "--out", str(out)], tmp_path)
    assert proc.returncode == 2
    assert "already holds a run's files: pass --overwrite" in proc.stderr
    assert f"--resume {out}" in proc.stderr
    assert imported.isdisjoint(HEAVY)
    assert (out / "metrics.jsonl").read_text() == '{"old": true}\n'


def _out_args(out, **kw) -> argparse.Namespace:
    return argparse.Namespace(out=str(out), resume=kw.get("resume"), overwrite=kw.get("overwrite"))


def test_prepare_out_dir(tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare_out_dir(_out_args(out))  # missing: fine
    out.mkdir()
    prepare_out_dir(_out_args(out))  # empty: fine
    (out / "checkpoints" / "global_step3").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    with pytest.raises(InputError, match="--overwrite"):
        prepare_out_dir(_out_args(out))
    prepare_out_dir(_out_args(out, resume=str(out)))  # resuming keeps everything
    assert (out / "summary.json").is_file()
    monkeypatch.setenv("RANK", "1")  # only rank 0 clears
    prepare_out_dir(_out_args(out, overwrite=True))
    assert (out / "summary.json").is_file()
    monkeypatch.setenv("RANK", "0")
    prepare_out_dir(_out_args(out, overwrite=True))
    assert out.is_dir() and list(out.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        prepare_out_dir(_out_args(tmp_path / "file"))
    monkeypatch.chdir(out)
    (out / "x").write_text("x")
    with pytest.raises(InputError, match="working directory"):
        prepare_out_dir(_out_args(tmp_path, overwrite=True))


def test_known_harmless_deepspeed_lines_are_filtered():
    f = KnownHarmlessFilter()

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, msg, None, None)

    assert not f.filter(record("Setting accelerator to CPU. If you have GPU or other ..."))
    assert not f.filter(
        record("Attempting to get learning rate from scheduler before it has started")
    )
    assert f.filter(record("gradient overflow, skipping step"))


def test_deepspeeds_deprecated_collective_names_do_not_warn(monkeypatch):
    import warnings

    from es_llm.quiet import quiet_deepspeed

    monkeypatch.delenv("ES_LLM_VERBOSE", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_deepspeed()
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_object"):
            message = f"`torch.distributed.{name}` is deprecated. Use x"
            warnings.warn(message, FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "`torch.distributed.all_gather_object` is deprecated. Use x"
    ]


def test_op_build_notice_looks_in_torchs_extension_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension_dir(SHM_OP) == tmp_path / SHM_OP
    assert shm_op_build_pending()
    (tmp_path / SHM_OP).mkdir()
    (tmp_path / SHM_OP / f"{SHM_OP}.so").write_bytes(b"")
    assert not shm_op_build_pending()
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    (tmp_path / SHM_OP / f"{SHM_OP}.so").unlink()
    assert not shm_op_build_pending()  # GPU runs never build it


@pytest.mark.multiproc
def test_overwrite_clears_the_old_run_and_trains_quietly(tmp_path, es_cache, tiny_ds_config):
    out = tmp_path / "out"
    (out / "checkpoints" / "global_step99").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"old": true}\n')
    cfg = tiny_ds_config()
    proc = run_cli(["train", "--config", str(cfg), "--out", str(out), "--max-steps", "2",
                    "--overwrite", *TINY_RUN_ARGS], es_cache)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "checkpoints").exists()
    assert '"old"' not in (out / "metrics.jsonl").read_text()
    assert (out / "summary.json").is_file()
    for noise in DS_NOISE[:2]:
        assert noise not in proc.stdout + proc.stderr, noise
    assert REPO.is_dir()
