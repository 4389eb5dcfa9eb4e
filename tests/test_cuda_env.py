"""TORCH_CUDA_ARCH_LIST normalisation, checked against the installed DeepSpeed's own parser."""

from __future__ import annotations

import io
import os

import pytest

from es_llm.cuda_env import VAR, fix_torch_cuda_arch_list, is_accepted, normalize_arch_list


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("9.0a", "9.0"),
        ("9.0a+PTX", "9.0+PTX"),
        ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
        ("8.0 9.0a", "8.0;9.0"),
        ("9.0;9.0a", "9.0"),
        ("10.0f;12.0a", "10.0;12.0"),
    ],
)
def test_suffixes_are_dropped(given: str, expected: str) -> None:
    assert normalize_arch_list(given) == expected
    assert is_accepted(expected)


@pytest.mark.parametrize("valid", ["9.0", "8.0;9.0+PTX", "7.0 8.0 9.0", " 9.0 ", ""])
def test_valid_lists_are_left_untouched(valid: str) -> None:
    assert normalize_arch_list(valid) is valid


def test_unknown_entries_are_kept_not_guessed() -> None:
    assert normalize_arch_list("Hopper;9.0a") == "Hopper;9.0"
    assert not is_accepted("Hopper;9.0")


def test_environment_is_fixed_in_place_with_one_line() -> None:
    env = {VAR: "8.0;9.0a+PTX"}
    log = io.StringIO()
    assert fix_torch_cuda_arch_list(env, log) == "8.0;9.0+PTX"
    assert env[VAR] == "8.0;9.0+PTX"
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "'8.0;9.0a+PTX' -> '8.0;9.0+PTX'" in lines[0]
    # idempotent and silent the second time; absent or valid lists are not touched
    log2 = io.StringIO()
    assert fix_torch_cuda_arch_list(env, log2) is None and log2.getvalue() == ""
    empty: dict[str, str] = {}
    assert fix_torch_cuda_arch_list(empty, log2) is None and empty == {}
    assert log2.getvalue() == ""


def _deepspeed_flags(arch_list: str, jit: bool, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The compute-capability step of DeepSpeed's CUDA op builder (FusedAdam's base class)."""
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    class Probe(CUDAOpBuilder):
        BUILD_VAR = "DS_BUILD_ES_LLM_PROBE"
        NAME = "es_llm_probe"

        def __init__(self) -> None:
            super().__init__(name=self.NAME)

        def absolute_name(self) -> str:
            return self.NAME

        def sources(self) -> list[str]:
            return []

    monkeypatch.setenv(VAR, arch_list)
    probe = Probe()
    probe.jit_mode = jit
    return probe.compute_capability_args()


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("given", ["9.0a", "8.0;9.0a+PTX", "8.0 9.0a"])
def test_deepspeed_parses_the_normalised_list(
    given: str, jit: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="invalid literal for int"):
        _deepspeed_flags(given, jit, monkeypatch)  # the failure the GPU image hits
    flags = _deepspeed_flags(normalize_arch_list(given), jit, monkeypatch)
    if not jit:  # cross-compile mode returns explicit flags; JIT mode hands them to torch
        assert "-gencode=arch=compute_90,code=sm_90" in flags
    assert "9.0" in os.environ[VAR]
