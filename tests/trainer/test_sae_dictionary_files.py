"""Dictionary files: SAELens 6 layout, the scale fold, and validation on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from trainer.dictionary import dictionary_files, load_dictionary
from trainer.sae import TopKSAE

SCALE = 4.25


def _trained_like_sae() -> TopKSAE:
    sae = TopKSAE(24, 96, 6, seed=0)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.05 * torch.randn_like(param))
        sae.W_dec.mul_(1.7)  # raw decoder rows off unit norm, as after training
    return sae


def _files(sae: TopKSAE, **overrides) -> dict[str, bytes]:
    arguments = dict(
        hookpoint="model.layers.6",
        model_name="SmolLM2-135M",
        scale=SCALE,
        extra_metadata={"context_size": 256, "prepend_bos": True},
        sparsity=torch.linspace(0, 0.5, 96),
        eval_metrics={"fvu": 0.12, "l0": 6.0, "n_tokens": 4096, "cosine": float("nan")},
    )
    arguments.update(overrides)
    return dictionary_files(sae, **arguments)


def test_round_trip_acts_on_raw_activations_like_the_trained_model_on_scaled_ones() -> None:
    torch.manual_seed(0)
    sae = _trained_like_sae()
    x_raw = torch.randn(64, 24) * 3 + 1
    trained = sae(x_raw * SCALE)

    loaded, cfg = load_dictionary(_files(sae))
    out = loaded(x_raw)

    torch.testing.assert_close(out.latent_indices.sort(1).values, trained.latent_indices.sort(1).values)
    torch.testing.assert_close(out.latent_acts.sort(1).values, trained.latent_acts.sort(1).values)
    torch.testing.assert_close(out.reconstruction, trained.reconstruction / SCALE)
    assert cfg["d_in"] == 24 and cfg["d_sae"] == 96 and cfg["k"] == 6


def test_files_hold_the_saelens_topk_layout() -> None:
    files = _files(_trained_like_sae())
    assert set(files) == {"sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "eval.json"}
    cfg = json.loads(files["cfg.json"])
    # The fields of SAELens 6's TopKSAEConfig.to_dict() (sae_lens/saes/sae.py, topk_sae.py).
    assert set(cfg) == {
        "architecture", "d_in", "d_sae", "k", "rescale_acts_by_decoder_norm", "dtype", "device",
        "apply_b_dec_to_input", "normalize_activations", "reshape_activations", "metadata",
    }
    assert cfg["architecture"] == "topk"
    assert cfg["normalize_activations"] == "none"  # the scale is folded into the weights
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["dtype"] == "float32"
    metadata = cfg["metadata"]
    assert metadata["model_name"] == "SmolLM2-135M"
    assert metadata["hook_name"] == "model.layers.6"
    assert metadata["context_size"] == 256
    assert metadata["sae_lens_version"] >= "6"  # below 6.0 SAELens would migrate the config
    weights = load_safetensors(files["sae_weights.safetensors"])
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        "W_enc": (24, 96), "b_enc": (96,), "W_dec": (96, 24), "b_dec": (24,),
    }
    # Unit-norm rows in training space, divided by the folded scale.
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.full((96,), 1 / SCALE))
    sparsity = load_safetensors(files["sparsity.safetensors"])["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(torch.linspace(0, 0.5, 96) + 1e-10))
    assert json.loads(files["eval.json"]) == {"fvu": 0.12, "l0": 6.0, "n_tokens": 4096, "cosine": None}


def test_sparsity_file_is_omitted_without_frequencies() -> None:
    assert "sparsity.safetensors" not in _files(_trained_like_sae(), sparsity=None)


def test_config_that_does_not_match_the_weights_is_rejected() -> None:
    files = _files(_trained_like_sae())
    cfg = json.loads(files["cfg.json"])
    cfg["d_sae"] = 128
    files["cfg.json"] = json.dumps(cfg).encode()
    with pytest.raises(ValueError, match=r"W_enc shape \(24, 96\) but cfg.json d_in=24, d_sae=128 expects \(24, 128\)"):
        load_dictionary(files)


def test_weights_with_missing_or_extra_tensors_are_rejected() -> None:
    files = _files(_trained_like_sae())
    weights = load_safetensors(files["sae_weights.safetensors"])
    weights["threshold"] = torch.zeros(96)
    del weights["b_enc"]
    files["sae_weights.safetensors"] = save_safetensors(weights)
    with pytest.raises(ValueError, match=r"holds \['W_dec', 'W_enc', 'b_dec', 'threshold'\], expected"):
        load_dictionary(files)


def test_unsupported_config_values_are_rejected() -> None:
    files = _files(_trained_like_sae())
    cfg = json.loads(files["cfg.json"])
    cfg["normalize_activations"] = "expected_average_only_in"
    files["cfg.json"] = json.dumps(cfg).encode()
    with pytest.raises(ValueError, match="normalize_activations='expected_average_only_in' is not supported"):
        load_dictionary(files)


def test_metadata_cannot_override_the_named_arguments() -> None:
    with pytest.raises(ValueError, match=r"extra_metadata may not set \['hook_name'\]"):
        _files(_trained_like_sae(), extra_metadata={"hook_name": "other"})


def test_loads_in_saelens(tmp_path: Path) -> None:
    """Runs where SAELens is installed (the ``bench`` extra)."""
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    sae = _trained_like_sae()
    for name, data in _files(sae).items():
        (tmp_path / name).write_bytes(data)
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    x_raw = torch.randn(32, 24) * 3
    torch.testing.assert_close(loaded(x_raw), sae(x_raw * SCALE).reconstruction / SCALE)
