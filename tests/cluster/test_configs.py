"""Every YAML combination in conf/ composes and validates; bad values fail with one clear line."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cluster.config import CONF_DIR, JobConfig, compose_job

# Groups whose options need a value only a user can give (a path); they are given one here.
REQUIRED = {"model/local": ["model.name_or_path=/models/llama"], "data/text_files": ["data.source=/data/text"]}
for _preset in ("gpu_node", "multi_node"):  # presets for a user's own model
    REQUIRED[f"experiment/{_preset}"] = ["model=local", "model.name_or_path=/models/llama"]


# The groups JobConfig's cross-field checks read beside ``deepspeed``: its options are composed
# with every combination of these, the other groups' with each other (the full product would
# compose four times as many configs, about two minutes here, for no more coverage).
DEEPSPEED_PARTNERS = ("sae", "cluster", "train")


def _options() -> dict[str, list[str]]:
    return {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in sorted(Path(CONF_DIR).iterdir())
        if group.is_dir()
    }


def _combinations(groups: list[str]) -> list[dict[str, str]]:
    options = _options()
    return [dict(zip(groups, combo, strict=True)) for combo in itertools.product(*(options[g] for g in groups))]


# Pairs that cannot work, and the refusal they get.
REFUSED = {
    # The multi-node preset splits its latents over 8 ranks in bf16; DeepSpeed's stage-0 bf16
    # optimizer cannot take the norm of a split dictionary.
    frozenset({"experiment=multi_node", "deepspeed=zero0"}): "deepspeed.zero_stage=0 with deepspeed.precision='bf16'",
    # The multi-node preset's 1M latents split 8 ways need the plain TopK SAE.
    **{frozenset({"experiment=multi_node", f"sae={arch}"}): "needs sae.architecture='topk'"
       for arch in ("batchtopk", "jumprelu", "matryoshka", "relu_l1")},
    # A transcoder trains data-parallel only, and Matryoshka's prefix losses cannot take a target.
    frozenset({"experiment=multi_node", "hookpoints=mlp_transcoder"}): "a transcoder .* trains data-parallel only",
    frozenset({"hookpoints=mlp_transcoder", "sae=matryoshka"}): "cannot be a transcoder",
    # A cross-layer transcoder is JumpReLU or TopK.
    **{frozenset({"hookpoints=clt", f"sae={arch}"}): "cannot be a cross-layer transcoder"
       for arch in ("batchtopk", "matryoshka", "relu_l1")},
}

# Groups composed with each other group's options in turn (pairs), not in the full product: the
# presets override several groups at once, and hookpoints only meet the model's layers.
PAIRWISE = ("experiment", "hookpoints", "eval")


def _pairs(group: str) -> list[dict[str, str]]:
    options = _options()
    pairs = []
    for other in options:
        if other != group:
            pairs += [{group: a, other: b} for a in options[group] for b in options[other]]
    return pairs


def test_conf_has_the_documented_groups():
    assert {"model", "hookpoints", "data", "sae", "cache", "cluster", "logging", "train", "deepspeed",
            "experiment", "eval"} <= set(_options())
    assert set(_options()["experiment"]) == {"laptop", "gpu_node", "multi_node"}


@pytest.mark.parametrize(
    "choice",
    _combinations([g for g in _options() if g not in ("deepspeed", *PAIRWISE)])
    + _combinations(["deepspeed", *DEEPSPEED_PARTNERS])
    + [pair for group in PAIRWISE for pair in _pairs(group)],
    ids=lambda c: ",".join(f"{g}={o}" for g, o in c.items()),
)
def test_every_combination_composes(choice):
    overrides = [f"{group}={option}" for group, option in choice.items()]
    for group, option in choice.items():
        overrides += [o for o in REQUIRED.get(f"{group}/{option}", []) if o.split("=")[0] not in choice]
    if "model" in choice and choice["model"] != "local" and "experiment" in choice:
        overrides = [o for o in overrides if o != "model.name_or_path=/models/llama"]
    refusal = REFUSED.get(frozenset(overrides[:2]))
    if refusal:  # a combination that cannot work is refused in one line, before anything starts
        with pytest.raises(ValueError, match=refusal):
            compose_job(overrides)
        return
    job = compose_job(overrides)
    assert isinstance(job, JobConfig)


def test_the_default_job_is_the_dataclass_defaults():
    """One source for each default: the dataclasses. The default option of each group sets no
    value of its own (``test_no_yaml_restates_a_default``), so what runs is what they say."""
    assert compose_job([]) == JobConfig()


def _package(path: Path) -> str:
    """Where a YAML file's keys land in the job: its ``# @package`` line, else its group."""
    for line in path.read_text().splitlines():
        if line.startswith("# @package "):
            package = line.removeprefix("# @package ").strip()
            return "" if package == "_global_" else package
    return path.parent.name


def _settings(path: Path) -> dict[str, object]:
    """The values a YAML file sets, by dotted key in the job (its defaults list left out)."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_container(OmegaConf.load(path))
    body.pop("defaults", None)

    def flatten(node: object, prefix: str) -> dict[str, object]:
        if not isinstance(node, dict):
            return {prefix: node}
        return {k: v for name, value in node.items() for k, v in flatten(value, f"{prefix}.{name}".lstrip(".")).items()}

    return flatten(body, _package(path))


YAML_FILES = sorted(Path(CONF_DIR).glob("*/*.yaml"))


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_no_yaml_restates_a_default(path):
    """A YAML file sets a value equal to the dataclass default only where another option sets
    that key otherwise (``deepspeed/zero2`` says ``zero_stage: 2`` so that it stays stage 2); a
    value repeated anywhere else would be a second source that can drift from the first."""
    import functools

    defaults = JobConfig()
    options = [other for other in YAML_FILES if other.parent.name != "experiment"]
    set_by_options: dict[str, list[object]] = {}
    for other in options:
        for key, value in _settings(other).items():
            set_by_options.setdefault(key, []).append(value)
    restated = [
        f"{key}: {value!r}" for key, value in _settings(path).items()
        if value == functools.reduce(getattr, key.split("."), defaults)
        and all(other == value for other in set_by_options.get(key, []))
    ]
    assert not restated, f"{path.relative_to(CONF_DIR)} restates the dataclass defaults {restated}"


def test_command_line_overrides_reach_the_dataclasses():
    job = compose_job(["sae.n_latents=8192", "cache=s3", "cache.uri=s3://bucket/prefix", "train.lr=1e-3"])
    assert (job.sae.n_latents, job.cache.uri, job.train.lr) == (8192, "s3://bucket/prefix", 1e-3)


def test_deepspeed_group_defaults_to_zero2_and_takes_a_feature_parallel_grid():
    assert (compose_job([]).deepspeed.zero_stage, compose_job([]).deepspeed.precision) == (2, "fp32")
    job = compose_job([
        "deepspeed=zero3", "deepspeed.precision=bf16", "deepspeed.feature_parallel=2",
        "cluster.num_train_workers=4", "sae.auxk_coefficient=0", "deepspeed.stage3_param_persistence_threshold=0",
    ])
    assert (job.deepspeed.zero_stage, job.deepspeed.precision, job.deepspeed.feature_parallel) == (3, "bf16", 2)
    assert job.deepspeed.stage3_param_persistence_threshold == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sae.n_latents=0", "sae.n_latents=0 must be positive"),
        ("sae.k=5000", "sae.k=5000 must be in [1, sae.n_latents=4608]"),
        ("sae.architecture=relu", "sae.architecture='relu': expected one of ['topk', 'batchtopk'"),
        ("train.lr=-0.1", "train.lr=-0.1 must be positive"),
        ("train.batch_size=1023", "train.batch_size=1023 must be divisible by cluster.num_train_workers=2"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage=4 must be 0, 1, 2 or 3"),
        ("deepspeed.precision=fp16", "deepspeed.precision='fp16': expected 'fp32' or 'bf16'"),
        ("deepspeed.reduce_bucket_size=0", "deepspeed.reduce_bucket_size=0 must be positive"),
        ("deepspeed.feature_parallel=3", "deepspeed.feature_parallel=3 must divide cluster.num_train_workers=2"),
        ("deepspeed.feature_parallel=2", "deepspeed.feature_parallel=2 needs sae.architecture='topk' with sae.auxk_coefficient=0"),
        ("deepspeed=zero4", "deepspeed/zero4"),
        ("cache.uri=gs://bucket/x", "cache.uri='gs://bucket/x': unknown scheme 'gs'"),
        ("cache.uri=s3:///x", "cache.uri='s3:///x': missing bucket"),
        ("cache.dtype=int8", "cache.dtype='int8': expected one of"),
        ("cache.s3_max_attempts=0", "cache.s3_max_attempts=0 must be at least 1"),
        ("data.context_length=1", "data.context_length=1 must be at least 2"),
        ("cluster.num_producers=0", "cluster.num_producers=0 must be positive"),
        ("logging.wandb_mode=loud", "logging.wandb_mode='loud': expected offline, online or disabled"),
        ("sae.n_latents=many", "sae.n_latents=many"),
        ("sae.bogus=1", "sae.bogus"),
        ("model=nonexistent", "model/nonexistent"),
        ("sweep.k=[16,5000]", "sweep variant k5000: sae.k=5000 must be in [1, sae.n_latents=4608]"),
        ("sweep.k=[16,16]", "sweep.k=[16, 16]: a value is listed twice"),
        ("sweep.lr=[0.001,-1]", "sweep.lr=[0.001, -1.0]: every value must be positive"),
        ("run.keep_checkpoints=1", "run.keep_checkpoints=1 must be at least 2"),
        ("run.checkpoint_every_steps=-5", "run.checkpoint_every_steps=-5 must be >= 0"),
        ("run.name=a/b", "run.name='a/b': expected a non-empty name without '/'"),
        ("cluster.train_max_failures=-1", "cluster.train_max_failures=-1 must be >= 0"),
        ("cluster.placement_timeout_s=0", "cluster.placement_timeout_s=0.0 must be positive"),
        ("train.histogram_every_steps=-1", "train.histogram_every_steps=-1 must be >= 0"),
        ("train.normalization_rows=0", "train.normalization_rows=0 must be positive"),
        ("model.hookpoints=[mlp_out.1,mlp_out.1]", "'mlp_out.1' is listed twice"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_value(override, message):
    with pytest.raises(ValueError) as info:
        compose_job([override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["cluster.num_train_workers=4", "deepspeed.feature_parallel=2", "sae.auxk_coefficient=0", "sae.n_latents=4607"],
            "deepspeed.feature_parallel=2 must divide sae.n_latents=4607",
        ),
        (
            ["cluster.num_train_workers=4", "deepspeed.feature_parallel=2", "sae.auxk_coefficient=0", "train.batch_size=1023"],
            "train.batch_size=1023 must be divisible by cluster.num_train_workers=4 / deepspeed.feature_parallel=2",
        ),
        (
            ["deepspeed=zero0", "deepspeed.precision=bf16", "deepspeed.feature_parallel=2", "sae.auxk_coefficient=0"],
            "deepspeed.zero_stage=0 with deepspeed.precision='bf16' and deepspeed.feature_parallel=2 cannot clip",
        ),
        (
            ["deepspeed.feature_parallel=2", "sae.auxk_coefficient=0", "sweep.n_latents=[4096,4097]"],
            "sweep variant n4097: deepspeed.feature_parallel=2 must divide sae.n_latents=4097",
        ),
        (["resume=run-a", "run.name=run-b"], "resume='run-a' and run.name='run-b': give one of them"),
    ],
)
def test_bad_layouts_fail_with_one_line(overrides, message):
    with pytest.raises(ValueError) as info:
        compose_job(overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_transcoder_preset_names_both_ends_and_overrides_pick_a_layer():
    """``hookpoints=mlp_transcoder`` is the middle layer's MLP input predicting its output; the two
    fields take any layer or module path, and a skip term or another architecture composes on top."""
    job = compose_job(["hookpoints=mlp_transcoder"])
    assert (job.model.hookpoint, job.model.target_hookpoint) == ("mlp_in.mid", "mlp_out.mid")
    assert job.model.all_hookpoints == ["mlp_in.mid", "mlp_out.mid"]
    job = compose_job(["model.hookpoint=model.layers.6.mlp.down_proj:input", "model.target_hookpoint=mlp_out.6",
                       "sae=batchtopk", "sae.skip_connection=true"])
    assert job.model.all_hookpoints == ["model.layers.6.mlp.down_proj:input", "mlp_out.6"]
    assert job.sae.skip_connection and job.sae.architecture == "batchtopk"
    assert compose_job([]).model.target_hookpoint is None


def test_the_clt_preset_covers_a_range_of_mlps():
    """``hookpoints=clt`` caches the MLP input and output of every covered layer (inputs first),
    and ``model.clt_layers`` picks the range."""
    job = compose_job(["hookpoints=clt", "sae=jumprelu"])
    assert job.model.clt_layer_numbers == list(range(12, 18))
    assert job.model.all_hookpoints == [f"mlp_in.{i}" for i in range(12, 18)] + [f"mlp_out.{i}" for i in range(12, 18)]
    job = compose_job(["model.clt_layers=[0,1]", "deepspeed.feature_parallel=2", "sae.auxk_coefficient=0"])
    assert job.model.all_hookpoints == ["mlp_in.0", "mlp_in.1", "mlp_out.0", "mlp_out.1"]
