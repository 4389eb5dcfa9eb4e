"""TEST ONLY: `es-llm ...` (es_llm.cli.main) in CPU processes with tests/megatron_shim.py applied.

Megatron-core 0.16.1 hard-codes some CUDA calls; on a GPU the driver runs unpatched. Usage::

    python tests/megatron_launch.py --nproc N train --engine megatron ...   # N gloo ranks
    torchrun --nproc_per_node N tests/megatron_launch.py train --engine megatron ...
    python tests/megatron_launch.py --nproc N --example ...   # examples/megatron_loop.py

Why `--nproc`: it imports torch, megatron-core, transformers and es-llm once and then forks
the N rank processes (each with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address set
as torchrun sets them). Every rank is a real process with its own gloo process group, but
none pays the ~4 s of imports again: on the 2-core test machine that halves a run's time.
The parent waits for all ranks and exits with the first non-zero exit status, killing the
others (a rank that fails leaves its peers blocked in a collective); a rank whose launcher
dies is killed with it. With
$MEGATRON_LAUNCH_PIDS set, it writes the ranks' pids there, in rank order.
"""

import os
import runpy
import signal
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import megatron_shim  # noqa: E402

megatron_shim.apply()


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "--example":
        example = HERE.parent / "examples" / "megatron_loop.py"
        sys.argv = [str(example), *argv[1:]]
        runpy.run_path(str(example), run_name="__main__")
        return 0
    from es_llm.cli import main

    return main(argv)


def _die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when the launcher dies (a test that kills the launcher
    leaves no rank running)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


def _fork_ranks(n: int, argv: list[str]) -> int:
    # what every rank imports, once, before the fork
    import matplotlib.pyplot  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import transformers  # noqa: F401

    import es_llm.cli  # noqa: F401
    import es_llm.drivers.megatron.train  # noqa: F401

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                              LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))  # fmt: skip
            code = 1
            try:
                code = _run(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    if os.environ.get("MEGATRON_LAUNCH_PIDS"):  # for tests that signal one rank
        Path(os.environ["MEGATRON_LAUNCH_PIDS"]).write_text(" ".join(map(str, pids)))
    status = 0
    alive = set(pids)
    while alive:
        pid, raw = os.wait()
        alive.discard(pid)
        code = os.waitstatus_to_exitcode(raw)
        if code != 0 and status == 0:
            status = code if code > 0 else 128 - code
            for other in alive:  # the ranks this script started
                os.kill(other, signal.SIGKILL)
    return status


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--nproc"]:
        sys.exit(_fork_ranks(int(args[1]), args[2:]))
    sys.exit(_run(args))
