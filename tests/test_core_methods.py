"""The registry of sampling methods: contents, traits, each method's own keys, no name tests
outside the registry, and a method defined here usable by select_step end to end."""

from __future__ import annotations

import io
import math
import tokenize
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError, field_validator

import es_llm
from es_llm.errors import InputError
from es_llm.sampling.config import (
    METHODS,
    ESConfigError,
    EvolvedSamplingConfig,
    es_config_from_ds_config,
)
from es_llm.sampling.methods import (
    Options,
    SamplingMethod,
    Visit,
    base,
    get_method,
    method_names,
    option_owners,
    register,
    registered,
)
from es_llm.sampling.methods.eswp import PruningOptions
from es_llm.sampling.methods.lp import LPOptions
from es_llm.sampling.methods.trim import TrimOptions
from es_llm.sampling.selector import select_step

BUILT_IN = (
    "es", "eswp", "prune", "uniform", "loss", "ema", "topk", "lp", "trim", "excess", "excess_prune",
)  # fmt: skip


# --- registry contents ---


def test_every_built_in_method_is_registered_in_the_listed_order():
    assert method_names() == METHODS == BUILT_IN
    for m in registered():
        assert isinstance(m, SamplingMethod) and get_method(m.name) is m
        assert type(m).__module__ == f"es_llm.sampling.methods.{m.name}"


def test_an_unknown_name_is_an_input_error_naming_the_choices():
    with pytest.raises(InputError, match=r"method must be one of .*'es'.*got 'infobatch'"):
        get_method("infobatch")
    with pytest.raises(InputError, match="method"):
        get_method(None)


@pytest.mark.parametrize(
    ("name", "scoring", "plain_update", "prunes", "deterministic"),
    [
        ("es", True, True, False, False),
        ("eswp", True, True, True, False),
        ("prune", False, True, True, False),
        ("uniform", False, False, False, False),
        ("loss", True, True, False, False),
        ("ema", True, True, False, False),
        ("topk", True, True, False, True),
        ("lp", True, True, False, False),
        ("trim", True, True, False, False),
    ],
)
def test_traits(name, scoring, plain_update, prunes, deterministic):
    m = get_method(name)
    got = (m.scoring_forward, m.plain_steps_update_scores, m.prunes_epochs, m.deterministic)
    assert got == (scoring, plain_update, prunes, deterministic)
    assert m.state == ()
    cfg = EvolvedSamplingConfig(method=name, selection_ratio=0.25)
    assert cfg.sampling_method is m and cfg.plain_steps_update_scores is plain_update
    assert (cfg.uses_scoring_forward, cfg.uses_pruning) == (scoring, prunes)


# --- each method's own keys ---


def test_options_are_declared_by_the_methods_that_read_them():
    assert option_owners(LPOptions) == ("lp",)
    assert option_owners(PruningOptions) == ("eswp", "prune", "excess_prune")
    assert option_owners(TrimOptions) == tuple(m.name for m in registered() if m.scoring_forward)
    assert list(LPOptions.model_fields) == ["lp_floor"]
    assert list(PruningOptions.model_fields) == ["prune_ratio", "delta", "rescale"]
    assert list(TrimOptions.model_fields) == ["trim_top", "trim_z"]
    # the section stays flat: the shared keys first, then every method's keys, each once
    fields = list(EvolvedSamplingConfig.model_fields)
    assert fields[:2] == ["enabled", "method"] and len(fields) == len(set(fields))
    for opts in (LPOptions, PruningOptions, TrimOptions):
        assert set(opts.model_fields) <= set(fields)


@pytest.mark.parametrize(
    ("opts", "field", "value", "interval"),
    [
        (LPOptions, "lp_floor", -1.0, "[0, inf)"),
        (LPOptions, "lp_floor", math.inf, "[0, inf)"),
        (PruningOptions, "prune_ratio", 1.0, "[0, 1)"),
        (PruningOptions, "delta", 0.0, "(0, 1]"),
        (TrimOptions, "trim_top", 1.0, "[0, 1)"),
        (TrimOptions, "trim_z", math.nan, "finite"),
    ],
)
def test_a_methods_keys_are_range_checked_in_its_module(opts, field, value, interval):
    with pytest.raises(ValidationError) as exc:  # the module's own model
        opts(**{field: value})
    assert field in str(exc.value) and interval in str(exc.value)
    owner = option_owners(opts)[0]
    with pytest.raises(ESConfigError) as exc2:  # and the flat section, naming the field
        es_config_from_ds_config({"evolved_sampling": {"method": owner, field: value}})
    assert f"evolved_sampling.{field}" in str(exc2.value) and interval in str(exc2.value)


def test_keys_of_other_methods_keep_todays_answer():
    # accepted unused: shipped configs and `compare --es` give them to every method
    assert EvolvedSamplingConfig(method="es", lp_floor=0.1, prune_ratio=0.4).prune_ratio == 0.4
    assert EvolvedSamplingConfig(method="uniform", delta=0.5).delta == 0.5
    # trimming needs the scoring forward: the error says why and what to use instead
    for method in ("uniform", "prune"):
        with pytest.raises(ValidationError, match=f"method '{method}' has none.*method 'trim'"):
            EvolvedSamplingConfig(method=method, trim_z=2.0)
        assert EvolvedSamplingConfig(method=method, trim_top=0.0).trim_top == 0.0  # default
    # a misplaced key (nested under a method's name) is an unknown key, named
    with pytest.raises(ESConfigError, match=r"evolved_sampling\.lp: unknown key"):
        es_config_from_ds_config({"evolved_sampling": {"method": "lp", "lp": {"lp_floor": 1}}})


# --- a method defined here ---


class RefOptions(Options):
    """A key owned by the test method only (foreign use is an error)."""

    ref_weight: float = 1.0

    @field_validator("ref_weight")
    @classmethod
    def _v_ref_weight(cls, v: float) -> float:
        return base.check_range("ref_weight", v, 0.0, None, True, True)


class Excess(SamplingMethod):
    """ES on the excess loss over a reference, l - ref_weight * l_ref, with l_ref per sample."""

    name = "excess_test"
    deterministic = True  # the k largest excess losses: a known answer
    state = ("ref_loss",)
    options = (RefOptions,)

    def weights(self, cfg, visit: Visit) -> torch.Tensor:
        ref = visit.state["ref_loss"]
        return (visit.losses - cfg.ref_weight * ref).clamp_min(0.0) + 1e-6

    def score_update(self, cfg, visit: Visit) -> torch.Tensor:
        return visit.losses - visit.state["ref_loss"]


class ExcessConfig(EvolvedSamplingConfig, RefOptions):
    """The flat section as it is once a module declares RefOptions."""


@pytest.fixture
def excess(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # undone after the test
    register(Excess)
    return get_method("excess_test")


def test_a_registered_method_selects_end_to_end(excess):
    assert "excess_test" in method_names() and "excess_test" not in METHODS  # METHODS: built-ins
    losses = torch.tensor([2.0, 5.0, 1.0, 4.0, 3.0, 6.0])
    ref = torch.tensor([1.5, 1.0, 0.0, 2.0, 0.5, 5.0])  # excess: .5, 4, 1, 2, 2.5, (1)
    prev = torch.zeros(6)
    valid = torch.tensor([True, True, True, True, True, False])
    cfg = ExcessConfig(method="excess_test", ref_weight=1.0)
    kw = dict(step=3, seed=11, ids=torch.arange(10, 16), losses=losses, prev_scores=prev, k=2)
    sel = select_step(cfg, valid=valid, state={"ref_loss": ref}, **kw)
    assert sel.positions.tolist() == [1, 4]  # the largest excess among the valid
    assert torch.equal(sel.loss_weights, torch.ones(2))
    torch.testing.assert_close(sel.new_scores, torch.tensor([0.5, 4.0, 1.0, 2.0, 2.5, 0.0]))
    assert int(sel.num_invalid) == 0
    # its own key shapes the weights: ref_weight 0 is not allowed, 0.5 changes the order
    half = select_step(cfg.model_copy(update={"ref_weight": 0.5}), valid=valid,
                       state={"ref_loss": ref}, **kw)  # fmt: skip
    assert half.positions.tolist() == [1, 3]  # excess at 0.5: 1.25, 4.5, 1, 3, 2.75
    with pytest.raises(ValueError, match=r"needs the per-sample state \['ref_loss'\]"):
        select_step(cfg, valid=valid, **kw)


def test_a_registered_methods_keys_are_its_own(excess):
    with pytest.raises(ValidationError, match=r"ref_weight must be in \(0, inf\)"):
        ExcessConfig(method="excess_test", ref_weight=0.0)
    with pytest.raises(ValidationError) as exc:
        ExcessConfig(method="es", ref_weight=2.0)
    assert "ref_weight is an option of method 'excess_test'; method 'es' does not use it" in str(
        exc.value
    )
    assert ExcessConfig(method="es", ref_weight=1.0).method == "es"  # the default is no use


def test_a_class_without_a_name_or_rule_is_refused(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class Nameless(SamplingMethod):
        def weights(self, cfg, visit):
            return visit.losses

    class NoRule(SamplingMethod):
        name = "no_rule"

    class Twice(SamplingMethod):
        name = "es"

        def weights(self, cfg, visit):
            return visit.losses

    with pytest.raises(TypeError, match="name"):
        register(Nameless)
    with pytest.raises(TypeError, match="abstract"):
        register(NoRule)
    with pytest.raises(ValueError, match="registered twice"):
        register(Twice)


# --- no method-name tests outside the registry ---

PACKAGE = Path(es_llm.__file__).parent
COMPARE = {"==", "!=", "in", "not"}
REGISTRY_LOOKUPS = {"METHODS", "method_names"}  # `method in METHODS` asks the registry


def _name_tests(path: Path, root: Path) -> list[str]:
    """`method ==/!=/in/not in ...` and `... ==/!= x.method` in code (strings and comments
    are not code); `for method in` is a loop and `method in METHODS` a registry lookup."""
    toks = [
        t
        for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        if t.type in (tokenize.NAME, tokenize.OP)
    ]
    word = [t.string for t in toks] + [""] * 3
    hits = []
    for i, t in enumerate(toks):
        if t.string != "method":
            continue
        j = i - 1  # step back over an attribute chain: a.b.method
        while j >= 1 and word[j] == "." and toks[j - 1].type == tokenize.NAME:
            j -= 2
        before = word[j] if j >= 0 else ""
        after = word[i + 1]
        target = word[i + 3] if after == "not" else word[i + 2]
        loop = before == "for"
        lookup = after in ("in", "not") and target in REGISTRY_LOOKUPS
        if (after in COMPARE and not loop and not lookup) or before in ("==", "!="):
            hits.append(f"{path.relative_to(root)}:{t.start[0]}: {t.line.strip()}")
    return hits


def test_no_method_name_test_outside_the_registry():
    methods_dir = PACKAGE / "sampling" / "methods"
    files = [p for p in PACKAGE.rglob("*.py") if methods_dir not in p.parents]
    assert len(files) > 50  # the whole package is scanned
    hits = [h for p in sorted(files) for h in _name_tests(p, PACKAGE.parent)]
    assert hits == []


def test_the_scan_finds_name_tests(tmp_path):
    src = tmp_path / "x.py"
    src.write_text(
        'if cfg.method == "lp":\n    pass\n'
        'ok = self.es.method in ("a", "b")\n'
        'ok = "uniform" != spec.method\n'
        "ok = method not in names\n"
        "for method in names:\n    pass\n"
        '# method == "lp" in a comment\n'
        's = "method == lp in a string"\n'
        "ok = method in METHODS or method not in method_names()\n"
    )
    lines = [int(h.split(":")[1]) for h in _name_tests(src, tmp_path)]
    assert lines == [1, 3, 4, 5]
