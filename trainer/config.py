"""Typed configuration of the SAE and its training. YAML lives in ``conf/``; these are the schemas.

Closed choices are typed ``str`` and checked in ``__post_init__``: OmegaConf 2.3, which
Hydra uses to type-check the YAML, cannot represent ``Literal``.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.registry import check_architecture

NONFINITE_POLICIES = ("skip", "stop")
CLT_TOPK_MODES = ("layer", "all")
"""``sae.clt_topk``: k per layer per token, or k * L over all the token's latents (``trainer.clt``)."""


# The values of ``sae.encoder_gemm``.
ENCODER_GEMMS = ("param", "bf16", "auto")


@dataclass
class SAEConfig:
    """The sparse autoencoder's architecture."""

    architecture: str = "topk"
    """One of ``topk`` (Gao et al. 2024, with AuxK), ``batchtopk`` (Bussmann et al. 2024; saved as
    a JumpReLU with the learned threshold), ``matryoshka_batchtopk`` (nested prefixes),
    ``jumprelu`` (Rajamanoharan et al. 2024, STE thresholds), ``relu_l1`` (Anthropic 2024: L1
    weighted by decoder norms) or ``relu_l1_unitnorm`` (L1 with unit-norm decoder rows); or the
    ``"package.module:Class"`` path of a ``trainer.sae.SparseCoder`` subclass defined elsewhere
    (``trainer.registry``), which each trainer worker imports. The class reads the settings below
    that it needs (its ``config_options``)."""
    n_latents: int = 4608
    """Number of dictionary features (the SAE's width, ``d_sae`` in SAELens)."""
    k: int = 32
    """Active latents per token for the TopK family (BatchTopK: on average over the batch)."""
    k_start: int | None = None
    """Anneal k from this value down to ``k`` over ``train.k_anneal_steps`` steps; ``None``: no annealing."""
    k_aux: int | None = None
    """AuxK: dead latents used to model the residual (``None``: d_model / 2, the paper's choice)."""
    auxk_coefficient: float = 1 / 32
    """AuxK loss weight (Gao et al. 2024: 1/32); 0 turns AuxK off."""
    sparsity_coefficient: float | None = None
    """L1 (ReLU) or L0 / tanh (JumpReLU) coefficient; ``None`` takes the architecture's default."""
    jumprelu_sparsity_loss: str = "l0"
    """JumpReLU penalty: ``l0`` (the paper's) or ``tanh`` (a smooth alternative)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of the JumpReLU straight-through threshold gradient."""
    matryoshka_prefixes: list[int] | None = None
    """Nested prefix sizes ending at ``n_latents``; ``None``: n/8, n/4, n/2, n."""
    normalize_activations: bool = True
    """Scale inputs so their mean norm is sqrt(d_model) (statistics from the cache manifest);
    the factor is folded into the saved weights, so the dictionary works on raw activations.
    A transcoder scales its input and its target each by its own factor, both folded."""
    skip_connection: bool = False
    """Transcoders only (a job with a target hookpoint): add an affine skip path ``x W_skip``
    (d_in x d_out, zero at the start) beside the sparse one, a skip transcoder (SAELens
    ``skip_transcoder`` / ``jumprelu_skip_transcoder``). Its output is the dense, linear part of
    the target the latents then need not explain."""
    clt_topk: str = "layer"
    """Cross-layer transcoders (``model.clt_layers``) with ``architecture=topk``: ``layer`` keeps
    the k largest latents of each layer per token, ``all`` the k * L largest over all the token's
    latents of every covered layer (``trainer.clt``)."""

    encoder_gemm: str = "auto"
    """The dtype of a TopK SAE's or transcoder's encoder GEMM and top-k selection
    (``trainer.kernels``): ``param``, the parameters' (fp32, or bf16 under
    ``deepspeed.precision=bf16``); ``bf16``, bf16 over fp32 parameters, with the gradients, Adam
    and the decoder still in fp32; ``auto``, ``bf16`` where the hardware multiplies bf16 natively
    (a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16), else ``param``. A bf16 GEMM is 8x
    an fp32 one on an AMX CPU; the held-out FVU at equal steps: benchmarks/RESULTS.md. Only
    ``architecture=topk`` has it (and not a cross-layer transcoder): ``bf16`` is refused for the
    others, ``auto`` (the default) is ``param`` for them."""

    def __post_init__(self) -> None:
        check_architecture(self.architecture)
        if self.encoder_gemm not in ENCODER_GEMMS:
            raise ValueError(f"sae.encoder_gemm={self.encoder_gemm!r}: expected one of {list(ENCODER_GEMMS)}")
        if self.encoder_gemm == "bf16" and self.architecture != "topk":
            raise ValueError(
                f"sae.encoder_gemm={self.encoder_gemm!r} with sae.architecture={self.architecture!r}: only topk "
                "has a separate encoder GEMM dtype (use sae.encoder_gemm=param, or deepspeed.precision=bf16)"
            )
        if self.clt_topk not in CLT_TOPK_MODES:
            raise ValueError(f"sae.clt_topk={self.clt_topk!r}: expected one of {list(CLT_TOPK_MODES)}")
        if self.n_latents <= 0:
            raise ValueError(f"sae.n_latents={self.n_latents} must be positive")
        if not 0 < self.k <= self.n_latents:
            raise ValueError(f"sae.k={self.k} must be in [1, sae.n_latents={self.n_latents}]")
        if self.k_start is not None and not self.k <= self.k_start <= self.n_latents:
            raise ValueError(f"sae.k_start={self.k_start} must be in [sae.k={self.k}, sae.n_latents={self.n_latents}]")
        if self.k_aux is not None and not 0 < self.k_aux <= self.n_latents:
            raise ValueError(f"sae.k_aux={self.k_aux} must be in [1, sae.n_latents={self.n_latents}]")
        if self.auxk_coefficient < 0:
            raise ValueError(f"sae.auxk_coefficient={self.auxk_coefficient} must be >= 0")
        if self.sparsity_coefficient is not None and self.sparsity_coefficient < 0:
            raise ValueError(f"sae.sparsity_coefficient={self.sparsity_coefficient} must be >= 0")
        if self.jumprelu_sparsity_loss not in ("l0", "tanh"):
            raise ValueError(f"sae.jumprelu_sparsity_loss={self.jumprelu_sparsity_loss!r}: expected 'l0' or 'tanh'")
        if not self.jumprelu_bandwidth > 0:
            raise ValueError(f"sae.jumprelu_bandwidth={self.jumprelu_bandwidth} must be positive")
        prefixes = self.matryoshka_prefixes
        if prefixes is not None and (
            not prefixes or prefixes != sorted(set(prefixes)) or prefixes[0] <= 0 or prefixes[-1] != self.n_latents
        ):
            raise ValueError(
                f"sae.matryoshka_prefixes={prefixes} must be increasing, positive and end at sae.n_latents={self.n_latents}"
            )


@dataclass
class TrainConfig:
    """How the SAE is trained."""

    batch_size: int = 1024
    """Tokens per optimizer step, summed over all data-parallel ranks."""
    lr: float | None = None
    """Adam learning rate; ``None`` picks 2e-4 / sqrt(n_latents / 2**14) (Gao et al. 2024 scaling)."""
    epochs: int = 3
    """Passes over the training shards of the cache."""
    max_tokens: int | None = None
    """Stop after this many training tokens (all ranks together); ``None`` means all epochs."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value before each step; 0 disables clipping."""
    lr_warmup_steps: int = 20
    """Linear learning-rate warmup from 0 over this many steps."""
    lr_decay: str = "linear"
    """Learning-rate decay after warmup: ``cosine``, ``linear`` or ``constant``."""
    lr_decay_fraction: float = 0.2
    """Fraction of the run, at its end, over which the rate decays (Anthropic's recipe: the last 20%)."""
    min_lr_fraction: float = 0.0
    """The rate decays to this fraction of ``lr``."""
    sparsity_warmup_steps: int = 0
    """Linear warmup of the sparsity coefficient from 0 (penalised architectures)."""
    k_anneal_steps: int = 0
    """Steps over which k anneals from ``sae.k_start`` to ``sae.k``."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    shuffle_buffer_rows: int = 16384
    """Rows held in each rank's shuffle buffer."""
    read_threads: int = 2
    """Threads per rank that fetch, verify and decode shards ahead of training."""
    prefetch_mb: int = 256
    """Shards each rank reads ahead of need, in MiB of stored bytes."""
    dead_after_tokens: int = 200_000
    """A latent that has not fired for this many tokens counts as dead."""
    log_every_steps: int = 10
    """Metrics are logged every this many optimizer steps."""
    histogram_every_steps: int = 100
    """The firing-frequency histogram (log10) is logged every this many steps; 0 never."""
    holdout_fraction: float = 0.1
    """Fraction of the cache's shards held out for evaluation (at least one shard)."""
    normalization_rows: int = 16384
    """Training on a cache still being written (``cluster.train_while_caching``) starts once this
    many rows are committed (or all of them): the normalisation factor and b_dec come from them."""
    follow_timeout_s: float = 1800.0
    """Training on a cache still being written stops with a TimeoutError after this long
    without a new shard."""
    nonfinite: str = "skip"
    """A step whose batch holds NaN or Inf (on any rank), or whose loss is not finite: ``skip``
    it (no change to weights, optimizer, schedule or dead-latent counters; counted and logged)
    or ``stop`` training with an error naming the step. ``skip`` by default: a cache keeps the
    rare non-finite row a model produced, and a multi-hour run should not die on it;
    ``train.max_skipped_steps`` stops a run that skips more than a few."""
    max_skipped_steps: int = 100
    """With ``nonfinite=skip``: training stops with an error once more steps than this were
    skipped (a diverging run or a badly poisoned cache, not a stray row)."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"train.batch_size={self.batch_size} must be positive")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"train.lr={self.lr} must be positive")
        if self.epochs <= 0:
            raise ValueError(f"train.epochs={self.epochs} must be positive")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"train.max_tokens={self.max_tokens} must be positive or null")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"train.max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables)")
        if self.lr_warmup_steps < 0 or self.sparsity_warmup_steps < 0 or self.k_anneal_steps < 0:
            raise ValueError(
                f"train.lr_warmup_steps={self.lr_warmup_steps}, train.sparsity_warmup_steps="
                f"{self.sparsity_warmup_steps} and train.k_anneal_steps={self.k_anneal_steps} must be >= 0"
            )
        if self.lr_decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.lr_decay={self.lr_decay!r}: expected cosine, linear or constant")
        if not 0 < self.lr_decay_fraction <= 1:
            raise ValueError(f"train.lr_decay_fraction={self.lr_decay_fraction} must be in (0, 1]")
        if not 0 <= self.min_lr_fraction <= 1:
            raise ValueError(f"train.min_lr_fraction={self.min_lr_fraction} must be in [0, 1]")
        if self.shuffle_buffer_rows <= 0:
            raise ValueError(f"train.shuffle_buffer_rows={self.shuffle_buffer_rows} must be positive")
        if self.read_threads <= 0:
            raise ValueError(f"train.read_threads={self.read_threads} must be positive")
        if self.prefetch_mb <= 0:
            raise ValueError(f"train.prefetch_mb={self.prefetch_mb} must be positive")
        if self.dead_after_tokens <= 0:
            raise ValueError(f"train.dead_after_tokens={self.dead_after_tokens} must be positive")
        if self.log_every_steps <= 0:
            raise ValueError(f"train.log_every_steps={self.log_every_steps} must be positive")
        if self.histogram_every_steps < 0:
            raise ValueError(f"train.histogram_every_steps={self.histogram_every_steps} must be >= 0 (0: never)")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"train.holdout_fraction={self.holdout_fraction} must be in (0, 1)")
        if self.normalization_rows <= 0:
            raise ValueError(f"train.normalization_rows={self.normalization_rows} must be positive")
        if not self.follow_timeout_s > 0:
            raise ValueError(f"train.follow_timeout_s={self.follow_timeout_s} must be positive")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"train.nonfinite={self.nonfinite!r}: expected one of {list(NONFINITE_POLICIES)}")
        if self.max_skipped_steps < 0:
            raise ValueError(f"train.max_skipped_steps={self.max_skipped_steps} must be >= 0")

    def learning_rate(self, n_latents: int) -> float:
        """The configured lr, or the width-scaled default."""
        return self.lr if self.lr is not None else 2e-4 / (n_latents / 2**14) ** 0.5


@dataclass
class DeepSpeedConfig:
    """How the DeepSpeed engine spreads the SAE over the ranks (the ``deepspeed`` config group).

    Defaults are DeepSpeed's own where it has one. The bucket sizes are in elements, not bytes.
    """

    zero_stage: int = 2
    """ZeRO stage over the data-parallel ranks: 0 replicates everything, 1 partitions the Adam
    state, 2 also the gradients, 3 also the parameters (gathered layer by layer when used)."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: parameters, activations and gradients in bf16 over fp32 master
    weights and Adam state kept by the optimizer."""
    reduce_bucket_size: int = 500_000_000
    """ZeRO 1-3: gradient elements reduced across data-parallel ranks in one collective; larger
    buckets mean fewer, bigger messages and more memory for the bucket."""
    allgather_bucket_size: int = 500_000_000
    """ZeRO 1-2: parameter elements all-gathered in one collective after the optimizer step."""
    overlap_comm: bool | None = None
    """Overlap the gradient reduction with the backward pass (costs bucket memory);
    ``None``: DeepSpeed's default, on for ZeRO 3 and off for 1 and 2."""
    contiguous_gradients: bool = True
    """ZeRO 2-3: copy gradients into one contiguous buffer as they are produced, which avoids
    memory fragmentation during backward."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """ZeRO 3: parameter elements fetched ahead of the module that needs them; 0 fetches on demand."""
    stage3_param_persistence_threshold: int = 100_000
    """ZeRO 3: parameters with fewer elements than this stay whole on every rank (not
    partitioned); small ones cost more in communication than they save in memory."""
    stage3_max_live_parameters: int = 1_000_000_000
    """ZeRO 3: parameter elements each rank may hold gathered at once before releasing some."""
    feature_parallel: int = 1
    """Ranks the latent dimension is split across (``trainer.feature_parallel``); the ranks form
    a (data x feature) grid of ``cluster.num_train_workers / feature_parallel`` data-parallel
    replicas. Must divide ``cluster.num_train_workers`` and ``sae.n_latents``; 1 turns it off."""
    partition_min_mb: float = 256.0
    """ZeRO 1 and 2 partition only where a rank's gradients and Adam state hold at least this many
    MiB; below, the job runs stage 0 (``trainer.engine.job_config``): the memory partitioning saves
    is small and its two collectives a step (reduce-scatter, all-gather) cost more than stage 0's
    one all-reduce (4,608 latents on 2 CPU workers: ZeRO 2 took 1.5x stage 0's step at the same
    loss). 0 always partitions."""

    def __post_init__(self) -> None:
        if self.partition_min_mb < 0:
            raise ValueError(f"deepspeed.partition_min_mb={self.partition_min_mb} must be 0 or more")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"deepspeed.precision={self.precision!r}: expected 'fp32' or 'bf16'")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"deepspeed.{name}={getattr(self, name)} must be positive")
        for name in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters"):
            if getattr(self, name) < 0:
                raise ValueError(f"deepspeed.{name}={getattr(self, name)} must be >= 0")
        if self.feature_parallel <= 0:
            raise ValueError(f"deepspeed.feature_parallel={self.feature_parallel} must be positive")

    def check_clipping(self, *, max_grad_norm: float) -> None:
        """Refuse gradient clipping where DeepSpeed would clip by a wrong norm: with bf16 and no
        ZeRO, its optimizer (FP16_UnfusedOptimizer) takes the norm over gradient tensors, which
        lack the marks that make each feature slice count on every rank, so it counts the first
        slice only (``trainer.engine``)."""
        if max_grad_norm > 0 and self.feature_parallel > 1 and self.zero_stage == 0 and self.precision == "bf16":
            raise ValueError(
                f"deepspeed.zero_stage=0 with deepspeed.precision='bf16' and deepspeed.feature_parallel="
                f"{self.feature_parallel} cannot clip gradients (train.max_grad_norm={max_grad_norm}): "
                "use zero_stage >= 1, fp32 or max_grad_norm=0"
            )
