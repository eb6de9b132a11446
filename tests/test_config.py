"""Typed configs: strict loading, overrides, the shipped YAML files, and the fuzzed loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.config import config_from, dump_yaml, from_dict, merge_overrides, parse_override, read_yaml, to_dict
from difflab.errors import ConfigError
from difflab.experiments import recipes
from difflab.experiments.states import StatesConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_overrides_are_typed() -> None:
    config = config_from(
        StatesConfig(),
        None,
        [
            "denoiser_train.steps=10",
            "denoiser_train.lr=1e-4",
            "denoiser.hidden=[8,8]",
            "progress=false",
            "sampling.guidance_scale=2",
        ],
    )
    assert config.denoiser_train.steps == 10
    assert config.denoiser_train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: still a float
    assert config.denoiser.hidden == (8, 8)
    assert config.progress is False
    assert config.sampling.guidance_scale == 2.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("denoiser_train.stepz=10", "unknown config key 'denoiser_train.stepz'; valid keys under 'denoiser_train'"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("denoiser_train.steps=ten", "denoiser_train.steps must be an integer"),
        ("denoiser_train.steps=1.5", "denoiser_train.steps must be an integer"),
        ("progress=maybe", "progress must be true or false"),
        ("denoiser.hidden=wide", "denoiser.hidden must be a list of int"),
        ("denoiser_train=3", "denoiser_train must be a mapping"),
        ("schedule.kind=quadratic", "schedule.kind must be one of"),
        ("denoiser_train.mode=turbo", "denoiser_train.mode must be one of"),
        ("steps", "must look like key=value"),
    ],
)
def test_bad_overrides_give_one_clear_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(StatesConfig(), None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(recipes()))
def test_shipped_yaml_equals_the_embedded_defaults(name: str) -> None:
    """configs/NAME.yaml, or configs/NAME-cpu.yaml where NAME.yaml holds the reference (GPU) sizes."""
    recipe = recipes()[name]
    path = CONFIGS / f"{name}-cpu.yaml"
    if not path.is_file():
        path = CONFIGS / f"{name}.yaml"
    assert path.is_file(), f"configs/{name}.yaml is missing"
    assert to_dict(config_from(recipe.config_class(), path)) == to_dict(recipe.config_class())
    assert read_yaml(path) == to_dict(recipe.config_class())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    data = read_yaml(path)
    recipe = recipes()[data["recipe"]]
    assert config_from(recipe.config_class(), path).recipe == data["recipe"]


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = config_from(StatesConfig(), None, ["seed=5"])
    path = tmp_path / "c.yaml"
    dump_yaml(config, path)
    assert config_from(StatesConfig(), path) == config


def test_bad_yaml_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_from(StatesConfig(), broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        config_from(StatesConfig(), listed)
    with pytest.raises(ConfigError, match="does not exist"):
        config_from(StatesConfig(), tmp_path / "missing.yaml")


def test_parse_and_merge() -> None:
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert merge_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    assert from_dict(StatesConfig, {}) == StatesConfig()


KEYS = [
    "seed",
    "device",
    "progress",
    "data",
    "data.path",
    "denoiser_train.steps",
    "denoiser_train.lr",
    "denoiser.hidden",
    "schedule.kind",
    "schedule.num_timesteps",
    "sampling.n_cond",
    "bogus",
    "figures",
    "classifier_train.ema_decay",
    "denoiser_train.mode",
    "recipe",
    "schedule.beta_end",
    "a.b.c",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(-5, 600), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_fuzzed_overrides_give_a_config_or_one_clear_error(pairs) -> None:
    overrides = [f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}" for key, value in pairs]
    try:
        config = config_from(StatesConfig(), None, overrides)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(config, StatesConfig)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        VALUES, lambda children: st.dictionaries(st.sampled_from(KEYS + ["x"]), children, max_size=3), max_leaves=8
    )
)
def test_fuzzed_documents_give_a_config_or_one_clear_error(document) -> None:
    try:
        config = from_dict(StatesConfig, document)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(config, StatesConfig)
