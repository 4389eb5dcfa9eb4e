"""TEST ONLY: `es-llm ...` (es_llm.cli.main) in a CPU process with tests/megatron_shim.py applied.

Megatron-core 0.16.1 hard-codes some CUDA calls; on a GPU the driver runs unpatched. The
tests start this script once per rank with torchrun (gloo), e.g.::

    torchrun --nproc_per_node 2 tests/megatron_launch.py train --engine megatron ...

`--example` runs examples/megatron_loop.py instead of the command line, with its arguments.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import megatron_shim  # noqa: E402

megatron_shim.apply()

if len(sys.argv) > 1 and sys.argv[1] == "--example":
    example = Path(__file__).resolve().parent.parent / "examples" / "megatron_loop.py"
    sys.argv = [str(example), *sys.argv[2:]]
    runpy.run_path(str(example), run_name="__main__")
else:
    from es_llm.cli import main

    sys.exit(main(sys.argv[1:]))
