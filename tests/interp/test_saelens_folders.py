"""Dictionaries from elsewhere: folders SAELens itself writes load with SAELens's encodings, and
TransformerLens hook names map to hookpoints that capture the tensors transformers computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from activation_cache.config import ModelConfig
from activation_cache.hooking import (
    ActivationHarvester,
    load_model,
    model_skeleton,
    resolve_model_source,
)
from interp.hooknames import hookpoint_for, hookpoint_from_hook_name
from trainer.dictionary import InputNormalizedCoder, dictionary_hook_name, load_dictionary
from trainer.sae import Code, SparseCoder

D_IN, D_SAE, K = 16, 48, 5
NORMALIZE_MODES = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm", "covariance_whitening")
# (SAELens architecture, rescale_acts_by_decoder_norm)
ARCHITECTURES = [("topk", False), ("topk", True), ("jumprelu", False), ("standard", False)]

# --------------------------------------------------------------------------- SAELens folders


def _saelens_sae(architecture: str, *, normalize: str, rescale: bool, seed: int):
    """An SAELens inference SAE with random weights of non-unit decoder norms and positive thresholds."""
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    common = dict(
        d_in=D_IN, d_sae=D_SAE, normalize_activations=normalize,
        apply_b_dec_to_input=architecture != "jumprelu",  # both settings covered
        metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="tiny"),
    )
    if architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(k=K, rescale_acts_by_decoder_norm=rescale, **common))
    elif architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    else:
        sae = StandardSAE(StandardSAEConfig(**common))
    generator = torch.Generator().manual_seed(seed)
    scales = {"W_enc": 0.4, "b_enc": 0.3, "W_dec": 0.6, "b_dec": 0.5, "threshold": 0.5}
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scales[name])
        if architecture == "jumprelu":
            sae.threshold.abs_().add_(0.05)
    return sae


def _dense(code: Code, n_latents: int) -> Tensor:
    if code.indices is None:
        return code.acts
    return torch.zeros(code.acts.shape[0], n_latents).scatter(-1, code.indices, code.acts)


@pytest.mark.parametrize("normalize", NORMALIZE_MODES)
@pytest.mark.parametrize(("architecture", "rescale"), ARCHITECTURES)
@torch.no_grad()
def test_saelens_folder_encodes_and_reconstructs_as_saelens_runs_it(
    tmp_path: Path, architecture: str, rescale: bool, normalize: str
) -> None:
    from sae_lens import SAE

    seed = ARCHITECTURES.index((architecture, rescale)) * 10 + NORMALIZE_MODES.index(normalize)
    _saelens_sae(architecture, normalize=normalize, rescale=rescale, seed=seed).save_model(tmp_path)
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(100 + seed)) * 2 + 1
    reference = SAE.load_from_disk(tmp_path)
    expected_acts = reference.encode(x)
    expected = reference.decode(expected_acts)  # SAELens undoes the normalisation encode stored
    assert (expected_acts > 0).any(dim=1).all(), "every token fires something: the comparison means something"

    sae, cfg = load_dictionary({path.name: path.read_bytes() for path in tmp_path.iterdir()})

    code, reconstruction = sae.reconstruct(x)
    torch.testing.assert_close(_dense(code, D_SAE), expected_acts)
    torch.testing.assert_close(reconstruction, expected)
    torch.testing.assert_close(sae(x).reconstruction, expected)
    if normalize in ("constant_norm_rescale", "layer_norm"):
        assert isinstance(sae, InputNormalizedCoder)
        torch.testing.assert_close(sae.decode(code.acts, code.indices, x=x), expected)
        # The wrapper matters: the bare coder on raw activations is not what SAELens computes.
        assert not torch.allclose(_dense(sae.coder.encode(x), D_SAE), expected_acts, atol=1e-3)
    else:
        assert isinstance(sae, SparseCoder)
        torch.testing.assert_close(sae.decode(code.acts, code.indices), expected)
    assert (sae.d_in, sae.d_out, sae.n_latents) == (D_IN, D_IN, D_SAE)
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_IN)
    assert dictionary_hook_name(cfg) == "blocks.1.hook_resid_post"


def test_hook_name_is_read_from_metadata_or_the_top_level_of_older_files() -> None:
    assert dictionary_hook_name({"metadata": {"hook_name": "blocks.2.hook_mlp_out"}}) == "blocks.2.hook_mlp_out"
    assert dictionary_hook_name({"hook_name": "blocks.0.hook_resid_pre", "metadata": {}}) == "blocks.0.hook_resid_pre"
    assert dictionary_hook_name({"hook_point": "blocks.3.hook_resid_post"}) == "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match=r"^cfg.json names no hook: expected metadata.hook_name"):
        dictionary_hook_name({"metadata": {"model_name": "gpt2"}})


# --------------------------------------------------------------------------- our transcoder folders

TC_D_IN, TC_D_OUT, TC_SCALE, TC_TARGET_SCALE = 16, 10, 1.9, 0.7
# (training architecture, skip, d_out) -> (cfg.json architecture, SAELens class name)
SAELENS_TRANSCODERS = {
    ("relu_l1", False, TC_D_OUT): ("transcoder", "Transcoder"),
    ("relu_l1", True, TC_D_OUT): ("skip_transcoder", "SkipTranscoder"),
    ("jumprelu", False, TC_D_OUT): ("jumprelu_transcoder", "JumpReLUTranscoder"),
    ("jumprelu", True, TC_D_OUT): ("jumprelu_skip_transcoder", "JumpReLUSkipTranscoder"),
    ("batchtopk", False, TC_D_OUT): ("jumprelu_transcoder", "JumpReLUTranscoder"),
    ("batchtopk", True, TC_D_OUT): ("jumprelu_skip_transcoder", "JumpReLUSkipTranscoder"),
    ("topk", False, TC_D_IN): ("topk", "TopKSAE"),
}


def _our_transcoder(architecture: str, *, skip: bool, d_out: int, seed: int) -> SparseCoder:
    """One of our transcoders with every weight off its initial value, as after training."""
    from trainer.architectures import build_sae
    from trainer.config import SAEConfig

    cfg = SAEConfig(architecture=architecture, n_latents=D_SAE, k=K, skip_connection=skip, encoder_gemm="param")
    sae = build_sae(cfg, d_in=TC_D_IN, d_out=d_out, seed=seed, transcoder=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "log_threshold":
                param.uniform_(-2.0, 0.0, generator=generator)
            else:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    if architecture == "batchtopk":  # one training-mode pass estimates its threshold
        sae(torch.randn(64, TC_D_IN, generator=generator) * TC_SCALE, target=torch.zeros(64, d_out))
    return sae.eval()


def _write_transcoder(sae: SparseCoder, folder: Path) -> dict[str, bytes]:
    from trainer.dictionary import dictionary_files

    files = dictionary_files(
        sae, hookpoint="model.layers.1.mlp:input", hookpoint_out="model.layers.1.mlp", model_name="tiny",
        scale=TC_SCALE, target_scale=TC_TARGET_SCALE, extra_metadata={}, sparsity=None, eval_metrics={},
    )
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


@pytest.mark.parametrize(("architecture", "skip", "d_out"), list(SAELENS_TRANSCODERS))
@torch.no_grad()
def test_our_transcoder_folders_load_in_saelens_with_identical_outputs(
    tmp_path: Path, architecture: str, skip: bool, d_out: int
) -> None:
    from sae_lens import SAE

    seed = list(SAELENS_TRANSCODERS).index((architecture, skip, d_out))
    ours = _our_transcoder(architecture, skip=skip, d_out=d_out, seed=seed)
    files = _write_transcoder(ours, tmp_path)
    saved_as, class_name = SAELENS_TRANSCODERS[architecture, skip, d_out]
    theirs = SAE.load_from_disk(tmp_path)
    assert type(theirs).__name__ == class_name and theirs.cfg.architecture() == saved_as
    assert theirs.cfg.d_in == TC_D_IN and theirs.W_dec.shape == (D_SAE, d_out)
    x = torch.randn(60, TC_D_IN, generator=torch.Generator().manual_seed(50 + seed)) * 1.5
    expected = theirs(x)  # SkipTranscoder.forward adds its W_skip term
    expected_acts = theirs.encode(x)
    assert (expected_acts > 0).any() and (expected_acts == 0).any()
    loaded, cfg = load_dictionary(files)
    code, prediction = loaded.reconstruct(x)
    tight = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prediction, expected, **tight)
    torch.testing.assert_close(_dense(code, D_SAE), expected_acts, **tight)
    # ... and both are the trained model's prediction, rescaled to raw target units (up to the
    # fold's rounding: the scales are multiplied into the weights, not the activations).
    torch.testing.assert_close(expected, ours.reconstruct(x * TC_SCALE)[1] / TC_TARGET_SCALE)
    if skip:
        assert theirs.W_skip.shape == (d_out, TC_D_IN)
        torch.testing.assert_close(loaded.skip_output(x), x @ theirs.W_skip.T, **tight)
    assert cfg["metadata"]["hook_name_out"] == "model.layers.1.mlp"


@pytest.mark.parametrize("skip", [False, True])
@torch.no_grad()
def test_topk_transcoders_saelens_cannot_run_are_refused_there_and_load_in_ours(tmp_path: Path, skip: bool) -> None:
    from sae_lens import SAE

    ours = _our_transcoder("topk", skip=skip, d_out=TC_D_OUT, seed=30 + skip)
    files = _write_transcoder(ours, tmp_path)
    saved_as = "topk_skip_transcoder" if skip else "topk_transcoder"
    with pytest.raises(KeyError, match=saved_as):  # SAELens knows no such architecture
        SAE.load_from_disk(tmp_path)
    loaded, cfg = load_dictionary(files)
    assert cfg["architecture"] == saved_as and (cfg["d_out"], cfg["k"]) == (TC_D_OUT, K)
    x = torch.randn(60, TC_D_IN, generator=torch.Generator().manual_seed(31)) * 1.5
    expected = ours.reconstruct(x * TC_SCALE)[1] / TC_TARGET_SCALE
    torch.testing.assert_close(loaded.reconstruct(x)[1], expected)


# --------------------------------------------------------------------------- hook names

LAYER = 1
LLAMA_HOOKPOINTS = {
    f"blocks.{LAYER}.hook_resid_post": f"model.layers.{LAYER}",
    f"blocks.{LAYER + 1}.hook_resid_pre": f"model.layers.{LAYER}",
    "blocks.0.hook_resid_pre": "model.layers.0:input",
    f"blocks.{LAYER}.hook_resid_mid": f"model.layers.{LAYER}.post_attention_layernorm:input",
    f"blocks.{LAYER}.hook_mlp_in": f"model.layers.{LAYER}.post_attention_layernorm:input",
    f"blocks.{LAYER}.ln2.hook_normalized": f"model.layers.{LAYER}.mlp:input",
    f"blocks.{LAYER}.hook_attn_out": f"model.layers.{LAYER}.self_attn",
    f"blocks.{LAYER}.hook_mlp_out": f"model.layers.{LAYER}.mlp",
    f"blocks.{LAYER}.mlp.hook_post": f"model.layers.{LAYER}.mlp.down_proj:input",
}


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Path):
    return load_model(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))


def _forward_with_hooks(model, ids: Tensor, modules: dict[str, torch.nn.Module]) -> tuple[tuple, dict]:
    """hidden_states and, per named module, its input and output, from one plain forward."""
    seen: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module, args, kwargs, output) -> None:
            seen[f"{name}:input"] = (args[0] if args else kwargs["hidden_states"]).clone()
            seen[name] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    handles = [module.register_forward_hook(keep(name), with_kwargs=True) for name, module in modules.items()]
    try:
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return hidden, seen


@torch.no_grad()
def test_transformerlens_hook_names_capture_what_transformers_computes_on_llama(llama, tiny_model_dir) -> None:
    layer = llama.model.layers[LAYER]
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    hidden, seen = _forward_with_hooks(llama, ids, {"attn": layer.self_attn, "mlp": layer.mlp})
    resid_mid = hidden[LAYER] + seen["attn"]  # hidden_states[L] is layer L's input
    mlp_in = seen["mlp:input"]
    expected = {
        f"blocks.{LAYER}.hook_resid_post": hidden[LAYER + 1],
        f"blocks.{LAYER + 1}.hook_resid_pre": hidden[LAYER + 1],
        "blocks.0.hook_resid_pre": hidden[0],
        f"blocks.{LAYER}.hook_resid_mid": resid_mid,
        f"blocks.{LAYER}.hook_mlp_in": resid_mid,
        f"blocks.{LAYER}.ln2.hook_normalized": mlp_in,
        f"blocks.{LAYER}.hook_attn_out": seen["attn"],
        f"blocks.{LAYER}.hook_mlp_out": seen["mlp"],
        f"blocks.{LAYER}.mlp.hook_post": F.silu(mlp_in @ layer.mlp.gate_proj.weight.T) * (mlp_in @ layer.mlp.up_proj.weight.T),
    }
    torch.testing.assert_close(resid_mid + seen["mlp"], hidden[LAYER + 1])  # the hand-made resid_mid adds up
    skeleton = model_skeleton(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))
    for hook_name, hookpoint in LLAMA_HOOKPOINTS.items():
        assert hookpoint_for(hook_name, llama) == hookpoint, hook_name
        assert hookpoint_from_hook_name(hook_name, skeleton) == hookpoint, hook_name
        torch.testing.assert_close(ActivationHarvester(llama, hookpoint)(ids), expected[hook_name], msg=hook_name)


def test_our_hookpoints_pass_through_and_unknown_hooks_need_a_hookpoint(llama) -> None:
    assert hookpoint_for("model.layers.2", llama) == "model.layers.2"
    assert hookpoint_for("resid_post.2", llama) == "model.layers.2"
    assert hookpoint_for("mlp_in.1", llama) == "model.layers.1.mlp:input"
    assert hookpoint_for("model.layers.1.self_attn.o_proj:input", llama) == "model.layers.1.self_attn.o_proj:input"
    assert hookpoint_from_hook_name("hook_embed", llama) is None
    message = (
        "dictionary hook_name 'blocks.3.attn.hook_z' has no known hookpoint in LlamaForCausalLM: give --hookpoint "
        "(a module path or resid_post|attn_out|mlp_out|mlp_in.<layer>)"
    )
    with pytest.raises(ValueError) as raised:
        hookpoint_for("blocks.3.attn.hook_z", llama)
    assert str(raised.value) == message
    override = hookpoint_for("blocks.3.attn.hook_z", llama, override="model.layers.3.self_attn.o_proj:input")
    assert override == "model.layers.3.self_attn.o_proj:input"
    with pytest.raises(ValueError, match=r"^dictionary hook_name 'blocks.9.hook_resid_post': layer 9 out of range, "
                                         r"LlamaForCausalLM has 4 layers \(0..3\)$"):
        hookpoint_for("blocks.9.hook_resid_post", llama)


@torch.no_grad()
def test_gpt2_layout_maps_resid_pre_0_with_positions_and_its_conv1d_mlp() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    block = model.transformer.h[1]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    hidden, seen = _forward_with_hooks(model, ids, {"attn": block.attn, "ln_2": block.ln_2})
    expected = {
        "blocks.0.hook_resid_pre": ("transformer.h.0:input", hidden[0]),  # wte + wpe
        "blocks.1.hook_resid_mid": ("transformer.h.1.ln_2:input", hidden[1] + seen["attn"]),
        "blocks.1.mlp.hook_post": ("transformer.h.1.mlp.c_proj:input", block.mlp.act(block.mlp.c_fc(seen["ln_2"]))),
        "blocks.1.hook_mlp_out": ("transformer.h.1.mlp", None),
    }
    for hook_name, (hookpoint, tensor) in expected.items():
        assert hookpoint_for(hook_name, model) == hookpoint, hook_name
        if tensor is not None:
            torch.testing.assert_close(ActivationHarvester(model, hookpoint)(ids), tensor, msg=hook_name)
    # The embedding module alone misses the positions: it is not resid_pre of layer 0.
    assert not torch.allclose(model.transformer.wte(ids), hidden[0])
