"""The evolved_sampling config: defaults, ranges named in errors, strictness, placement."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from es_llm.sampling.config import ESConfigError, EvolvedSamplingConfig, es_config_from_ds_config


def test_defaults_match_the_spec():
    c = EvolvedSamplingConfig()
    assert (c.enabled, c.method, c.selection_ratio) == (True, "es", 0.5)
    assert (c.beta1, c.beta2, c.s_init, c.tau, c.epsilon) == (0.2, 0.8, None, 1.0, 0.0)
    assert (c.prune_ratio, c.delta, c.rescale, c.anneal_fraction) == (0.3, 0.875, True, 0.0)
    assert c.importance_weighting is False and c.ignore_index == -100
    assert c.burn_in_steps is None and c.burn_in_epochs is None and c.seed is None


@pytest.mark.parametrize(
    ("field", "value", "interval"),
    [
        ("selection_ratio", 0.0, "(0, 1]"),
        ("selection_ratio", 1.5, "(0, 1]"),
        ("beta1", -0.1, "[0, 1]"),
        ("beta1", 1.1, "[0, 1]"),
        ("beta2", 1.0, "[0, 1)"),
        ("tau", 0.0, "(0, inf)"),
        ("tau", float("nan"), "(0, inf)"),
        ("epsilon", 1.01, "[0, 1]"),
        ("anneal_fraction", 1.0, "[0, 1)"),
        ("prune_ratio", 1.0, "[0, 1)"),
        ("prune_ratio", -0.2, "[0, 1)"),
        ("delta", 0.0, "(0, 1]"),
        ("s_init", 0.0, "(0, inf)"),
        ("burn_in_steps", -1, "[0, inf)"),
        ("burn_in_epochs", -3, "[0, inf)"),
        ("scoring_micro_batch_size", 0, "[1, inf)"),
        ("seed", -1, "[0, 2**64)"),
    ],
)
def test_out_of_range_names_field_and_interval(field, value, interval):
    with pytest.raises(ValidationError) as exc:
        EvolvedSamplingConfig(**{field: value})
    assert field in str(exc.value) and interval in str(exc.value)
    with pytest.raises(ESConfigError) as exc2:
        es_config_from_ds_config({"evolved_sampling": {field: value}})
    assert f"evolved_sampling.{field}" in str(exc2.value) and interval in str(exc2.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("selection_ratio", 1.0),
        ("beta1", 0.0),
        ("beta1", 1.0),
        ("beta2", 0.0),
        ("epsilon", 1.0),
        ("delta", 1.0),
        ("prune_ratio", 0.0),
        ("burn_in_steps", 0),
        ("tau", 1e-3),
    ],
)
def test_boundaries_inside_the_range_are_accepted(field, value):
    assert getattr(EvolvedSamplingConfig(**{field: value}), field) == value


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(ESConfigError) as exc:
        es_config_from_ds_config({"evolved_sampling": {"selction_ratio": 0.3}})
    msg = str(exc.value)
    assert "selction_ratio" in msg and "did you mean 'selection_ratio'" in msg
    with pytest.raises(ValidationError):
        EvolvedSamplingConfig(bogus=1)


def test_unknown_method_names_the_field():
    with pytest.raises(ESConfigError, match="method"):
        es_config_from_ds_config({"evolved_sampling": {"method": "infobatch"}})


def test_assignment_is_validated():
    c = EvolvedSamplingConfig()
    with pytest.raises(ValidationError, match="beta2"):
        c.beta2 = 1.0


def test_burn_in_steps_and_epochs_are_exclusive():
    with pytest.raises(ValidationError, match="burn_in_steps and burn_in_epochs"):
        EvolvedSamplingConfig(burn_in_steps=10, burn_in_epochs=1)


def test_absent_or_disabled_section_gives_none():
    assert es_config_from_ds_config({"train_batch_size": 8}) is None
    assert es_config_from_ds_config({"evolved_sampling": {"enabled": False}}) is None
    cfg = es_config_from_ds_config({"evolved_sampling": {"method": "eswp", "prune_ratio": 0.5}})
    assert cfg is not None and cfg.method == "eswp" and cfg.prune_ratio == 0.5


def test_disabled_section_is_still_validated():
    with pytest.raises(ESConfigError, match="beta2"):
        es_config_from_ds_config({"evolved_sampling": {"enabled": False, "beta2": 2}})


@pytest.mark.parametrize(
    ("ds_config", "where"),
    [
        ({"data_efficiency": {"evolved_sampling": {}}}, "data_efficiency.evolved_sampling"),
        (
            {"data_efficiency": {"data_sampling": {"evolved_sampling": {"method": "es"}}}},
            "data_efficiency.data_sampling.evolved_sampling",
        ),
        ({"data_sampling": {"evolved_sampling": {}}}, "data_sampling.evolved_sampling"),
        ({"evolved-sampling": {"method": "es"}}, "evolved-sampling"),
        ({"EvolvedSampling": {}}, "EvolvedSampling"),
        (
            {"evolved_sampling": {"method": "es"}, "data_efficiency": {"evolved_sampling": {}}},
            "data_efficiency.evolved_sampling",
        ),
    ],
)
def test_misplaced_or_misspelled_section_is_an_error(ds_config, where):
    with pytest.raises(ESConfigError) as exc:
        es_config_from_ds_config(ds_config)
    assert where in str(exc.value) and "top-level" in str(exc.value)


def test_section_must_be_an_object():
    with pytest.raises(ESConfigError, match="evolved_sampling must be a JSON object"):
        es_config_from_ds_config({"evolved_sampling": True})


@pytest.mark.parametrize(
    ("method", "scoring", "pruning", "ratio"),
    [
        ("es", True, False, 0.25),
        ("eswp", True, True, 0.25),
        ("prune", False, True, 1.0),
        ("uniform", False, False, 1.0),
        ("loss", True, False, 0.25),
        ("ema", True, False, 0.25),
        ("topk", True, False, 0.25),
    ],
)
def test_method_properties(method, scoring, pruning, ratio):
    c = EvolvedSamplingConfig(method=method, selection_ratio=0.25)
    assert c.uses_scoring_forward is scoring
    assert c.uses_pruning is pruning
    assert c.effective_selection_ratio == ratio


def test_resolved_s_init_and_seed():
    assert EvolvedSamplingConfig().resolved_s_init(400) == 1 / 400
    assert EvolvedSamplingConfig(s_init=2.5).resolved_s_init(400) == 2.5
    assert EvolvedSamplingConfig().resolved_seed(7) == 7
    assert EvolvedSamplingConfig(seed=3).resolved_seed(7) == 3


def test_the_method_list_is_the_method_type():
    from typing import get_args

    from es_llm.sampling.config import METHODS, Method

    assert get_args(Method) == METHODS and len(set(METHODS)) == len(METHODS)
    for method in METHODS:  # every listed name validates, so choices and validation agree
        assert EvolvedSamplingConfig(method=method).method == method


def test_errors_from_the_config_are_input_errors():
    from es_llm.errors import InputError

    with pytest.raises(InputError):
        es_config_from_ds_config({"evolved_sampling": {"tau": -1}})


def test_an_override_that_disables_the_section_is_an_input_error():
    from es_llm.drivers.deepspeed.dsconfig import es_config_for_run
    from es_llm.errors import InputError

    ds = {"evolved_sampling": {"method": "es"}}
    assert es_config_for_run(ds, None, {"tau": 2}).tau == 2
    with pytest.raises(InputError, match="--method uniform"):
        es_config_for_run(ds, None, {"enabled": False})
    # the section's own enabled=false still means plain uniform training, not an error
    assert es_config_for_run({"evolved_sampling": {"enabled": False}}, None).method == "uniform"
