"""TransformerLens hook names (what SAELens dictionaries record in ``metadata.hook_name``) as our
hookpoints (``activation_cache.hooking.resolve_hookpoint``) on a Hugging Face causal LM.

For layer ``L`` (the model may be a meta-device skeleton: only its module tree is read):

| TransformerLens hook               | hookpoint                                                          |
| ---------------------------------- | ------------------------------------------------------------------ |
| ``blocks.L.hook_resid_post``       | ``resid_post.L`` (the layer's output)                              |
| ``blocks.L.hook_resid_pre``        | ``resid_post.(L-1)``; for L = 0 the first layer's input            |
| ``blocks.L.hook_resid_mid``,       | the input of the norm before the MLP (Llama:                       |
| ``blocks.L.hook_mlp_in``           | ``model.layers.L.post_attention_layernorm:input``)                 |
| ``blocks.L.ln2.hook_normalized``   | ``mlp_in.L`` (the MLP's input)                                     |
| ``blocks.L.hook_attn_out``         | ``attn_out.L`` (the attention block's output)                      |
| ``blocks.L.hook_mlp_out``          | ``mlp_out.L`` (the MLP's output)                                   |
| ``blocks.L.mlp.hook_post``         | the MLP's down projection's input (Llama: ``mlp.down_proj:input``) |

``resid_pre`` of layer 0 is the first layer's input rather than the embedding module's output:
the two differ where the model adds positions (GPT-2's ``wpe``) or scales the embedding outside
the module. Where a layer normalises a sub-block's output before adding it to the residual stream
(Gemma 2 and 3, OLMo 2: a ``post_feedforward_layernorm``), ``hook_attn_out`` / ``hook_mlp_out``
are what is added, the output of ``post_attention_layernorm`` / ``post_feedforward_layernorm``,
as in TransformerLens's ``TransformerBlock``. A model with parallel attention and MLP has no
``resid_mid``. Names that are already ours (module paths, ``resid_post.2``) pass through; any
other name (``blocks.3.attn.hook_z``, ``hook_embed``) maps to None and needs ``--hookpoint``.
The mapping is checked against ``transformers``' own tensors on a tiny Llama and a tiny GPT-2
(``tests/interp/test_saelens_folders.py``); other layouts follow the module names above.

Which model the dictionary saw: SAELens 6 trains on ``HookedTransformer.from_pretrained_no_processing``
(``sae_lens/load_model.py``), whose activations are the Hugging Face model's. A dictionary
trained on a model loaded through ``HookedTransformer.from_pretrained`` (TransformerLens's default
weight processing; the dictionary's ``metadata.model_from_pretrained_kwargs`` says how it was
loaded) saw other activations in two places (TransformerLens 3.9 ``ProcessWeights.process_weights``):

* ``center_writing_weights`` (LayerNorm models only, e.g. GPT-2; not RMSNorm ones such as Llama)
  subtracts the mean over d_model from every weight and bias that writes to the residual stream,
  so by construction ``hook_resid_*``, ``hook_attn_out`` and ``hook_mlp_out`` are the Hugging
  Face model's minus each token's mean over d_model. The logits are the same (LayerNorm removes
  that mean), but the activations read here differ from the ones such a dictionary was trained on
  by that per-token mean along the all-ones direction.
* ``fold_ln`` folds each norm's gain (and LayerNorm's bias) into the next weights, so
  ``ln2.hook_normalized`` lacks the gain that ``mlp_in.L`` here includes.

Neither changes the residual stream of an RMSNorm model such as Llama. These statements come from
reading TransformerLens's source; the tests do not run TransformerLens.
"""

from __future__ import annotations

import re

from torch import nn

from activation_cache.hooking import INPUT_SUFFIX, resolve_hookpoint

__all__ = ["hookpoint_for", "hookpoint_from_hook_name"]

_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")
_OUR_SHORTHAND = re.compile(r"(resid_post|attn_out|mlp_out|mlp_in)\.(mid|\d+)")
# Names common architectures give the modules a hook lands on, tried in order.
_POST_MLP_NORMS = ("post_feedforward_layernorm",)
_PRE_MLP_NORMS = ("post_attention_layernorm", "ln_2")
_DOWN_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2")


def hookpoint_from_hook_name(hook_name: str, model: nn.Module) -> str | None:
    """Our canonical hookpoint for ``hook_name`` (a TransformerLens hook name, or one of ours) on
    ``model``; None where no mapping is known (the module docstring). Raises ValueError for a
    layer the model does not have."""
    block = _BLOCK_HOOK.fullmatch(hook_name)
    if block is None:
        ours = _OUR_SHORTHAND.fullmatch(hook_name) or hook_name.removesuffix(INPUT_SUFFIX) in dict(model.named_modules())
        return resolve_hookpoint(model, hook_name) if ours else None
    layer, hook = int(block.group(1)), block.group(2)
    layer_path = _layer_path(model, layer, hook_name)
    children = dict(dict(model.named_modules())[layer_path].named_children())
    if hook == "hook_resid_post":
        return layer_path
    if hook == "hook_resid_pre":
        return resolve_hookpoint(model, f"resid_post.{layer - 1}") if layer > 0 else layer_path + INPUT_SUFFIX
    if hook in ("hook_resid_mid", "hook_mlp_in"):
        return _resid_mid(model, layer, layer_path, children)
    if hook == "ln2.hook_normalized":
        return resolve_hookpoint(model, f"mlp_in.{layer}")
    if hook == "hook_attn_out":
        post_norm = "post_attention_layernorm" if _has_any(children, _POST_MLP_NORMS) else None
        return f"{layer_path}.{post_norm}" if post_norm else resolve_hookpoint(model, f"attn_out.{layer}")
    if hook == "hook_mlp_out":
        post_norm = next((n for n in _POST_MLP_NORMS if n in children), None)
        return f"{layer_path}.{post_norm}" if post_norm else resolve_hookpoint(model, f"mlp_out.{layer}")
    if hook == "mlp.hook_post":
        mlp = resolve_hookpoint(model, f"mlp_out.{layer}")
        mlp_children = dict(dict(model.named_modules())[mlp].named_children())
        down = next((n for n in _DOWN_PROJECTIONS if n in mlp_children), None)
        return f"{mlp}.{down}{INPUT_SUFFIX}" if down else None
    return None


def hookpoint_for(hook_name: str, model: nn.Module, override: str | None = None, *, field: str = "hook_name",
                  give: str = "--hookpoint") -> str:
    """The hookpoint a dictionary recorded as ``hook_name`` reads on ``model``: ``override`` (the
    user's ``--hookpoint``, resolved) if given, else the mapping of ``hookpoint_from_hook_name``;
    one line naming the hook if there is none. ``field`` and ``give`` name, in that line, the
    cfg.json field the name came from and how to override it (a transcoder's ``hook_name_out``)."""
    if override is not None:
        return resolve_hookpoint(model, override)
    hookpoint = hookpoint_from_hook_name(hook_name, model)
    if hookpoint is None:
        raise ValueError(
            f"dictionary {field} {hook_name!r} has no known hookpoint in {type(model).__name__}: give "
            f"{give} (a module path or resid_post|attn_out|mlp_out|mlp_in.<layer>)"
        )
    return hookpoint


def _layer_path(model: nn.Module, layer: int, hook_name: str) -> str:
    first = resolve_hookpoint(model, "resid_post.0")  # e.g. model.layers.0
    container = first.rsplit(".", 1)[0]
    n_layers = len(dict(model.named_modules())[container])
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"dictionary hook_name {hook_name!r}: layer {layer} out of range, {type(model).__name__} has "
            f"{n_layers} layers (0..{n_layers - 1})"
        )
    return f"{container}.{layer}"


def _has_any(children: dict[str, nn.Module], names: tuple[str, ...]) -> bool:
    return any(name in children for name in names)


def _resid_mid(model: nn.Module, layer: int, layer_path: str, children: dict[str, nn.Module]) -> str | None:
    config = getattr(model, "config", None)
    if getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False):
        return None  # attention and MLP both read the layer's input: there is no resid_mid
    if "pre_feedforward_layernorm" in children:  # Gemma 2/3: post_attention_layernorm norms attn_out
        return f"{layer_path}.pre_feedforward_layernorm{INPUT_SUFFIX}"
    if _has_any(children, _POST_MLP_NORMS):  # OLMo 2 post-norm: the MLP reads the residual itself
        return resolve_hookpoint(model, f"mlp_in.{layer}")
    norm = next((n for n in _PRE_MLP_NORMS if n in children), None)
    return f"{layer_path}.{norm}{INPUT_SUFFIX}" if norm else None
