"""The training loop and held-out evaluation. Consumes tensors; knows nothing of where they come from.

Data-parallel collectives go through torch.distributed directly (the engine was built on the same
process group); with ``world_size=1`` none are issued.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.activation_stats import FeatureMaxima
from trainer.loggers import MetricLogger
from trainer.metrics import (
    DeadLatentTracker,
    PooledReconstructionStats,
    dense_fraction,
    output_fire_counts,
)
from trainer.sae import ForwardOutput

log = logging.getLogger(__name__)

class NonFiniteError(RuntimeError):
    """Training stopped on NaN or Inf; raised on every rank at once (the ranks agree first, so
    none is left waiting in a collective). Picklable, so it crosses Ray processes intact."""

    step: int
    """The step (1-based) that met the non-finite values."""

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would call __init__ with the message.
        return (type(self), self._args)


class NonFiniteLossError(NonFiniteError):
    """The loss was NaN or infinite on some rank; raised before the backward pass and optimizer
    step (``train.nonfinite=stop``)."""

    def __init__(self, step: int, loss: float, n_bad_ranks: int, world_size: int) -> None:
        super().__init__(
            f"step {step}: non-finite loss on {n_bad_ranks} of {world_size} ranks "
            f"(this rank: {loss}); the optimizer step was skipped and training stopped (train.nonfinite='stop')"
        )
        self.step, self.loss, self.n_bad_ranks, self.world_size = step, loss, n_bad_ranks, world_size
        self._args = (step, loss, n_bad_ranks, world_size)


class NonFiniteBatchError(NonFiniteError):
    """A batch held NaN or Inf on some rank; raised before the forward pass (``train.nonfinite=stop``)."""

    def __init__(self, step: int, n_rows: int, n_bad_ranks: int, world_size: int) -> None:
        super().__init__(
            f"step {step}: {n_rows} rows with NaN or Inf in the batch on {n_bad_ranks} of {world_size} "
            "ranks; training stopped before the forward pass (train.nonfinite='stop')"
        )
        self.step, self.n_rows, self.n_bad_ranks, self.world_size = step, n_rows, n_bad_ranks, world_size
        self._args = (step, n_rows, n_bad_ranks, world_size)


class SkippedStepsError(NonFiniteError):
    """More steps were skipped for non-finite values than ``train.max_skipped_steps`` allows."""

    def __init__(self, step: int, batch_steps: int, loss_steps: int, max_skipped_steps: int) -> None:
        super().__init__(
            f"step {step}: {batch_steps + loss_steps} steps skipped for non-finite values ({batch_steps} "
            f"batches with NaN or Inf, {loss_steps} non-finite losses), more than "
            f"train.max_skipped_steps={max_skipped_steps}; training stopped"
        )
        self.step, self.max_skipped_steps = step, max_skipped_steps
        self._args = (step, batch_steps, loss_steps, max_skipped_steps)


@dataclass
class NonFiniteCounts:
    """What the non-finite policy skipped: the same on every rank."""

    batch_steps: int = 0
    """Steps skipped before the forward pass because a batch held NaN or Inf (on any rank)."""
    loss_steps: int = 0
    """Steps skipped before the backward pass because the loss was not finite (on any rank)."""
    rows: int = 0
    """Rows holding NaN or Inf in the training batches, all data-parallel ranks together."""

    @property
    def skipped_steps(self) -> int:
        return self.batch_steps + self.loss_steps

    def metrics(self) -> dict[str, float]:
        """The counts as logged metrics (totals since the start of the run)."""
        return {"skipped_steps_nonfinite_batch": float(self.batch_steps),
                "skipped_steps_nonfinite_loss": float(self.loss_steps), "nonfinite_rows": float(self.rows)}


@dataclass
class TrainSummary:
    """What a ``DictionaryTrainer`` did."""

    steps: int
    """Steps taken, one batch each, skipped ones included: ``steps - nonfinite.skipped_steps``
    optimizer steps."""
    tokens: int
    """Training tokens the optimizer steps consumed, all ranks together (skipped batches not counted)."""
    final_metrics: dict[str, float] = field(default_factory=dict)
    """The last logged metrics (those of the final step's logging window)."""
    nonfinite: NonFiniteCounts = field(default_factory=NonFiniteCounts)
    """Steps skipped and rows met with NaN or Inf (``train.nonfinite``)."""


@dataclass(frozen=True)
class StepSchedule:
    """Hyperparameters that change with the step, set on the SAE module before each step
    (the learning rate is the engine's, see ``wrap_in_deepspeed(lr_multiplier=...)``)."""

    sparsity_coefficient: Callable[[int], float] | None = None
    """Step -> the L1 / L0 coefficient of penalised architectures (warmup)."""
    k: Callable[[int], int] | None = None
    """Step -> k of TopK-family architectures (annealing)."""

    def apply(self, module: nn.Module, step: int) -> None:
        if self.sparsity_coefficient is not None and hasattr(module, "sparsity_coefficient"):
            module.sparsity_coefficient = self.sparsity_coefficient(step)
        if self.k is not None and hasattr(module, "k"):
            module.k = self.k(step)


class DictionaryTrainer:
    """One dictionary's training, one batch at a time: what a worker steps through its data plan,
    and what a sweep steps in lockstep, several dictionaries on each batch read once.

    ``world_size`` is the number of data-parallel ranks (distinct batches per step) and
    ``data_group`` their process group (``None``: the default group); the ranks of a feature
    group see the same batch and the same selected latents, so firing counts are summed over the
    data group only. Every rank must call ``step`` the same number of times: the steps hold
    collectives. ``state_dict`` / ``load_state_dict`` carry the loop's own state (step, tokens,
    dead-latent and non-finite counters) for a checkpoint; the engine carries the rest. Every
    ``histogram_every`` steps (0: never) the firing-frequency histogram goes to the logger.

    Non-finite values (``nonfinite``, see ``TrainConfig.nonfinite``): a batch holding NaN or Inf
    is found before the forward pass, a non-finite loss before the backward pass; ``"skip"``
    leaves weights, optimizer, lr schedule, buffers and dead-latent counters as they were (the
    step still consumes its batch and counts toward ``max_steps``), ``"stop"`` raises a
    ``NonFiniteError``; more than ``max_skipped_steps`` skips raise ``SkippedStepsError``. Every
    rank takes the same decision (one small all-reduce each, with several ranks).
    """

    def __init__(
        self,
        engine: Any,
        *,
        scale: float,
        max_steps: int,
        logger: MetricLogger,
        log_every: int,
        dead_tracker: DeadLatentTracker,
        dead_after_tokens: int,
        world_size: int,
        schedule: StepSchedule | None = None,
        target_scale: float | None = None,
        data_group: Any = None,
        histogram_every: int = 0,
        nonfinite: str = "skip",
        max_skipped_steps: int = 100,
    ) -> None:
        for name, value in (("max_steps", max_steps), ("log_every", log_every), ("world_size", world_size)):
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        if not scale > 0:
            raise ValueError(f"scale={scale} must be positive")
        if nonfinite not in ("skip", "stop") or max_skipped_steps < 0:
            raise ValueError(f"nonfinite={nonfinite!r}, max_skipped_steps={max_skipped_steps}: "
                             "expected 'skip' or 'stop' and a count >= 0")
        self.nonfinite_policy, self.max_skipped_steps = nonfinite, max_skipped_steps
        self.nonfinite = NonFiniteCounts()
        self.engine, self.scale, self.target_scale = engine, scale, target_scale
        self.max_steps, self.logger, self.log_every = max_steps, logger, log_every
        self.dead_tracker, self.dead_after_tokens = dead_tracker, dead_after_tokens
        self.world_size, self.data_group = world_size, data_group
        self.schedule = schedule or StepSchedule()
        self.histogram_every = histogram_every
        self.steps_done = 0
        self.tokens = 0
        self.metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        """Every logged window's metrics with its step: the training curves of the report."""
        self._window = _MetricWindow(engine.device)

    @property
    def done(self) -> bool:
        return self.steps_done >= self.max_steps

    def step(self, batch: Tensor | tuple[Tensor, Tensor]) -> None:
        """One optimizer step on this rank's ``batch`` of raw activations (or ``(x, target)``),
        or a skipped step if the batch or the loss is not finite (see the class docstring)."""
        if self.done:
            raise RuntimeError(f"max_steps={self.max_steps} already taken")
        engine, step = self.engine, self.steps_done + 1
        x, target = batch if isinstance(batch, tuple) else (batch, None)
        self.schedule.apply(engine.module, step - 1)
        inputs = _scaled(x, engine, self.scale)
        forward_kwargs: dict[str, Any] = {}
        if target is not None:
            forward_kwargs["target"] = _scaled(target, engine, self.target_scale or self.scale)
        if self._skips_batch(step, inputs, forward_kwargs.get("target")):
            return
        forward_kwargs["dead_mask"] = self.dead_tracker.dead_mask(self.dead_after_tokens).to(engine.device)
        buffers = _buffer_snapshot(engine.module)  # BatchTopK's forward updates its threshold
        clock = [time.perf_counter()]
        out: ForwardOutput = engine(inputs, **forward_kwargs)
        if self._skips_loss(step, out.loss):
            _restore_buffers(engine.module, buffers)
            return
        clock.append(time.perf_counter())
        engine.backward(out.loss)
        clock.append(time.perf_counter())
        engine.step()
        clock.append(time.perf_counter())
        self._window.add_times(clock)
        global_tokens = x.shape[0] * self.world_size
        _update_dead_latents(self.dead_tracker, out, self.world_size, self.data_group)
        _average_buffers(engine.module, self.world_size, self.data_group)
        self.steps_done, self.tokens = step, self.tokens + global_tokens
        self._window.add(out, tokens=global_tokens)
        self._log(step)

    def _skips_batch(self, step: int, inputs: Tensor, target: Tensor | None) -> bool:
        """Whether any rank's batch holds NaN or Inf (counted; raised under ``stop``). The check
        is on the SAE's input, after scaling and any cast, and costs one host sync before the
        forward pass, as the loss check costs one before the backward pass."""
        bad_rows = ~torch.isfinite(inputs).all(dim=-1)
        if target is not None:
            bad_rows |= ~torch.isfinite(target).all(dim=-1)
        n_rows, n_bad_ranks = _agree_on_bad_rows(bad_rows.sum(), self.world_size)
        if not n_bad_ranks:
            return False
        self.nonfinite.rows += n_rows
        if self.nonfinite_policy == "stop":
            raise NonFiniteBatchError(step, n_rows, n_bad_ranks, _ranks())
        self.nonfinite.batch_steps += 1
        self._skip(step, f"{n_rows} rows with NaN or Inf on {n_bad_ranks} of {_ranks()} ranks")
        return True

    def _skips_loss(self, step: int, loss: Tensor) -> bool:
        """Whether the loss is not finite on any rank (counted; raised under ``stop``)."""
        n_bad_ranks = _count_bad_ranks(loss, _ranks())
        if not n_bad_ranks:
            return False
        if self.nonfinite_policy == "stop":
            raise NonFiniteLossError(step, loss.item(), n_bad_ranks, _ranks())
        self.nonfinite.loss_steps += 1
        self._skip(step, f"non-finite loss on {n_bad_ranks} of {_ranks()} ranks (this rank: {loss.item()})")
        return True

    def _skip(self, step: int, reason: str) -> None:
        counts = self.nonfinite
        if counts.skipped_steps > self.max_skipped_steps:
            raise SkippedStepsError(step, counts.batch_steps, counts.loss_steps, self.max_skipped_steps)
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning("step %d skipped (train.nonfinite='skip'): %s; %d of at most %d skipped so far",
                        step, reason, counts.skipped_steps, self.max_skipped_steps)
        self.steps_done = step
        self._log(step)

    def _log(self, step: int) -> None:
        """The window's metrics and the histogram, on the steps they are due."""
        engine = self.engine
        if step % self.log_every == 0 or step == self.max_steps:
            self.metrics = _window_metrics(engine, self._window, self.dead_tracker, self.dead_after_tokens)
            self.metrics["tokens"] = float(self.tokens)
            self.metrics.update(self.nonfinite.metrics())
            self.history.append({"step": step, **self.metrics})
            self.logger.log(self.metrics, step=step)
            _log_progress(step, self.max_steps, self.metrics)
            self._window = _MetricWindow(engine.device)
        if self.histogram_every and (step % self.histogram_every == 0 or step == self.max_steps):
            # Latents that never fired sit at -10, left of every real frequency.
            frequencies = self.dead_tracker.frequencies().clamp_min(1e-10)
            self.logger.log_histogram("firing_log10_frequency", frequencies.log10(), step=step)

    def summary(self) -> TrainSummary:
        return TrainSummary(steps=self.steps_done, tokens=self.tokens, final_metrics=self.metrics,
                            nonfinite=dataclasses.replace(self.nonfinite))

    def state_dict(self) -> dict[str, Any]:
        """The loop's position, dead-latent and non-finite counters (tensors and JSON-able values)."""
        return {"steps_done": self.steps_done, "tokens": self.tokens, "dead_tracker": self.dead_tracker.state_dict(),
                "history": [dict(entry) for entry in self.history],
                "nonfinite": dataclasses.asdict(self.nonfinite)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done, self.tokens = int(state["steps_done"]), int(state["tokens"])
        self.dead_tracker.load_state_dict(state["dead_tracker"])
        # Checkpoints written before the counters existed load with zeros.
        self.nonfinite = NonFiniteCounts(**{k: int(v) for k, v in state.get("nonfinite", {}).items()})
        self.history = [dict(entry) for entry in state.get("history", [])]
        self._window = _MetricWindow(self.engine.device)


def _ranks() -> int:
    """All ranks of the job (data x feature), 1 without a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def _log_progress(step: int, max_steps: int, metrics: dict[str, float]) -> None:
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    log.info(
        "step %d/%d  loss %.4g  fvu %.4f  l0 %.1f  dead %.3f  %.0f tokens/s",
        step, max_steps, metrics.get("loss", float("nan")), metrics.get("fvu", float("nan")),
        metrics.get("l0", float("nan")), metrics.get("dead_fraction", float("nan")),
        metrics.get("tokens_per_second", float("nan")),
    )


def _scaled(x: Tensor, engine: Any, scale: float) -> Tensor:
    # Scale in fp32 before any cast to bf16, so the cast rounds once.
    dtype = next(engine.module.parameters()).dtype
    return (x.to(device=engine.device, dtype=torch.float32) * scale).to(dtype)


def _count_bad_ranks(loss: Tensor, world_size: int) -> int:
    """Ranks whose ``loss`` is not finite, agreed across all ``world_size`` ranks: a rank that
    stopped or skipped alone would leave the others blocked in backward's gradient all-reduce."""
    n_bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    if world_size > 1:
        dist.all_reduce(n_bad)
    return int(n_bad.item())


def _agree_on_bad_rows(n_local: Tensor, data_parallel: int) -> tuple[int, int]:
    """(rows with NaN or Inf over the data-parallel ranks, ranks that hold any), agreed by every
    rank of the job. The ranks of a feature group share a batch, so the sum over all ranks
    counts each row once per feature rank."""
    counts = torch.stack([n_local.float(), (n_local > 0).float()])
    ranks = _ranks()
    if ranks > 1:
        dist.all_reduce(counts)
    n_rows, n_bad_ranks = counts.tolist()
    return round(n_rows) // (ranks // data_parallel), round(n_bad_ranks)


def _buffer_snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


def _restore_buffers(module: nn.Module, snapshot: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(snapshot[name])


def _average_buffers(module: nn.Module, world_size: int, group: Any) -> None:
    # Running statistics in buffers (BatchTopK's inference threshold) are updated from each
    # rank's own batch; averaging keeps one value on every rank, as the saved dictionary needs.
    if world_size == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, group=group)
            buffer /= world_size


def _update_dead_latents(tracker: DeadLatentTracker, out: ForwardOutput, world_size: int, group: Any) -> None:
    counts = output_fire_counts(out.latent_acts, out.latent_indices, tracker.n_latents)
    if world_size > 1:
        dist.all_reduce(counts, group=group)  # summed, so every rank's tracker holds the global counts
    tracker.update_counts(counts, n_tokens=out.latent_acts.shape[0] * world_size)


# The timed phases of a step, logged as ``<phase>_ms`` (ms per step over the log window):
# DeepSpeed's forward with the loss's finiteness check (a small all-reduce over the ranks), its backward (with the gradient reduction of ZeRO 1/2 and of data
# parallelism: gloo or nccl), its optimizer step (clipping, Adam, ZeRO's gathers of the weights).
STEP_PHASES = ("forward", "backward", "optimizer")

WALL_CLOCK_METRICS = ("tokens_per_second", *(f"{phase}_ms" for phase in STEP_PHASES), "between_steps_ms")
"""The logged metrics that time the run (they differ between two runs of the same steps)."""


class _MetricWindow:
    """Sums of per-step figures since the last log, kept as tensors so steps do not sync."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(6, device=device)  # loss, mse, fvu, l0, sparsity_loss, aux_loss
        self.steps = 0
        self.tokens = 0
        self.start_s = time.perf_counter()
        self.seconds = dict.fromkeys(STEP_PHASES, 0.0)
        """Wall seconds in each phase of the window's steps; what is left of the window's time was
        spent between steps (reading the batch, the checks, other dictionaries, checkpoints)."""

    def add(self, out: ForwardOutput, *, tokens: int) -> None:
        terms = torch.stack([out.loss, out.mse, out.fvu, out.l0, out.sparsity_loss, out.aux_loss]).detach()
        self.sums += terms.float()
        self.steps += 1
        self.tokens += tokens

    def add_times(self, clock: list[float]) -> None:
        """Add one step's phases from the ``perf_counter`` times at their boundaries."""
        for phase, start, stop in zip(STEP_PHASES, clock[:-1], clock[1:], strict=True):
            self.seconds[phase] += stop - start


def _window_metrics(
    engine: Any, window: _MetricWindow, tracker: DeadLatentTracker, dead_after_tokens: int
) -> dict[str, float]:
    """Figures averaged over the window's steps and over all ranks (the ranks of a feature group
    hold the same figures, so averaging over them too changes nothing). A window whose steps were
    all skipped (the same on every rank) has no averages to give."""
    averages: dict[str, float] = {}
    if window.steps:
        sums = window.sums.clone()
        ranks = _ranks()
        if ranks > 1:
            dist.all_reduce(sums)
        names = ("loss", "mse", "fvu", "l0", "sparsity_loss", "aux_loss")
        averages = dict(zip(names, (sums / (window.steps * ranks)).tolist(), strict=True))
    elapsed_s = max(time.perf_counter() - window.start_s, 1e-9)
    # Host wall time per step of each phase (on a GPU, where kernels run asynchronously, the
    # phase that waits for them); "between_steps_ms" is the rest of the window's time.
    steps = max(window.steps, 1)
    phases = {f"{phase}_ms": 1e3 * seconds / steps for phase, seconds in window.seconds.items()}
    phases["between_steps_ms"] = max(1e3 * elapsed_s / steps - sum(phases.values()), 0.0)
    return {
        **averages,
        **phases,
        "dead_fraction": tracker.dead_fraction(dead_after_tokens),
        "dense_fraction": dense_fraction(tracker.frequencies()),
        "tokens_per_second": window.tokens / elapsed_s,
        "lr": float(engine.get_lr()[0]),
    }


@torch.no_grad()
def evaluate(
    sae: nn.Module,
    batches: Iterable[Tensor] | Iterable[tuple[Tensor, Tensor]],
    *,
    scale: float,
    target_scale: float | None = None,
    dead_tracker: DeadLatentTracker | None = None,
    feature_max: FeatureMaxima | None = None,
) -> dict[str, float]:
    """Reconstruction quality of ``sae`` (the bare module, e.g. ``engine.module``) on held-out raw
    activations, pooled over all of them.

    ``batches`` are raw rows ``x``, or for a transcoder ``(x, y)`` pairs of raw input and target
    rows: the model reads ``x * scale`` and its prediction, divided by ``target_scale`` (default
    ``scale``), is measured against ``y``.

    Returns ``fvu`` (total squared error over the target's total variance around its pooled mean),
    ``mse`` (per element, in raw target units), ``l0``, ``cosine``, ``dead_fraction`` (latents that
    never fired on these tokens), ``n_tokens`` and ``nonfinite_rows_skipped`` (rows holding NaN or
    Inf in ``x`` or ``y``, left out of every figure). ``dead_tracker``, if given, is updated with the
    held-out firings: pass a fresh one to get held-out firing frequencies for the dictionary.
    ``feature_max``, if given, is updated with each latent's activations (encoded from ``x``), which
    are already the saved dictionary's on raw rows (the fold leaves pre-activations unchanged).
    A cross-layer transcoder (``sae.n_layers``; ``y`` its L targets side by side) adds
    ``layer_fvu``: each layer's FVU, pooled the same way over that layer's columns.
    """
    target_scale = scale if target_scale is None else target_scale
    for name, value in (("scale", scale), ("target_scale", target_scale)):
        if not value > 0:
            raise ValueError(f"{name}={value} must be positive")
    was_training = sae.training
    sae.eval()  # BatchTopK runs as its saved JumpReLU and leaves its threshold alone
    try:
        return _evaluate(
            sae, batches, scale=scale, target_scale=target_scale, dead_tracker=dead_tracker, feature_max=feature_max
        )
    finally:
        sae.train(was_training)


def _evaluate(
    sae: nn.Module, batches: Iterable[Tensor] | Iterable[tuple[Tensor, Tensor]], *, scale: float,
    target_scale: float, dead_tracker: DeadLatentTracker | None, feature_max: FeatureMaxima | None,
) -> dict[str, float]:
    param = next(sae.parameters())
    stats = PooledReconstructionStats()
    n_layers = getattr(sae, "n_layers", 0)  # a cross-layer transcoder's targets, layer by layer
    layer_stats = [PooledReconstructionStats() for _ in range(n_layers)]
    total_fired = torch.zeros(sae.n_latents, dtype=torch.int64, device=param.device)
    n_skipped = 0
    for batch in batches:
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        x_raw = x.to(device=param.device, dtype=torch.float32)
        inputs = (x_raw * scale).to(param.dtype)
        y_raw = x_raw if y is None else y.to(device=param.device, dtype=torch.float32)
        targets = inputs if y is None else (y_raw * target_scale).to(param.dtype)
        # Rows with NaN or Inf (a cache keeps them; training skips their batches) would make
        # every pooled figure NaN: they are left out and counted. Each row is encoded on its own.
        finite = torch.isfinite(inputs).all(dim=-1) & torch.isfinite(targets).all(dim=-1)
        if not finite.all():
            n_skipped += int((~finite).sum().item())
            x_raw, inputs, y_raw, targets = x_raw[finite], inputs[finite], y_raw[finite], targets[finite]
            if not len(inputs):
                continue
        out: ForwardOutput = sae(inputs) if y is None else sae(inputs, target=targets)
        prediction = out.reconstruction.float() / target_scale
        stats.update(y_raw, prediction, out.latent_acts)
        if layer_stats:
            for layer, y_layer, prediction_layer in zip(
                layer_stats, y_raw.chunk(n_layers, dim=1), prediction.chunk(n_layers, dim=1), strict=True
            ):
                layer.update(y_layer, prediction_layer, out.latent_acts)
        counts = output_fire_counts(out.latent_acts, out.latent_indices, sae.n_latents)
        total_fired += counts
        if dead_tracker is not None:
            dead_tracker.update_counts(counts, n_tokens=inputs.shape[0])
        if feature_max is not None:
            feature_max.update(out.latent_acts, out.latent_indices)
    result = stats.result()
    result["dead_fraction"] = (total_fired == 0).float().mean().item()
    result["nonfinite_rows_skipped"] = n_skipped
    if layer_stats:
        result["layer_fvu"] = [layer.result()["fvu"] for layer in layer_stats]
    return result
