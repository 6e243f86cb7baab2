"""Every bad configuration a user can write fails at construction with a message naming it."""

import pytest

from aroma_peft import AromaConfig


@pytest.mark.parametrize("field, value, match", [
    ("r", 0, r"AromaConfig\.r=0 .*positive integer"),
    ("r", 1.5, r"AromaConfig\.r=1\.5"),
    ("r", True, r"AromaConfig\.r=True"),
    ("alpha", 0, r"AromaConfig\.alpha=0 .*> 0"),
    ("alpha", float("nan"), r"AromaConfig\.alpha=nan"),
    ("eps_in", -0.1, r"AromaConfig\.eps_in=-0\.1"),
    ("eps_out", 0.0, r"AromaConfig\.eps_out=0\.0"),
    ("eps_out", "5e-3", r"AromaConfig\.eps_out='5e-3'"),
    ("check_interval", 0, r"AromaConfig\.check_interval=0"),
    ("max_inner_steps", -5, r"AromaConfig\.max_inner_steps=-5"),
    ("max_inner_steps", 5, r"AromaConfig\.max_inner_steps=5 .*check_interval=10"),
    ("max_steps", 0, r"AromaConfig\.max_steps=0 .*positive integer or None"),
    ("warmup_steps", -1, r"AromaConfig\.warmup_steps=-1"),
    ("restart_warmup_steps", 2.5, r"AromaConfig\.restart_warmup_steps=2\.5"),
    ("reset", "adam", r"AromaConfig\.reset='adam' .*'prune', 'zero', 'none'"),
    ("prune_ratio", 0.0, r"AromaConfig\.prune_ratio=0\.0 .*\(0, 1\]"),
    ("prune_ratio", 1.5, r"AromaConfig\.prune_ratio=1\.5"),
    ("seed", -3, r"AromaConfig\.seed=-3"),
    ("target_modules", [], r"AromaConfig\.target_modules=\[\] .*at least one"),
    ("target_modules", ["query", 3], r"AromaConfig\.target_modules=\['query', 3\]"),
    ("target_modules", "(unclosed", r"AromaConfig\.target_modules='\(unclosed' .*valid regex"),
    ("exclude_modules", [""], r"AromaConfig\.exclude_modules"),
    ("modules_to_save", [None], r"AromaConfig\.modules_to_save"),
    ("train_heads_after_convergence", "yes", r"AromaConfig\.train_heads_after_convergence='yes'"),
])
def test_bad_value_names_field_and_value(field, value, match):
    with pytest.raises(ValueError, match=match):
        AromaConfig(**{field: value})


def test_warmup_longer_than_run_is_rejected():
    with pytest.raises(ValueError, match=r"AromaConfig\.warmup_steps=100 .*fewer than max_steps=50"):
        AromaConfig(max_steps=50, warmup_steps=100)


def test_defaults_follow_the_paper():
    c = AromaConfig()
    assert (c.r, c.eps_in, c.check_interval, c.eps_out, c.reset, c.prune_ratio) == (1, 0.1, 10, 5e-3, "prune", 0.999)
    assert c.scaling == c.alpha / c.r


def test_config_is_frozen_and_lists_become_tuples():
    c = AromaConfig(target_modules=["query", "value"], modules_to_save="classifier")
    assert c.target_modules == ("query", "value") and c.modules_to_save == ("classifier",)
    with pytest.raises(Exception):
        c.r = 2  # type: ignore[misc]


def test_json_round_trip(tmp_path):
    c = AromaConfig(target_modules=["query"], modules_to_save=["classifier"], r=8, alpha=16, max_steps=500)
    c.save(tmp_path / "c.json")
    assert AromaConfig.load(tmp_path / "c.json") == c


def test_unknown_field_in_json_is_named(tmp_path):
    (tmp_path / "c.json").write_text('{"r": 1, "eps_outer": 0.1}')
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['eps_outer'\]"):
        AromaConfig.load(tmp_path / "c.json")


def test_malformed_json_names_file(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"c\.json: not valid JSON"):
        AromaConfig.load(tmp_path / "c.json")


def test_criteria_can_be_switched_off():
    c = AromaConfig(eps_in=None, eps_out=None, r=8)
    assert c.eps_in is None and c.eps_out is None
