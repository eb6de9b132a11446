"""Typed configs: strict loading, overrides, the shipped YAML files, and the fuzzed loader."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.cli import main
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
        ("denoiser_train.lr=1" + "0" * 400, "denoiser_train.lr must be a number within the float range"),
        ("denoiser_train.precision=fp8", "denoiser_train: precision must be one of fp32, bf16, fp16, auto"),
        ("classifier_train.grad_accum=0", "classifier_train: grad_accum must be >= 1"),
        ("denoiser_train.grad_accum=3", "batch_size (1024) must be divisible by grad_accum (3)"),
        ("denoiser_train.compile=yes please", "denoiser_train.compile must be true or false"),
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
    # A key given twice is refused, at any depth (PyYAML would keep the last one silently).
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 0\nsampling:\n  n_uncond: 5\n  n_uncond: 6\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'n_uncond' is given twice \(line 4\)"):
        config_from(StatesConfig(), twice)


def test_parse_and_merge() -> None:
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert merge_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    assert from_dict(StatesConfig, {}) == StatesConfig()


def test_a_group_with_a_selector_takes_a_scalar() -> None:
    from difflab.experiments.mnist import MnistDDPMConfig
    from difflab.experiments.rgb2ir import RGB2IRConfig

    # The spelling: `data=imagefolder data.path=... data.size=64`, in either order.
    for overrides in (["data=imagefolder", "data.path=/x", "data.size=64"], ["data.path=/x", "data=imagefolder"]):
        config = config_from(MnistDDPMConfig(), None, overrides)
        assert config.data.source == "imagefolder" and config.data.path == "/x"
    assert config_from(MnistDDPMConfig(), None, ["schedule=linear"]).schedule.kind == "linear"
    assert config_from(RGB2IRConfig(), None, ["data=paired"]).data.kind == "paired"
    with pytest.raises(ConfigError, match="data.source must be one of"):
        config_from(MnistDDPMConfig(), None, ["data=cifar"])
    with pytest.raises(ConfigError, match="train must be a mapping"):  # no selector: the group needs its keys
        config_from(MnistDDPMConfig(), None, ["train=5"])
    # Without the class (plain dict merging) a scalar replaces the value, as before.
    assert merge_overrides({"data": {"source": "mnist"}}, ["data=x"]) == {"data": "x"}


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


# -- every recipe, overrides and whole YAML files through the CLI -------------------------------------------

RECIPE_NAMES = sorted(recipes())


def _flat_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        keys += _flat_keys(value, full) if isinstance(value, dict) else [full]
        if isinstance(value, dict):
            keys.append(full)
    return keys


RECIPE_KEYS = {
    name: sorted(_flat_keys(to_dict(recipes()[name].config_class()))) + ["bogus", "data.bogus", "a.b.c"]
    for name in RECIPE_NAMES
}
ANY_VALUE = st.one_of(
    VALUES,
    st.integers(),  # unbounded: 400-digit integers too
    st.sampled_from([10**400, -(10**400), 2**63, 2**64 + 1]),
    st.sampled_from(["fp16", "bf16", "fp32", "cuda", "cpu", "auto", "1e400", "-0", ".inf", "~", "[1, 2", "{a: 1}"]),
)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_fuzzed_overrides_of_every_recipe(data) -> None:
    name = data.draw(st.sampled_from(RECIPE_NAMES))
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(RECIPE_KEYS[name]), ANY_VALUE), max_size=4))
    overrides = [f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}" for key, value in pairs]
    try:
        config = config_from(recipes()[name].config_class(), None, overrides)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert type(config) is type(recipes()[name].config_class())


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_integer_key_set_to_zero_or_negative_gives_a_config_or_one_clear_error(name: str) -> None:
    """The exhaustive version of the fuzz tests for the values that divide: every integer leaf of every recipe's
    config set to 0 and to -1 (a norm_groups of 0 once reached a modulo by zero)."""
    defaults = to_dict(recipes()[name].config_class())

    def leaf(key: str) -> object:
        node = defaults
        for part in key.split("."):
            node = node[part]
        return node

    integer_keys = [k for k in _flat_keys(defaults) if type(leaf(k)) is int]
    assert integer_keys
    for key in integer_keys:
        for value in (0, -1):
            try:
                config_from(recipes()[name].config_class(), None, [f"{key}={value}"])
            except ConfigError as exc:
                assert str(exc) and "\n" not in str(exc), key


def _nest(pairs: list[tuple[str, object]]) -> dict:
    document: dict = {}
    for key, value in pairs:
        node = document
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return document


@st.composite
def yaml_files(draw) -> bytes:
    kind = draw(st.sampled_from(["config", "config", "config", "text", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=60)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    name = draw(st.sampled_from(RECIPE_NAMES))
    document = _nest(draw(st.lists(st.tuples(st.sampled_from(RECIPE_KEYS[name]), ANY_VALUE), max_size=5)))
    if draw(st.integers(0, 9)):
        document["recipe"] = name if draw(st.integers(0, 5)) else draw(ANY_VALUE)
    return yaml.safe_dump(document, allow_unicode=True).encode()


@settings(max_examples=150, deadline=None)
@given(yaml_files(), st.sampled_from(["run", "train"]))
def test_cli_with_a_fuzzed_yaml_file_never_shows_a_traceback(content: bytes, command: str) -> None:
    """``difflab run FILE`` / ``difflab train FILE`` on any file: a config (handed to the recipe, stubbed here)
    or exit status 2 with one line on stderr, never a traceback."""
    from difflab import experiments

    started = []

    def stub(config, fresh=False):
        started.append(config)
        return SimpleNamespace(main=True, path=Path("stub"))

    stubbed = {name: dataclasses.replace(recipe, run=stub, train=stub) for name, recipe in recipes().items()}
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiments, "recipes", lambda: stubbed)
        path = Path(folder) / "config.yaml"
        path.write_bytes(content)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                status = main([command, str(path)])
            except SystemExit as exc:  # argparse; must not happen for a file argument
                status = exc.code
    message = err.getvalue()
    assert "Traceback" not in message
    if status == 0:
        assert len(started) == 1 and message == ""
    else:
        assert status == 2 and message.startswith("difflab: error: ") and message.count("\n") == 1, message
        assert not started
