"""The job's typed configuration: one dataclass per ``conf/`` group, registered with Hydra.

The YAML files in ``conf/`` extend these schemas; ``compose_job`` turns the composed config into
dataclasses (validated by their ``__post_init__``) before anything expensive starts.


Closed choices are typed ``str`` and checked in ``__post_init__``: OmegaConf 2.3, which
Hydra uses to type-check the YAML, cannot represent ``Literal``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from activation_cache.config import CacheConfig, DataConfig, ModelConfig
from cluster.sweep import SweepConfig, variants
from trainer.config import DeepSpeedConfig, SAEConfig, TrainConfig
from trainer.registry import check_transcoder_architecture

CLT_ARCHITECTURES = ("jumprelu", "topk")
"""The activations a cross-layer transcoder is built with (``trainer.clt``)."""

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ClusterConfig:
    """The Ray cluster and how the job's actors are placed on it."""

    address: str | None = None
    """Ray address of an existing cluster (``auto``, ``ray://host:10001``, ``host:6379``);
    ``None`` starts a local cluster inside the driver process."""
    num_cpus: int | None = None
    """CPUs of the local cluster (``None``: all of this machine's, or as many as the producers and
    the trainer workers reserve together if that is more: the job then starts the workers while
    the producers fill the caches, and they wait for the caches to complete, so the two never
    compute at once unless ``train_while_caching``)."""
    object_store_memory_bytes: int = 1 << 30
    """Ray object store size of the local cluster."""
    num_producers: int = 2
    """Producer actors, each holding one model replica."""
    producer_num_cpus: float = 1.0
    """CPUs Ray reserves for each producer (its torch thread count follows)."""
    units_per_producer: int = 2
    """Work units queued at each producer at once (one runs while the next waits); bounds
    the shards in flight and so the memory they hold."""
    producer_num_gpus: float = 0.0
    """GPUs Ray gives each producer: 1 for a model on one GPU, more for a replica split over
    several (``model.device_map=auto``); 0 on CPU."""
    producer_max_restarts: int = 2
    """Times Ray restarts a producer that died (killed, out of memory, node lost); its
    unfinished units are redone."""
    producer_replacements: int = 2
    """New producers started, in all, for ones that died beyond their restarts."""
    unit_max_attempts: int = 3
    """Attempts at one work unit before the cache fill stops with that unit named."""
    num_train_workers: int = 2
    """Ray Train workers, one DeepSpeed engine each: ``num_train_workers / deepspeed.feature_parallel``
    data-parallel replicas of ``deepspeed.feature_parallel`` ranks each."""
    train_worker_num_cpus: float = 1.0
    """CPUs Ray reserves for each trainer worker."""
    train_max_failures: int = 2
    """Times Ray Train starts a new worker group after a worker died (killed, out of memory, node
    lost); each new group resumes from the newest complete checkpoint (``run.checkpoint_every_steps``)."""
    placement_timeout_s: float = 600.0
    """The longest a trainer worker group waits for room on the cluster (its placement group), at
    the start or after a failure (a node lost with no spare CPUs), before the job stops naming what
    the group needed and what the cluster had; in all over the run, as Ray Train counts its tries.
    Ray Train tries again every 60 s meanwhile (every half of this if shorter), one console line
    each. The evaluation task waits as long for room to start, on each of its tries."""
    train_while_caching: bool = False
    """Start training while the producers still fill the cache: the trainer tails the shards as
    they are committed (the cluster must hold producers and trainer workers at once, else the
    workers wait for the producers' resources)."""

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus <= 0:
            raise ValueError(f"cluster.num_cpus={self.num_cpus} must be positive or null")
        if self.num_producers <= 0:
            raise ValueError(f"cluster.num_producers={self.num_producers} must be positive")
        if self.num_train_workers <= 0:
            raise ValueError(f"cluster.num_train_workers={self.num_train_workers} must be positive")
        if self.producer_num_cpus <= 0 or self.train_worker_num_cpus <= 0:
            raise ValueError(
                f"cluster.producer_num_cpus={self.producer_num_cpus} and "
                f"cluster.train_worker_num_cpus={self.train_worker_num_cpus} must be positive"
            )
        if self.producer_num_gpus < 0:
            raise ValueError(f"cluster.producer_num_gpus={self.producer_num_gpus} must be >= 0")
        if self.producer_max_restarts < 0 or self.producer_replacements < 0:
            raise ValueError(
                f"cluster.producer_max_restarts={self.producer_max_restarts} and "
                f"cluster.producer_replacements={self.producer_replacements} must be >= 0"
            )
        if self.train_max_failures < 0:
            raise ValueError(f"cluster.train_max_failures={self.train_max_failures} must be >= 0")
        if not self.placement_timeout_s > 0:
            raise ValueError(f"cluster.placement_timeout_s={self.placement_timeout_s} must be positive")
        if self.unit_max_attempts <= 0:
            raise ValueError(f"cluster.unit_max_attempts={self.unit_max_attempts} must be positive")
        if self.units_per_producer <= 0:
            raise ValueError(f"cluster.units_per_producer={self.units_per_producer} must be positive")
        if self.object_store_memory_bytes < 78 * 2**20:
            raise ValueError(f"cluster.object_store_memory_bytes={self.object_store_memory_bytes} must be at least 78 MiB (Ray's minimum)")


@dataclass
class LoggingConfig:
    """Metrics and logs."""

    wandb_mode: str = "offline"
    """``offline`` writes runs under ``dir`` for ``wandb sync``; ``online`` needs WANDB_API_KEY."""
    project: str = "saeforge"
    """wandb project."""
    dir: str = "outputs"
    """Local folder for wandb files and Ray Train's run state."""
    level: str = "INFO"
    """Log level of the driver and the workers."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode={self.wandb_mode!r}: expected offline, online or disabled")
        if self.level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"logging.level={self.level!r}: expected DEBUG, INFO, WARNING or ERROR")


@dataclass
class RunConfig:
    """Identity and location of one training run."""

    name: str | None = None
    """Run name; ``None`` makes one from the time and the cache key, or continues the run the same
    command left unfinished when its driver died (``cluster.runs``)."""
    uri: str | None = None
    """Where runs are written (``<uri>/<name>/dictionary/...``); ``None``: ``<cache.uri>/runs``."""
    checkpoint_every_steps: int = 200
    """Write a checkpoint (weights, optimizer, scheduler, dead-latent counters, RNG, reader position)
    to ``<run>/checkpoints/`` every this many steps; 0 never. A run started again under the same
    name (or ``resume=<name>``) continues from the newest complete one."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""

    def __post_init__(self) -> None:
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"run.checkpoint_every_steps={self.checkpoint_every_steps} must be >= 0 (0: never)")
        if self.keep_checkpoints < 2:
            raise ValueError(f"run.keep_checkpoints={self.keep_checkpoints} must be at least 2 (a damaged newest "
                             "checkpoint must leave a good one)")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ValueError(f"run.name={self.name!r}: expected a non-empty name without '/'")


@dataclass
class EvalConfig:
    """The spliced evaluation run on every trained dictionary (and by ``saeforge eval``)."""

    enabled: bool = True
    """Run it after each training; off leaves ``eval.json`` with the reconstruction figures only."""
    max_tokens: int = 4096
    """Held-out tokens evaluated (whole sequences, at least one): three full model forwards each
    (raise it, and ``num_cpus`` / ``num_gpus``, for tighter CE figures on a real cluster)."""
    batch_size: int = 4
    """Sequences per forward pass; each holds three (batch, context, vocab) fp32 logits at once."""
    worst_contexts: int = 20
    """Tokens of largest reconstruction error listed with their context."""
    context_tokens: int = 16
    """Tokens shown before a worst token (and a quarter as many after it)."""
    histogram_bins: int = 40
    """Bins of the error-norm histogram."""
    num_cpus: float = 2.0
    """CPUs Ray reserves for the evaluation task (its torch thread count follows), at most a node's:
    it runs alone after training (2 threads took 0.68x one's time on the default run's forwards)."""
    num_gpus: float = 0.0
    """GPUs Ray gives the evaluation task (the model runs on the first if any)."""
    audit_features: int = 2
    """Feature cards of the report audited after the spliced evaluation (``interp.audit``: each
    clamped high and zeroed, its target tokens' log-probability against a random direction's, KL,
    and the suppression's leak), shown on the cards and in ``eval.json``'s ``audit``; 0: none.
    Only cards firing at least 3 times in the audit's tokens qualify."""
    audit_tokens: int = 256
    """Held-out tokens the audit reads (the evaluation's first whole sequences, at least one):
    about 7 forward passes over them per audited feature and 2 more (the default run: 16 s for 2
    features on one CPU thread, docs/evaluation.md)."""
    audit_multiple: float = 10.0
    """The amplification clamps a feature to this multiple of its largest held-out activation."""
    audit_seeds: int = 0
    """Seeds of the sampled continuations (two prompts, 20 new tokens each, unedited and steered,
    per feature and edit); 0 leaves them out of the job (``saeforge steer --audit`` samples 5)."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "batch_size", "histogram_bins", "context_tokens", "audit_tokens",
                     "audit_multiple"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be positive")
        for name in ("worst_contexts", "audit_features", "audit_seeds"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 0")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"eval.num_cpus={self.num_cpus} must be positive and eval.num_gpus={self.num_gpus} >= 0")


@dataclass
class JobConfig:
    """Everything one ``saeforge train`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The spliced evaluation of every trained dictionary (held-out text through the model with
    the dictionary's reconstruction substituted)."""
    resume: str | None = None
    """Continue the run of this name from its newest complete checkpoint (``run.name`` is set to
    it); the job stops with an error if the run has no complete checkpoint."""

    def __post_init__(self) -> None:
        if self.resume is not None:
            if self.run.name not in (None, self.resume):
                raise ValueError(f"resume={self.resume!r} and run.name={self.run.name!r}: give one of them")
            self.run.name = self.resume
            RunConfig.__post_init__(self.run)
        for variant in variants(self.sae, self.train.lr, self.sweep):
            where = f"sweep variant {variant.name}: " if variant.name else ""
            self._check_grid(variant.sae, where)
            if self.model.clt_layers:
                self._check_clt(variant.sae, where)
            else:
                self._check_transcoder(variant.sae, where)

    def _check_transcoder(self, sae: SAEConfig, where: str) -> None:
        """A transcoder (``model.target_hookpoint``) needs an architecture that can predict another
        hookpoint; a skip connection needs a transcoder."""
        target = self.model.target_hookpoint
        if target is None:
            if sae.skip_connection:
                raise ValueError(
                    where + "sae.skip_connection=true adds an affine skip from the input to the target: "
                    "it needs model.target_hookpoint (a transcoder)"
                )
            return
        check_transcoder_architecture(sae.architecture)
        if self.deepspeed.feature_parallel > 1:
            raise ValueError(
                where + f"deepspeed.feature_parallel={self.deepspeed.feature_parallel} is for SAEs: a transcoder "
                f"(model.target_hookpoint={target!r}) trains data-parallel only (feature_parallel=1)"
            )

    def _check_clt(self, sae: SAEConfig, where: str) -> None:
        """A cross-layer transcoder (``model.clt_layers``) is JumpReLU or TopK, without a skip term;
        its latents per layer split evenly over the feature-parallel ranks (``_check_grid``)."""
        layers = self.model.clt_layers
        if sae.architecture not in CLT_ARCHITECTURES:
            raise ValueError(
                where + f"sae.architecture={sae.architecture!r} cannot be a cross-layer transcoder "
                f"(model.clt_layers={list(layers)}): expected one of {list(CLT_ARCHITECTURES)}"
            )
        feature_parallel = self.deepspeed.feature_parallel
        if feature_parallel > 1 and sae.architecture == "topk" and sae.auxk_coefficient != 0:
            raise ValueError(
                where + f"deepspeed.feature_parallel={feature_parallel} splits a TopK cross-layer transcoder "
                f"without AuxK: set sae.auxk_coefficient=0 (got {sae.auxk_coefficient})"
            )
        if sae.encoder_gemm == "bf16":
            raise ValueError(
                where + f"sae.encoder_gemm={sae.encoder_gemm!r} with model.clt_layers={list(layers)}: a cross-layer "
                "transcoder's GEMMs run in the parameters' dtype (use deepspeed.precision=bf16)"
            )
        if sae.skip_connection:
            raise ValueError(
                where + f"sae.skip_connection=true with model.clt_layers={list(layers)}: a cross-layer "
                "transcoder has no skip term (train per-layer skip transcoders with model.target_hookpoint)"
            )

    def _check_grid(self, sae: SAEConfig, where: str) -> None:
        workers, feature_parallel = self.cluster.num_train_workers, self.deepspeed.feature_parallel
        if workers % feature_parallel:
            raise ValueError(
                where + f"deepspeed.feature_parallel={feature_parallel} must divide cluster.num_train_workers={workers}"
            )
        if sae.n_latents % feature_parallel:
            per_layer = " (latents per layer: each layer's split evenly over the ranks)" if self.model.clt_layers else ""
            raise ValueError(
                where + f"deepspeed.feature_parallel={feature_parallel} must divide sae.n_latents={sae.n_latents}{per_layer}"
            )
        data_parallel = workers // feature_parallel
        if self.train.batch_size % data_parallel:
            split = f" / deepspeed.feature_parallel={feature_parallel}" if feature_parallel > 1 else ""
            raise ValueError(
                where + f"train.batch_size={self.train.batch_size} must be divisible by "
                f"cluster.num_train_workers={workers}{split} (the data-parallel ranks)"
            )
        # A cross-layer transcoder splits each layer's latents itself (trainer.feature_parallel).
        if feature_parallel > 1 and not self.model.clt_layers and (sae.architecture != "topk" or sae.auxk_coefficient != 0):
            raise ValueError(
                where + f"deepspeed.feature_parallel={feature_parallel} needs sae.architecture='topk' with "
                f"sae.auxk_coefficient=0 (the sharded SAE has no AuxK), got sae.architecture="
                f"{sae.architecture!r} with sae.auxk_coefficient={sae.auxk_coefficient}"
            )
        self.deepspeed.check_clipping(max_grad_norm=self.train.max_grad_norm)


def register_configs() -> None:
    """Register the schemas so every YAML in ``conf/`` is type-checked when composed."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    for group, schema in [
        ("model", ModelConfig), ("data", DataConfig), ("sae", SAEConfig), ("train", TrainConfig),
        ("deepspeed", DeepSpeedConfig), ("cache", CacheConfig), ("cluster", ClusterConfig), ("logging", LoggingConfig),
        ("eval", EvalConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=schema)


def compose_job(overrides: list[str] | None = None, *, config_name: str = "config") -> JobConfig:
    """Compose ``conf/`` with command-line overrides and validate it into a JobConfig.

    Raises ``ValueError`` with a one-line message for unknown keys, wrong types or invalid values.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    _check_group_options(list(overrides or []))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name=config_name, overrides=list(overrides or []))
        missing = sorted(OmegaConf.missing_keys(composed))
        if missing:
            raise ValueError(f"{missing[0]} is required: set it on the command line ({missing[0]}=...)")
        job = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(_one_line(err)) from None
    assert isinstance(job, JobConfig)
    _refuse_unknown_settings(job, "")
    return job


def _check_group_options(overrides: list[str]) -> None:
    """Hydra skips an unknown option of an optional group (``experiment=typo``) without a word."""
    for override in overrides:
        group, _, option = override.lstrip("+~").partition("=")
        if (CONF_DIR / group).is_dir() and option not in ("", "null") and not (CONF_DIR / group / f"{option}.yaml").is_file():
            raise ValueError(_no_such_option(group, option))


def _no_such_option(group: str, option: str) -> str:
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    return f"{group}={option}: no such option (conf/{group}/{option}.yaml), expected one of {options}"


def _one_line(err: Exception) -> str:
    """Hydra's and OmegaConf's multi-line errors as one line naming the override and what was expected."""
    import re

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = err.__cause__ or err.__context__
    missing_option = re.search(r"Could not find '([^']+)/([^']+)'", str(err))
    if missing_option:
        return _no_such_option(*missing_option.groups())
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and full_key:
        section = full_key.rsplit(".", 1)[0] if "." in full_key else ""
        return f"{full_key}: no such setting, expected one of {_setting_names(section)}"
    merging = re.match(r"Error merging override (.+)", str(err))
    if isinstance(cause, ValidationError) and merging:
        return f"{merging.group(1)}: {str(cause).splitlines()[0]}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return ": ".join(line for line in lines if not line.startswith(("full_key", "object_type", "reference_type")))


def _setting_names(section: str) -> list[str]:
    """The settings of ``section`` (``""``: the top level, ``"sae"``, ...) of JobConfig."""
    import dataclasses

    schema: type = JobConfig
    for part in filter(None, section.split(".")):
        default = next((f.default_factory for f in dataclasses.fields(schema) if f.name == part), None)
        if not isinstance(default, type) or not dataclasses.is_dataclass(default):
            return []
        schema = default
    return [f.name for f in dataclasses.fields(schema)]


def _refuse_unknown_settings(node: object, prefix: str) -> None:
    """A ``+key=value`` override adds a key the schema lacks, which OmegaConf keeps as a stray
    attribute that nothing reads: a misspelt setting would be ignored without a word."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(node)]  # type: ignore[arg-type]
    stray = sorted(set(vars(node)) - set(names))
    if stray:
        raise ValueError(f"{prefix}{stray[0]}: no such setting, expected one of {names}")
    for name in names:
        value = getattr(node, name)
        if dataclasses.is_dataclass(value):
            _refuse_unknown_settings(value, f"{prefix}{name}.")


def job_from_dict(raw: dict, *, where: str) -> JobConfig:
    """The JobConfig of a plain dict ``to_dict`` made (a run's ``config.json``, a trainer worker's
    config); a ValueError naming ``where`` for one this saeforge cannot read."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), raw))
    except OmegaConfBaseException as err:
        raise ValueError(f"{where}: not a job config this saeforge reads ({err})".splitlines()[0]) from None
    assert isinstance(job, JobConfig)
    return job


def to_dict(job: JobConfig) -> dict:
    """A plain dict of the resolved config (for wandb and cfg.json; holds no secrets)."""
    return OmegaConf.to_container(OmegaConf.structured(job), resolve=True)  # type: ignore[return-value]
