"""Tests for megalm.config: loading, base inheritance, overrides, strictness and validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from megalm.config import (
    Config,
    ConfigError,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    grad_accum_steps,
    load_config,
    validate,
)
from megalm.topology import Topology

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Every shipped config with the world size it is meant for (None: parallel.dp fixes it).
SHIPPED = {
    "tiny.yaml": 1,
    "tiny-prefixlm.yaml": 1,
    "tiny-corpus.yaml": 4,
    "gpt-125m.yaml": 8,
    "gpt-1.3b.yaml": 8,
    "yuan-lm-13b.yaml": None,
    "yuan-lm-13b-32k.yaml": None,
    "yuan-plm-13b.yaml": None,
    "yuan-245b.yaml": None,
    "llama-tiny.yaml": 1,
    "llama-1b.yaml": 8,
    "llama-3-8b.yaml": None,
    "llama-3-70b.yaml": None,
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tiny(*overrides: str) -> Config:
    return load_config(CONFIGS / "tiny.yaml", overrides)


# ---- shipped configs ---------------------------------------------------------------------------


def test_every_shipped_config_is_listed() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(SHIPPED)



@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_run_longer_than_an_hour_saves_periodically(name: str) -> None:
    """The shipped configs' run lengths (by `megalm plan`'s step-time model) against their save intervals."""
    from megalm.plan.report import estimated_run_hours, periodic_save_warning

    config = load_config(CONFIGS / name)
    topology = validate(config, SHIPPED[name])
    hours = estimated_run_hours(config, topology.world_size)
    assert hours is not None
    if "tiny" in name:
        assert hours < 1  # tiny runs need no periodic save
    else:
        assert hours > 1, (name, hours)
        assert 0 < config.checkpoint.interval_minutes <= 60, name
    assert periodic_save_warning(config, topology.world_size) is None
    if "tiny" not in name:  # the same run without a periodic save is warned about
        bare = load_config(CONFIGS / name, ["checkpoint.interval_minutes=0"])
        assert "no periodic checkpoint" in periodic_save_warning(bare, topology.world_size)

@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_and_validates(name: str) -> None:
    config = load_config(CONFIGS / name)
    topology = validate(config, SHIPPED[name])
    assert isinstance(topology, Topology)
    assert config.train.global_batch_size == (
        config.train.micro_batch_size * topology.dp * grad_accum_steps(config, topology.dp)
    )
    first_line = (CONFIGS / name).read_text().splitlines()[0]
    assert first_line.startswith("# "), f"{name} needs a one-line comment at the top"


def test_tiny_contents_and_world_sizes() -> None:
    config = tiny()
    assert (config.model.num_layers, config.model.hidden_size, config.model.num_heads) == (2, 64, 4)
    assert (config.model.seq_length, config.model.vocab_size) == (64, 256)
    assert (config.train.micro_batch_size, config.train.global_batch_size) == (4, 16)
    assert (config.optim.lr, config.optim.min_lr, config.optim.warmup_steps) == (1e-3, 1e-4, 20)
    assert config.parallel.dp is None
    single = validate(config, 1)
    assert (single.tp, single.pp, single.dp) == (1, 1, 1)
    assert grad_accum_steps(config, single.dp) == 4
    split = validate(tiny("parallel.tp=2"), 4)
    assert (split.tp, split.pp, split.dp, split.world_size) == (2, 1, 2, 4)
    assert grad_accum_steps(config, split.dp) == 2


def test_tiny_prefixlm_inherits_tiny() -> None:
    lm, plm = tiny(), load_config(CONFIGS / "tiny-prefixlm.yaml")
    assert plm.model.family == "prefixlm"
    assert plm.train.run_dir == "runs/tiny-prefixlm"
    assert dataclasses.replace(plm.model, family="lm") == lm.model
    assert plm.optim == lm.optim


def test_yuan_configs() -> None:
    lm = load_config(CONFIGS / "yuan-lm-13b.yaml")
    plm = load_config(CONFIGS / "yuan-plm-13b.yaml")
    assert plm.model.family == "prefixlm" and lm.model.family == "lm"
    assert (lm.model.num_layers, lm.model.hidden_size, lm.model.num_heads) == (40, 5120, 40)
    assert (lm.parallel.tp, lm.parallel.pp) == (8, 2)
    assert (lm.train.micro_batch_size, lm.train.global_batch_size) == (4, 2688)
    assert (lm.optim.lr, lm.optim.min_lr, lm.model.init_std) == (1e-4, 1e-5, 0.002)
    assert lm.train.precision == "bf16"
    big = load_config(CONFIGS / "yuan-245b.yaml")
    topology = validate(big)
    assert (topology.tp, topology.pp, topology.dp, topology.world_size) == (8, 38, 7, 2128)
    assert grad_accum_steps(big, topology.dp) == 3360 // 7


# ---- base inheritance --------------------------------------------------------------------------


def test_base_deep_merges_relative_to_including_file(tmp_path: Path) -> None:
    write(tmp_path / "bases" / "root.yaml", "model:\n  num_layers: 4\n  hidden_size: 128\noptim:\n  lr: 0.01\n")
    write(tmp_path / "bases" / "mid.yaml", "base: root.yaml\nmodel:\n  num_layers: 6\n")
    leaf = write(tmp_path / "leaf.yaml", "base: bases/mid.yaml\noptim:\n  lr: 2e-3\n")
    config = load_config(leaf)
    assert config.model.num_layers == 6  # mid over root
    assert config.model.hidden_size == 128  # kept from root through the merge
    assert config.optim.lr == 2e-3  # leaf over root
    assert config.model.num_heads == ModelConfig().num_heads  # untouched default


def test_base_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: c.yaml\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_names_the_including_file(tmp_path: Path) -> None:
    write(tmp_path / "x.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml \(the base of .*x\.yaml\) not found"):
        load_config(tmp_path / "x.yaml")


def test_unknown_key_in_base_names_the_base_file(tmp_path: Path) -> None:
    write(tmp_path / "root.yaml", "train:\n  stepz: 3\n")
    write(tmp_path / "leaf.yaml", "base: root.yaml\n")
    with pytest.raises(ConfigError, match=r"'train\.stepz' in .*root\.yaml; did you mean 'train\.steps'"):
        load_config(tmp_path / "leaf.yaml")


def test_empty_section_gives_defaults_but_an_empty_file_is_refused(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "header.yaml", "model:\n# nothing yet\n")) == Config()
    for text in ("", "# only a comment\n"):
        with pytest.raises(ConfigError, match=r"empty\.yaml is empty .*write at least `base: tiny\.yaml`"):
            load_config(write(tmp_path / "empty.yaml", text))


# ---- strictness --------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "optm:\n  lr: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"unknown key 'optm' in {path}; did you mean 'optim'?"


def test_unknown_nested_key_message_is_exact(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "optim:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"unknown key 'optim.lrr' in {path}; did you mean 'optim.lr'?"



def test_data_cache_dir_is_not_a_key_that_does_nothing() -> None:
    """No code read data.cache_dir (sample indices are always computed in memory): it is refused, not ignored."""
    with pytest.raises(ConfigError, match="unknown key 'data.cache_dir'"):
        tiny("data.cache_dir=/tmp/x")

def test_field_in_wrong_place_suggests_its_section() -> None:
    with pytest.raises(ConfigError, match=r"'lr' in x; did you mean 'optim\.lr'"):
        config_from_dict({"lr": 0.1}, "x")
    with pytest.raises(ConfigError, match=r"'model\.lr' in x; did you mean 'optim\.lr'"):
        config_from_dict({"model": {"lr": 0.1}}, "x")


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'log\.qqqqqq' in x; valid keys: log\.interval, "):
        config_from_dict({"log": {"qqqqqq": 1}}, "x")


@pytest.mark.parametrize("value", [5, [1, 2], "text"])
def test_section_must_be_a_mapping(value: object) -> None:
    with pytest.raises(ConfigError, match=r"section 'model' in x must be a mapping"):
        config_from_dict({"model": value}, "x")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("model", "num_layers", True, "an integer"),
        ("model", "num_layers", 2.0, "an integer"),
        ("model", "ffn_hidden_size", "256", "an integer or null"),
        ("optim", "lr", "fast", "a number"),
        ("optim", "lr", None, "a number"),
        ("train", "run_dir", 5, "a string"),
        ("parallel", "sequence_parallel", 1, "true or false"),
        ("log", "peak_tflops", False, "a number or null"),
    ],
)
def test_type_errors_name_key_value_and_type(section: str, key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({section: {key: value}}, "src.yaml")
    message = str(info.value)
    assert f"{section}.{key} must be {expected}, got {value!r}" in message
    assert "src.yaml" in message


def test_float_fields_accept_ints_and_store_floats() -> None:
    config = config_from_dict({"optim": {"lr": 1, "min_lr": 0}, "model": {"rotary_base": 500}})
    assert isinstance(config.optim.lr, float) and config.optim.lr == 1.0
    assert isinstance(config.model.rotary_base, float)


def test_exponent_without_dot_reads_as_float(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "x.yaml", "optim:\n  lr: 3e-4\n  min_lr: 1E-5\n"))
    assert config.optim.lr == 3e-4 and config.optim.min_lr == 1e-5
    # the loader tweak must not leak into PyYAML's own SafeLoader
    assert yaml.safe_load("3e-4") == "3e-4"


@pytest.mark.parametrize(
    ("section", "values", "pattern"),
    [
        ("model", {"family": "gpt"}, r"model\.family must be one of 'lm', 'prefixlm', got 'gpt'"),
        ("model", {"position_embedding": "alibi"}, r"model\.position_embedding must be one of"),
        ("optim", {"decay_style": "step"}, r"optim\.decay_style must be one of"),
        ("train", {"precision": "fp8"}, r"train\.precision must be one of 'fp32', 'bf16', 'fp16'"),
        ("train", {"device": "tpu"}, r"train\.device must be one of"),
        ("data", {"kind": "files"}, r"data\.kind must be one of 'synthetic'"),
    ],
)
def test_enumerated_fields(section: str, values: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict({section: values})


@pytest.mark.parametrize(
    ("cls", "kwargs", "pattern"),
    [
        (ModelConfig, {"num_layers": 0}, r"model\.num_layers must be positive, got 0"),
        (ModelConfig, {"hidden_size": -64}, r"model\.hidden_size must be positive"),
        (ModelConfig, {"ffn_hidden_size": 0}, r"model\.ffn_hidden_size must be positive"),
        (ModelConfig, {"hidden_dropout": 1.0}, r"model\.hidden_dropout must be in \[0, 1\), got 1\.0"),
        (ModelConfig, {"attention_dropout": -0.1}, r"model\.attention_dropout must be in \[0, 1\)"),
        (ParallelConfig, {"tp": 0}, r"parallel\.tp must be positive"),
        (ParallelConfig, {"dp": 0}, r"parallel\.dp must be positive"),
        (OptimConfig, {"lr": 1e-4, "min_lr": 1e-3}, r"optim\.lr=0\.0001 is below optim\.min_lr=0\.001"),
        (OptimConfig, {"lr": 0.0, "min_lr": -1.0}, r"optim\.min_lr must be >= 0"),
        (OptimConfig, {"beta2": 1.0}, r"optim\.beta2 must be in \[0, 1\)"),
        (OptimConfig, {"clip_grad": -1.0}, r"optim\.clip_grad must be >= 0"),
        (OptimConfig, {"lr": float("nan")}, r"optim\.lr must be a finite number"),
        (TrainConfig, {"micro_batch_size": 0}, r"train\.micro_batch_size must be positive"),
        (TrainConfig, {"grad_accum_steps": 0}, r"train\.grad_accum_steps must be positive"),
        (TrainConfig, {"run_dir": " "}, r"train\.run_dir must be a non-empty path"),
        (DataConfig, {"prefix_fraction_min": 0.6}, r"0 < min <= max < 1"),
        (DataConfig, {"prefix_fraction_min": 0.0}, r"0 < min <= max < 1"),
        (DataConfig, {"prefix_fraction_max": 1.0}, r"0 < min <= max < 1"),
        (LogConfig, {"interval": 0}, r"log\.interval must be positive"),
        (LogConfig, {"peak_tflops": 0.0}, r"log\.peak_tflops must be positive"),
    ],
)
def test_section_range_checks(cls: type, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        cls(**kwargs)


def test_validate_rechecks_fields_mutated_after_construction() -> None:
    config = tiny()
    config.train.steps = 0
    with pytest.raises(ConfigError, match=r"train\.steps must be positive"):
        validate(config, 1)


# ---- overrides ---------------------------------------------------------------------------------


def test_overrides_are_typed_and_applied() -> None:
    base = tiny()
    config = apply_overrides(
        base,
        ["optim.lr=3e-4", "parallel.tp=2", "model.ffn_hidden_size=null", "model.ffn_hidden_size=128",
         "parallel.sequence_parallel=true", "optim.weight_decay=0", "train.run_dir=runs/x"],
    )
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.parallel.tp == 2 and config.parallel.sequence_parallel is True
    assert config.model.ffn_hidden_size == 128  # later overrides win
    assert isinstance(config.optim.weight_decay, float)
    assert config.train.run_dir == "runs/x"
    assert base.parallel.tp == 1 and base.optim.lr == 1e-3  # the input is untouched


def test_override_null_restores_derived_value() -> None:
    config = tiny("model.ffn_hidden_size=96", "model.ffn_hidden_size=null")
    assert config.model.ffn_hidden_size is None and config.model.ffn_size() == 256


def test_overrides_apply_together_so_intermediate_states_may_be_invalid() -> None:
    # lr below the current min_lr is fine once min_lr is lowered by a later override
    config = tiny("optim.lr=1e-5", "optim.min_lr=0")
    assert (config.optim.lr, config.optim.min_lr) == (1e-5, 0.0)


def test_override_bad_type_message() -> None:
    with pytest.raises(ConfigError) as info:
        tiny("parallel.tp=two")
    assert str(info.value) == "parallel.tp must be an integer, got 'two' (str) (in override 'parallel.tp=two')"


def test_override_without_equals_shows_expected_form() -> None:
    with pytest.raises(ConfigError, match=r"override 'optim\.lr' is not of the form section\.field=value, e\.g\. optim\.lr=3e-4"):
        tiny("optim.lr")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown key 'optim.lrr' in override 'optim.lrr=1'; did you mean 'optim.lr'?"),
        ("optm.lr=1", "unknown key 'optm.lr' in override 'optm.lr=1'; did you mean 'optim.lr'?"),
        ("modle.num_layers=3", "unknown key 'modle.num_layers' in override 'modle.num_layers=3'; did you mean 'model.num_layers'?"),
    ],
)
def test_override_unknown_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        tiny(override)
    assert str(info.value) == message


def test_override_must_name_a_field() -> None:
    with pytest.raises(ConfigError, match=r"must name a field, e\.g\. optim\.lr="):
        tiny("optim=3")


def test_override_range_error_mentions_overrides() -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden_dropout must be in \[0, 1\).*with overrides model\.hidden_dropout=1\.5"):
        tiny("model.hidden_dropout=1.5")


def test_overrides_given_as_one_string_are_rejected() -> None:
    with pytest.raises(ConfigError, match="list of strings"):
        apply_overrides(tiny(), "optim.lr=1")  # type: ignore[arg-type]


# ---- cross-field validation --------------------------------------------------------------------


def test_world_size_required_when_dp_is_derived() -> None:
    with pytest.raises(ConfigError, match=r"needs a world size: parallel\.dp is null"):
        validate(tiny())
    assert validate(tiny("parallel.dp=1")).world_size == 1


def test_hidden_not_divisible_by_heads() -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden_size=64 is not divisible by model\.num_heads=3: choose num_heads dividing 64"):
        validate(tiny("model.num_heads=3"), 1)


def test_heads_not_divisible_by_tp() -> None:
    with pytest.raises(ConfigError, match=r"model\.num_heads=4 is not divisible by parallel\.tp=8.*use a tp dividing 4"):
        validate(tiny("parallel.tp=8"), 8)


def test_ffn_not_divisible_by_tp() -> None:
    with pytest.raises(ConfigError, match=r"MLP hidden size 130 .* not divisible by parallel\.tp=4: set model\.ffn_hidden_size to a multiple of 4"):
        validate(tiny("parallel.tp=4", "model.ffn_hidden_size=130"), 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.num_layers=2", "parallel.pp=4"), r"4 pipeline stages but only model\.num_layers=2 layers"),
        (("model.num_layers=6", "parallel.pp=4"), r"6 layers do not split evenly over 4 pipeline stages"),
        (("model.num_layers=8", "parallel.pp=4", "parallel.pipeline_layers=[1,3,3]"), r"has 3 entries but there are 4"),
        (("model.num_layers=8", "parallel.pp=4", "parallel.pipeline_layers=[1,3,3,2]"), r"sums to 9 but the model has 8"),
        (("model.num_layers=4", "parallel.pp=2", "parallel.virtual_stages=2"), r"needs parallel\.schedule=interleaved"),
        (("model.num_layers=4", "parallel.pp=4", "parallel.schedule=interleaved", "train.global_batch_size=8"),
         r"micro-batches per step \(2\) to be a multiple of pp=4"),
    ],
)
def test_layers_vs_pipeline_stages(overrides: tuple, message: str) -> None:
    config = tiny(*overrides)
    with pytest.raises(ConfigError, match=message):
        validate(config, config.parallel.pp)


def test_uneven_pipeline_layers_are_accepted() -> None:
    """An uneven split validates, and each stage then really holds its listed layers."""
    import torch

    from megalm.distributed import ParallelGroups
    from megalm.model.gpt import stage_specs

    config = tiny("model.num_layers=8", "parallel.pp=4", "parallel.pipeline_layers=[1,3,3,1]")
    validate(config, 4)
    assert config.parallel.pipeline_layers == [1, 3, 3, 1]
    topology = Topology(pp=4)
    layers = []
    for pp_rank in range(4):
        groups = ParallelGroups(topology=topology, rank=topology.rank(pp=pp_rank, dp=0, tp=0), device=torch.device("cpu"))
        (spec,) = stage_specs(8, groups, 1, config.parallel.pipeline_layers)
        layers.append(list(spec.layers))
    assert layers == [[0], [1, 2, 3], [4, 5, 6], [7]]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("parallel.recompute=partial",), r"parallel\.recompute must be one of 'none', 'selective', 'full', got 'partial'"),
        (("parallel.recompute_layers=1",), r"recompute_layers=1 applies to full recompute only.*'none'"),
        (("parallel.recompute=selective", "parallel.recompute_layers=1"), r"full recompute only.*'selective'"),
        (("parallel.recompute=full", "parallel.recompute_layers=0"), r"parallel\.recompute_layers must be positive"),
        (("parallel.recompute=full", "model.num_layers=4", "parallel.pp=2", "parallel.recompute_layers=3"),
         r"recompute_layers=3 exceeds the 2 layers of the largest pipeline stage"),
        (("parallel.recompute=full", "model.num_layers=8", "parallel.pp=2", "parallel.virtual_stages=2",
          "parallel.schedule=interleaved", "parallel.recompute_layers=3"),
         r"recompute_layers=3 exceeds the 2 layers"),
    ],
)
def test_recompute_keys_are_checked(overrides: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config = tiny(*overrides)
        validate(config, config.parallel.pp)


def test_recompute_keys_accepted() -> None:
    """Every recompute mode validates; recompute_layers up to the largest stage's layer count."""
    for mode in ("none", "selective", "full"):
        assert tiny(f"parallel.recompute={mode}").parallel.recompute == mode
    config = tiny("parallel.recompute=full", "model.num_layers=6", "parallel.pp=2", "parallel.pipeline_layers=[2,4]",
                  "parallel.recompute_layers=4")
    validate(config, 2)
    assert config.parallel.recompute_layers == 4


def test_batch_not_divisible_suggests_multiples() -> None:
    config = tiny("train.global_batch_size=100")
    with pytest.raises(ConfigError) as info:
        validate(config, 8)
    assert str(info.value) == (
        "train.global_batch_size=100 is not divisible by micro_batch_size x dp = 4 x 8 = 32; "
        "use a multiple of 32 such as 96 or 128"
    )


def test_batch_smaller_than_one_step_suggests_first_multiples() -> None:
    with pytest.raises(ConfigError, match=r"use a multiple of 32 such as 32 or 64$"):
        validate(tiny("train.global_batch_size=20"), 8)


def test_explicit_grad_accum_must_match() -> None:
    with pytest.raises(ConfigError, match=r"= 4 x 1 x 3 = 12; set train\.grad_accum_steps=4 \(or null"):
        validate(tiny("train.grad_accum_steps=3"), 1)
    with pytest.raises(ConfigError, match=r"= 4 x 2 x 3 = 24; set train\.global_batch_size=24"):
        validate(tiny("train.global_batch_size=18", "train.micro_batch_size=4", "train.grad_accum_steps=3"), 2)
    config = tiny("train.grad_accum_steps=4")
    validate(config, 1)
    assert grad_accum_steps(config, 1) == 4


def test_world_size_not_divisible_by_tp_pp() -> None:
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by tp x pp = 2 x 2 = 4"):
        validate(tiny("parallel.tp=2", "parallel.pp=2"), 6)


def test_explicit_dp_mismatch() -> None:
    with pytest.raises(ConfigError) as info:
        validate(tiny("parallel.dp=2"), 4)
    assert str(info.value).startswith("parallel.dp=2 does not match the world size: 4 processes")
    assert "set parallel.dp=4 (or null to derive it) or launch 2 processes" in str(info.value)


def test_sequence_parallel_needs_divisible_seq_length() -> None:
    config = tiny("parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_length=63")
    with pytest.raises(ConfigError, match=r"model\.seq_length=63 is not divisible by 2: use a multiple of 2 or turn sequence_parallel off"):
        validate(config, 2)
    validate(tiny("parallel.tp=2", "parallel.sequence_parallel=true"), 2)


def test_seq_length_within_positions() -> None:
    with pytest.raises(ConfigError, match=r"model\.seq_length=128 exceeds model\.max_position_embeddings=64"):
        validate(tiny("model.seq_length=128", "model.max_position_embeddings=64"), 1)
    validate(tiny("model.seq_length=128"), 1)  # null max_position_embeddings follows seq_length


def test_rotary_needs_even_head_dim() -> None:
    config = tiny("model.position_embedding=rotary", "model.hidden_size=60", "model.num_heads=4")
    with pytest.raises(ConfigError, match=r"even head dimension, got 15 .*60 / 4"):
        validate(config, 1)
    with pytest.raises(ConfigError, match=r"even head dimension, got 9 \(model\.head_dim"):
        validate(tiny("model.position_embedding=rotary", "model.head_dim=9"), 1)
    validate(tiny("model.position_embedding=rotary"), 1)


def test_warmup_longer_than_schedule() -> None:
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps=400 exceeds the schedule length 300"):
        validate(tiny("optim.warmup_steps=400"), 1)


# ---- derived sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocab", "tp", "divisible_by", "padded"),
    [(50257, 1, 128, 50304), (50257, 8, 128, 51200), (256, 1, 128, 256), (256, 4, 128, 512), (53005, 8, 128, 53248), (10, 3, 1, 12)],
)
def test_padded_vocab_size(vocab: int, tp: int, divisible_by: int, padded: int) -> None:
    model = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by)
    assert model.padded_vocab_size(tp) == padded
    assert padded % tp == 0 and padded >= vocab


def test_padded_vocab_rejects_bad_tp() -> None:
    with pytest.raises(ConfigError, match="tp must be a positive integer"):
        ModelConfig().padded_vocab_size(0)


def test_resolved_sizes() -> None:
    model = ModelConfig(hidden_size=96, num_heads=6, seq_length=32)
    assert (model.ffn_size(), model.max_positions(), model.head_size()) == (384, 32, 16)
    model = ModelConfig(ffn_hidden_size=100, max_position_embeddings=128)
    assert (model.ffn_size(), model.max_positions()) == (100, 128)
    with pytest.raises(ConfigError, match="not divisible by model.num_heads"):
        ModelConfig(hidden_size=10, num_heads=4).head_size()


# ---- serialisation -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_dict_round_trip(name: str) -> None:
    config = load_config(CONFIGS / name)
    data = config_to_dict(config)
    assert set(data) == {"model", "parallel", "optim", "train", "data", "log", "checkpoint"}
    assert config_from_dict(data) == config
    assert data["model"]["vocab_size"] == config.model.vocab_size


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = tiny("optim.lr=3e-3", "log.peak_tflops=312", "parallel.dp=1", "model.ffn_hidden_size=200")
    path = write(tmp_path / "resolved.yaml", config_to_yaml(config))
    reloaded = load_config(path)
    assert reloaded == config
    assert isinstance(reloaded.log.peak_tflops, float)


def test_config_from_dict_rejects_base_and_non_mapping() -> None:
    with pytest.raises(ConfigError, match="'base' in <dict> is only allowed"):
        config_from_dict({"base": "tiny.yaml"})
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


def test_config_rejects_wrong_section_type() -> None:
    with pytest.raises(ConfigError, match="Config.optim must be a OptimConfig"):
        Config(optim=TrainConfig())  # type: ignore[arg-type]


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cannot parse YAML in .*bad\.yaml"):
        load_config(path)


def test_checkpoint_async_is_accepted_as_the_name_of_async_save_and_shared_read_is_checked() -> None:
    from megalm.config import ConfigError, load_config

    config = load_config(CONFIGS / "tiny.yaml", ["checkpoint.async=true"])
    assert config.checkpoint.async_save is True and config.checkpoint.shared_read == "auto"
    assert load_config(CONFIGS / "tiny.yaml", ["checkpoint.shared_read=never"]).checkpoint.shared_read == "never"
    with pytest.raises(ConfigError, match="shared_read"):
        load_config(CONFIGS / "tiny.yaml", ["checkpoint.shared_read=sometimes"])
