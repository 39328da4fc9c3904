"""The training loop and held-out evaluation. Consumes tensors; knows nothing of where they come from.

Data-parallel collectives go through torch.distributed directly (the engine was built on the same
process group); with ``world_size=1`` none are issued.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.loggers import MetricLogger
from trainer.metrics import (
    DeadLatentTracker,
    PooledReconstructionStats,
    dense_fraction,
    output_fire_counts,
)
from trainer.sae import ForwardOutput

log = logging.getLogger(__name__)



class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite on some rank; raised on every rank before the optimizer step."""

    def __init__(self, step: int, loss: float, n_bad_ranks: int, world_size: int) -> None:
        super().__init__(
            f"step {step}: non-finite loss on {n_bad_ranks} of {world_size} ranks "
            f"(this rank: {loss}); the optimizer step was skipped and training stopped"
        )
        self.step, self.loss, self.n_bad_ranks, self.world_size = step, loss, n_bad_ranks, world_size

    def __reduce__(self) -> tuple[Any, ...]:
        # Survives pickling across Ray processes (the default would call __init__ with the message).
        return (type(self), (self.step, self.loss, self.n_bad_ranks, self.world_size))


@dataclass
class TrainSummary:
    """What ``train`` did."""

    steps: int
    """Optimizer steps taken."""
    tokens: int
    """Training tokens consumed, all ranks together."""
    final_metrics: dict[str, float] = field(default_factory=dict)
    """The last logged metrics (those of the final step's logging window)."""


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
    """One dictionary's training, one batch at a time: what ``train`` loops over, and what a
    sweep steps in lockstep, several dictionaries on each batch read once.

    ``world_size`` is the number of data-parallel ranks (distinct batches per step) and
    ``data_group`` their process group (``None``: the default group); the ranks of a feature
    group see the same batch and the same selected latents, so firing counts are summed over the
    data group only. Every rank must call ``step`` the same number of times: the steps hold
    collectives. ``state_dict`` / ``load_state_dict`` carry the loop's own state (step, tokens,
    dead-latent counters) for a checkpoint; the engine carries the rest. Every
    ``histogram_every`` steps (0: never) the firing-frequency histogram goes to the logger.
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
    ) -> None:
        for name, value in (("max_steps", max_steps), ("log_every", log_every), ("world_size", world_size)):
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        if not scale > 0:
            raise ValueError(f"scale={scale} must be positive")
        self.engine, self.scale, self.target_scale = engine, scale, target_scale
        self.max_steps, self.logger, self.log_every = max_steps, logger, log_every
        self.dead_tracker, self.dead_after_tokens = dead_tracker, dead_after_tokens
        self.world_size, self.data_group = world_size, data_group
        self.schedule = schedule or StepSchedule()
        self.histogram_every = histogram_every
        self.wants_dead_mask = "dead_mask" in inspect.signature(engine.module.forward).parameters
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
        """One optimizer step on this rank's ``batch`` of raw activations (or ``(x, target)``)."""
        if self.done:
            raise RuntimeError(f"max_steps={self.max_steps} already taken")
        engine, step = self.engine, self.steps_done + 1
        x, target = batch if isinstance(batch, tuple) else (batch, None)
        self.schedule.apply(engine.module, step - 1)
        forward_kwargs: dict[str, Any] = {}
        if self.wants_dead_mask:
            forward_kwargs["dead_mask"] = self.dead_tracker.dead_mask(self.dead_after_tokens).to(engine.device)
        if target is not None:
            forward_kwargs["target"] = _scaled(target, engine, self.target_scale or self.scale)
        out = train_step(engine, x, scale=self.scale, step=step, world_size=_ranks(), **forward_kwargs)
        global_tokens = x.shape[0] * self.world_size
        _update_dead_latents(self.dead_tracker, out, self.world_size, self.data_group)
        _average_buffers(engine.module, self.world_size, self.data_group)
        self.steps_done, self.tokens = step, self.tokens + global_tokens
        self._window.add(out, tokens=global_tokens)
        if step % self.log_every == 0 or step == self.max_steps:
            self.metrics = _window_metrics(engine, self._window, self.dead_tracker, self.dead_after_tokens)
            self.metrics["tokens"] = float(self.tokens)
            self.history.append({"step": step, **self.metrics})
            self.logger.log(self.metrics, step=step)
            _log_progress(step, self.max_steps, self.metrics)
            self._window = _MetricWindow(engine.device)
        if self.histogram_every and (step % self.histogram_every == 0 or step == self.max_steps):
            # Latents that never fired sit at -10, left of every real frequency.
            frequencies = self.dead_tracker.frequencies().clamp_min(1e-10)
            self.logger.log_histogram("firing_log10_frequency", frequencies.log10(), step=step)

    def summary(self) -> TrainSummary:
        return TrainSummary(steps=self.steps_done, tokens=self.tokens, final_metrics=self.metrics)

    def state_dict(self) -> dict[str, Any]:
        """The loop's position and dead-latent counters (tensors and JSON-able values)."""
        return {"steps_done": self.steps_done, "tokens": self.tokens, "dead_tracker": self.dead_tracker.state_dict(),
                "history": [dict(entry) for entry in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done, self.tokens = int(state["steps_done"]), int(state["tokens"])
        self.dead_tracker.load_state_dict(state["dead_tracker"])
        self.history = [dict(entry) for entry in state.get("history", [])]
        self._window = _MetricWindow(self.engine.device)


def train(
    engine: Any,
    batches: Iterator[Tensor | tuple[Tensor, Tensor]],
    *,
    max_steps: int,
    **options: Any,
) -> TrainSummary:
    """Run ``max_steps`` optimizer steps of ``engine`` (a DeepSpeed engine around an SAE).

    Every rank must call this with the same ``max_steps`` and enough local batches (each
    ``batch_size // world_size`` rows of raw activations): the steps hold collectives, so a rank
    that stops early leaves the others waiting. The SAE sees ``x * scale``. A batch may be an
    ``(x, target)`` pair (transcoders); the target is scaled by ``target_scale`` (default ``scale``).
    Architectures whose forward takes ``dead_mask`` (AuxK) get the tracker's dead latents each step.
    ``options`` are ``DictionaryTrainer``'s.
    """
    trainer = DictionaryTrainer(engine, max_steps=max_steps, **options)
    while not trainer.done:
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"batches ran out at step {trainer.steps_done + 1} of max_steps={max_steps}")
        trainer.step(batch)
    return trainer.summary()


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


def train_step(
    engine: Any, x: Tensor, *, scale: float, step: int, world_size: int, **forward_kwargs: Any
) -> ForwardOutput:
    """Forward on ``x * scale``, check the loss is finite on every rank, backward, optimizer step.
    ``forward_kwargs`` (``dead_mask``, a scaled ``target``) go to the SAE's forward."""
    out: ForwardOutput = engine(_scaled(x, engine, scale), **forward_kwargs)
    _raise_unless_finite(out.loss, step=step, world_size=world_size)
    engine.backward(out.loss)
    engine.step()
    return out


def _raise_unless_finite(loss: Tensor, *, step: int, world_size: int) -> None:
    # Agreed across ranks: a rank that raised alone would leave the others blocked in backward's
    # gradient all-reduce.
    n_bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    if world_size > 1:
        dist.all_reduce(n_bad)
    if n_bad.item() > 0:
        raise NonFiniteLossError(step, loss.item(), int(n_bad.item()), world_size)


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


class _MetricWindow:
    """Sums of per-step figures since the last log, kept as tensors so steps do not sync."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(6, device=device)  # loss, mse, fvu, l0, sparsity_loss, aux_loss
        self.steps = 0
        self.tokens = 0
        self.start_s = time.perf_counter()

    def add(self, out: ForwardOutput, *, tokens: int) -> None:
        l0 = (out.latent_acts > 0).sum(dim=-1).float().mean()
        zero = out.loss.new_zeros(())
        sparsity = getattr(out, "sparsity_loss", zero).detach()
        aux = getattr(out, "aux_loss", zero).detach()
        terms = torch.stack([out.loss.detach(), out.mse.detach(), out.fvu.detach(), l0, sparsity, aux])
        self.sums += terms.float()
        self.steps += 1
        self.tokens += tokens


def _window_metrics(
    engine: Any, window: _MetricWindow, tracker: DeadLatentTracker, dead_after_tokens: int
) -> dict[str, float]:
    """Figures averaged over the window's steps and over all ranks (the ranks of a feature group
    hold the same figures, so averaging over them too changes nothing)."""
    sums = window.sums.clone()
    ranks = _ranks()
    if ranks > 1:
        dist.all_reduce(sums)
    loss, mse, fvu, l0, sparsity_loss, aux_loss = (sums / (window.steps * ranks)).tolist()
    elapsed_s = max(time.perf_counter() - window.start_s, 1e-9)
    return {
        "loss": loss,
        "mse": mse,
        "fvu": fvu,
        "l0": l0,
        "sparsity_loss": sparsity_loss,
        "aux_loss": aux_loss,
        "dead_fraction": tracker.dead_fraction(dead_after_tokens),
        "dense_fraction": dense_fraction(tracker.frequencies()),
        "tokens_per_second": window.tokens / elapsed_s,
        "lr": float(engine.get_lr()[0]),
    }


@torch.no_grad()
def evaluate(
    sae: nn.Module,
    batches: Iterable[Tensor],
    *,
    scale: float,
    dead_tracker: DeadLatentTracker | None = None,
) -> dict[str, float]:
    """Reconstruction quality of ``sae`` (the bare module, e.g. ``engine.module``) on held-out raw
    activations, pooled over all of them.

    Returns ``fvu`` (total squared error over total variance around the pooled mean), ``mse`` (per
    element, in raw activation units), ``l0``, ``cosine``, ``dead_fraction`` (latents that never
    fired on these tokens) and ``n_tokens``. ``dead_tracker``, if given, is updated with the
    held-out firings: pass a fresh one to get held-out firing frequencies for the dictionary.
    """
    if not scale > 0:
        raise ValueError(f"scale={scale} must be positive")
    was_training = sae.training
    sae.eval()  # BatchTopK runs as its saved JumpReLU and leaves its threshold alone
    try:
        return _evaluate(sae, batches, scale=scale, dead_tracker=dead_tracker)
    finally:
        sae.train(was_training)


def _evaluate(sae: nn.Module, batches: Iterable[Tensor], *, scale: float, dead_tracker: DeadLatentTracker | None) -> dict[str, float]:
    param = next(sae.parameters())
    stats = PooledReconstructionStats()
    total_fired = torch.zeros(sae.n_latents, dtype=torch.int64, device=param.device)
    for x in batches:
        x_raw = x.to(device=param.device, dtype=torch.float32)
        out: ForwardOutput = sae((x_raw * scale).to(param.dtype))
        stats.update(x_raw, out.reconstruction.float() / scale, out.latent_acts)
        counts = output_fire_counts(out.latent_acts, out.latent_indices, sae.n_latents)
        total_fired += counts
        if dead_tracker is not None:
            dead_tracker.update_counts(counts, n_tokens=x.shape[0])
    result = stats.result()
    result["dead_fraction"] = (total_fired == 0).float().mean().item()
    return result

