"""Issue 23: input that used to fail late, with a traceback or silently, is one line up front.

Unreadable data and unwritable output/cache folders are tested for real: as root (the usual
test user here) permission bits do not stop a read or a write, so those checks run in a forked
child that drops to the unprivileged user `nobody` first. Forked, not started: the interpreter
may live where `nobody` cannot even look (a pyenv under /root), and a fork needs no file; every
module the child runs is imported by a first pass as the test user, while the files are
readable.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli

from es_llm.cli import build_parser
from es_llm.data import load_corpus
from es_llm.data.instruct import IGNORE_INDEX, InstructDataError, local_instruct_source
from es_llm.data.sources import UnreadableDataError, hub_source, hub_unreachable, resolve_source
from es_llm.data.tokenizer import EOD_TOKEN, train_bpe
from es_llm.errors import InputError
from es_llm.preflight import check_output_dirs, check_train_inputs

NOBODY = 65534
ROOT = os.geteuid() == 0


# ----------------------------------------------------------------------------- helpers
def unprivileged(fn: Callable[[], object]) -> tuple[str, str]:
    """Run ``fn`` in a forked child as `nobody` (as this user when it is not root): the
    exception's class name and message, or ("ok", "")."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(r)
            if ROOT:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                fn()
                result = ["ok", ""]
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                result = [type(e).__name__, str(e)]
            os.write(w, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, status
    name, message = json.loads(data)
    return name, message


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A folder `nobody` can enter (pytest's own tmp folders are root's alone), holding
    ``own/``, which `nobody` may write; permissions restored before it is removed."""
    base = Path(tempfile.mkdtemp(prefix="es_llm_perm_", dir="/tmp")) if ROOT else tmp_path
    base.chmod(0o755)
    own = base / "own"
    own.mkdir()
    if ROOT:
        os.chown(own, NOBODY, NOBODY)
    yield base
    for dirpath, dirnames, _ in os.walk(base):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
    os.chmod(base, 0o755)
    if ROOT:
        shutil.rmtree(base, ignore_errors=True)


def train_args(*flags: str):
    return build_parser(["train"]).parse_args(["train", *flags])


def long_text(i: int) -> str:
    return "\n\n".join(f"paragraph {i}.{k} " + "words and more words " * 8 for k in range(20))


def unreadable(path: Path) -> None:
    path.chmod(0)


# ----------------------------------------------------------------------------- 1. unreadable
def _file(base: Path) -> tuple[list[str], Path]:
    f = base / "a.txt"
    f.write_text(long_text(0))
    return ["--data", str(f)], f


def _file_in_folder(base: Path) -> tuple[list[str], Path]:
    d = base / "docs"
    d.mkdir()
    (d / "a.txt").write_text(long_text(1))
    (d / "b.jsonl").write_text(json.dumps({"text": long_text(2)}) + "\n")
    return ["--data", str(d)], d / "b.jsonl"


def _folder_in_folder(base: Path) -> tuple[list[str], Path]:
    d = base / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(long_text(1))
    (d / "sub" / "c.txt").write_text(long_text(3))
    return ["--data", str(d)], d / "sub"


def _val_file(base: Path) -> tuple[list[str], Path]:
    f = base / "val.jsonl"
    f.write_text(json.dumps({"text": long_text(4)}) + "\n")
    return ["--val-data", str(f)], f


def _parquet_in_folder(base: Path) -> tuple[list[str], Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = base / "docs"
    d.mkdir()
    (d / "a.txt").write_text(long_text(1))
    pq.write_table(pa.table({"text": [long_text(5)]}), d / "p.parquet")
    return ["--data", str(d)], d / "p.parquet"


@pytest.mark.parametrize(
    "make", [_file, _file_in_folder, _folder_in_folder, _val_file, _parquet_in_folder]
)
def test_unreadable_data_is_one_line_naming_it(shared, make):
    flags, target = make(shared)
    own = shared / "own"
    args = train_args(*flags, "--out", str(own / "out"), "--cache-dir", str(own / "cache"))
    check_train_inputs(args)  # readable: passes (and imports what the child runs)
    unreadable(target)
    name, message = unprivileged(lambda: check_train_inputs(args))
    assert name == UnreadableDataError.__name__, (name, message)
    assert f"cannot read data {target}: Permission denied" == message


def test_unreadable_file_is_one_line_when_the_corpus_is_read(shared):
    """The loaders say the same where no preflight ran (load_corpus from Python)."""
    _, folder_file = _file_in_folder(shared)
    pc = shared / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    resolve_source(str(folder_file.parent)).load()
    local_instruct_source(str(pc)).load()
    for path, read in (
        (folder_file, lambda: resolve_source(str(folder_file.parent)).load()),
        (pc, lambda: local_instruct_source(str(pc)).load()),
    ):
        unreadable(path)
        assert unprivileged(read) == (
            UnreadableDataError.__name__,
            f"cannot read data {path}: Permission denied",
        )


# ----------------------------------------------------------------------------- 2. unwritable
def _locked(base: Path) -> Path:
    """A folder `nobody` (or, not as root, this user) cannot write in."""
    d = base / "locked"
    d.mkdir()
    if not ROOT:
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return d


@pytest.mark.parametrize(
    ("case", "flags", "env", "message"),
    [
        ("out exists", ["--out", "{L}"], {}, "--out {L} is not writable: cannot create a file"),
        ("out to create", ["--out", "{L}/new/run"], {},
         "--out {L}/new/run is not writable: cannot create it in {L} (Permission denied)"),
        ("cache dir", ["--cache-dir", "{L}/cache"], {},
         "--cache-dir {L}/cache is not writable: cannot create it in {L}"),
        ("cache env", [], {"ES_LLM_CACHE": "{L}"},
         "the cache directory $ES_LLM_CACHE {L} is not writable: cannot create a file in it"),
        ("default cache", [], {"HOME": "{L}", "ES_LLM_CACHE": None},
         "the default cache directory {L}/.cache/es_llm is not writable: cannot create it in {L}"),
    ],
)  # fmt: skip
def test_unwritable_out_or_cache_is_one_line_before_the_data(shared, case, flags, env, message):
    locked = str(_locked(shared))
    own = shared / "own"
    flags = [f.replace("{L}", locked) for f in flags]
    if "--out" not in flags:
        flags += ["--out", str(own / "out")]
    if "--cache-dir" not in flags and not env:
        flags += ["--cache-dir", str(own / "cache")]
    # the data is missing too: the folders are checked first
    args = train_args(*flags, "--data", str(shared / "missing.txt"))

    def check() -> None:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v.replace("{L}", locked)
        check_train_inputs(args)

    name, got = unprivileged(check)
    assert name == InputError.__name__, (name, got)
    assert got.startswith(message.replace("{L}", locked)), got
    assert got.endswith("--out") or "--cache-dir" in got, got  # says what to change
    assert "\n" not in got


def test_the_write_check_leaves_nothing_behind(tmp_path):
    out, cache = tmp_path / "a" / "b", tmp_path / "cache"
    cache.mkdir()
    check_output_dirs(train_args("--out", str(out), "--cache-dir", str(cache)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert not any(cache.iterdir())
    afile = tmp_path / "f"
    afile.write_text("x")
    for target, message in ((afile, "it is a file"), (afile / "sub", f"{afile} is a file")):
        with pytest.raises(InputError, match=f"--out {target}: {message}, not a directory"):
            check_output_dirs(train_args("--out", str(target), "--cache-dir", str(cache)))


@pytest.mark.parametrize("command", ["train", "compare"])
def test_out_below_a_file_is_one_line_from_the_command_line(tmp_path, es_cache, command):
    afile = tmp_path / "f"
    afile.write_text("x")
    out = afile / "run"
    proc = run_cli([command, "--out", str(out), "--no-progress"], es_cache, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"es-llm: error: --out {out}: {afile} is a file, not a directory: choose a writable --out"
    ]


# ----------------------------------------------------------------------------- 3./4. instruct
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}" + EOD_TOKEN + "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(n))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat_tok")
    train_bpe([" ".join(WORDS) + " <user> <assistant> <system>"] * 10, 300).save(
        str(d / "tokenizer.json")
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN}
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return d


def load(data: Path, cache: Path, **kw):
    return load_corpus(str(data), cache_dir=cache, seq_len=32, vocab_size=300, progress=False, **kw)


def test_empty_completions_are_left_out_and_counted(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    good = [
        {"prompt": f"Q{i}: {words(i, 3)}?", "completion": f" {words(i, 2)}."} for i in range(40)
    ]
    empty = [{"prompt": f"E{i}: {words(i, 3)}?", "completion": ""} for i in range(10)]
    blank = [{"prompt": f"B{i}: {words(i, 3)}?", "completion": " \n\t"} for i in range(5)]
    c = load(write_jsonl(tmp_path / "pc.jsonl", good + empty + blank), tmp_path / "cache")
    rep = c.composition["instruct"]
    assert rep["records"] == 55
    assert rep["dropped_no_completion_tokens"] == rep["dropped_empty_completion"] == 15
    assert len(c.train) + len(c.val) == 40
    assert "15 left out (15 with an empty completion, 0 with no completion token" in (
        capsys.readouterr().err
    )
    for row in list(c.train) + list(c.val):  # a completion is more than the eod token
        assert (np.array(row["labels"]) != IGNORE_INDEX).sum() >= 2


def test_empty_assistant_turns_are_left_out_and_counted(tmp_path, chat_tokenizer):
    def chat(i: int, answer: str | None) -> dict:
        msgs = [{"role": "system", "content": "kappa"}, {"role": "user", "content": words(i, 2)}]
        return {"messages": msgs + ([] if answer is None else [{"role": "assistant",
                                                                 "content": answer}])}  # fmt: skip

    # the empty ones first: keys are by position, and each split keeps some good records
    recs = [chat(i, "") for i in range(6)] + [chat(i, None) for i in range(4)]
    recs += [chat(i, words(i + 1, 2)) for i in range(60)]
    cpc = [{"prompt": [{"role": "user", "content": words(i, 2)}],
            "completion": [{"role": "assistant", "content": "" if i < 3 else "theta"}]}
           for i in range(30)]  # fmt: skip
    for data, dropped in ((recs, 10), (cpc, 3)):
        path = write_jsonl(tmp_path / f"chat{dropped}.jsonl", data)
        c = load(path, tmp_path / "cache", tokenizer=str(chat_tokenizer))
        rep = c.composition["instruct"]
        assert rep["dropped_empty_completion"] == rep["dropped_no_completion_tokens"] == dropped
        assert len(c.train) + len(c.val) == len(data) - dropped


def test_a_set_whose_every_completion_is_empty_is_one_line(tmp_path):
    recs = [{"prompt": f"Q{i}: {words(i, 3)}?", "completion": ""} for i in range(30)]
    data = write_jsonl(tmp_path / "empty.jsonl", recs)
    with pytest.raises(InstructDataError, match="every one of the 2?[0-9] train records has an "
                       "empty completion") as built:  # fmt: skip
        load(data, tmp_path / "cache")
    assert "seq-len" not in str(built.value)  # not the wrong advice
    args = train_args("--data", str(data), "--out", str(tmp_path / "o"),
                      "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(InstructDataError, match="every one of its 30 instruction records has an "
                       "empty completion"):  # fmt: skip
        check_train_inputs(args)  # before any engine: the CLI prints it as one line


def _msgs(*roles: str) -> list[dict]:
    return [{"role": r, "content": words(k, 2)} for k, r in enumerate(roles)]


@pytest.mark.parametrize(
    ("good", "bad", "where"),
    [
        ({"messages": _msgs("user", "assistant")}, {"messages": _msgs("user", "tool")},
         "'messages' message 1 has role 'tool'"),
        ({"prompt": _msgs("user"), "completion": _msgs("assistant")},
         {"prompt": _msgs("system", "human"), "completion": _msgs("assistant")},
         "'prompt' message 1 has role 'human'"),
        ({"prompt": _msgs("user"), "completion": _msgs("assistant")},
         {"prompt": _msgs("user"), "completion": _msgs("bot")},
         "'completion' message 0 has role 'bot'"),
    ],
)  # fmt: skip
def test_an_unknown_role_names_it_and_the_record(tmp_path, good, bad, where):
    data = write_jsonl(tmp_path / "bad.jsonl", [good, good, good, bad, good])
    want = f"{data}: record 3: {where}; roles are system, user, assistant"
    with pytest.raises(InstructDataError) as err:
        local_instruct_source(str(data)).load()
    assert str(err.value).startswith(want), str(err.value)
    args = train_args("--data", str(data), "--out", str(tmp_path / "o"),
                      "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(InstructDataError) as err:
        check_train_inputs(args)  # before any engine: the CLI prints it as one line
    assert str(err.value).startswith(want), str(err.value)


# ----------------------------------------------------------------------------- 5. hub offline
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: a connection is refused at once


def test_a_hub_name_without_network_is_one_line_within_seconds(tmp_path, es_cache):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[var] = ""
    t0 = time.monotonic()
    proc = run_cli(["train", "--data", "someone/no-such-set", "--out", str(tmp_path / "o"),
                    "--no-progress"], es_cache, env=env, timeout=120)  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no retry lines, no library noise
    assert lines[0].startswith("es-llm: error: could not load Hugging Face dataset "), lines
    assert "is not reachable" in lines[0] and "not in the local datasets cache" in lines[0]
    assert took < 15, took  # it retried for about 27 s before


def test_a_cached_hub_dataset_still_loads_offline(tmp_path, monkeypatch, capsys):
    """The offline path keeps the local `datasets` cache: a hub dataset cached there loads."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    texts = [long_text(i)[:300] for i in range(8)]
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [{"text": t} for t in texts])
    datasets.load_dataset("json", data_files=str(rows), split="train")
    # the cache as a hub download leaves it: <namespace>___<name>/<config>/<version>/<hash>/
    (built,) = [p for p in (tmp_path / "hf" / "json").glob("*/*/*") if p.is_dir()]  # no locks
    entry = tmp_path / "hf" / "someone___tiny" / "default" / built.parent.name / built.name
    shutil.copytree(built, entry)
    (entry / "json-train.arrow").rename(entry / "tiny-train.arrow")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_unreachable.cache_clear()
    try:
        docs = hub_source("someone/tiny").load()
    finally:
        hub_unreachable.cache_clear()
    assert [d.text for d in docs] == texts
    assert "using the cached copy of 'someone/tiny'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. progress
PROGRESS_SCRIPT = """
import sys
from es_llm.cli import build_parser
from es_llm.preflight import check_train_inputs

model, tok, out, cache = sys.argv[1:5]
args = build_parser(["train"]).parse_args(
    ["train", "--model", model, "--tokenizer", tok, "--out", out, "--cache-dir", cache,
     "--seq-len", "32", "--no-progress"]
)
check_train_inputs(args)  # what `es-llm train` runs first, on every rank

import datasets
from huggingface_hub.utils import are_progress_bars_disabled

from es_llm.model import load_model, resolve_model

load_model(resolve_model(model), vocab_size=320, seq_len=32, eod_id=0)  # "Loading weights"
datasets.Dataset.from_dict({"x": list(range(100))}).save_to_disk(cache + "/ds")  # "Saving"
assert are_progress_bars_disabled()  # downloads
print("done")
"""


def test_no_progress_silences_the_libraries_bars(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from hf_models import save_model, save_tokenizer

    model = save_model(tmp_path / "model", "gpt2")
    tok = save_tokenizer(tmp_path / "tok")
    env = {k: v for k, v in os.environ.items() if "PROGRESS" not in k}
    proc = subprocess.run(
        [sys.executable, "-c", PROGRESS_SCRIPT, str(model), str(tok), str(tmp_path / "out"),
         str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr, proc.stderr
    assert "%|" not in proc.stderr, proc.stderr
