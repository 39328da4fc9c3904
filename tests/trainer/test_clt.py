"""Cross-layer transcoders (trainer.clt): the prediction against a plain loop over layers written
here, causality across layers, the sparse kernels against their dense twins, training on a
synthetic CLT problem with a known sparse answer, the fold of the per-layer scales, the folder
(save, load, SAELens's refusal) and the bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from trainer.architectures import build_sae
from trainer.clt import CrossLayerTranscoder
from trainer.config import SAEConfig
from trainer.dictionary import dictionary_files, load_dictionary

L, D_IN, D_OUT, N, K = 3, 10, 8, 24, 3
INPUT_SCALES = (0.5, 2.0, 3.5)
TARGET_SCALES = (1.5, 0.25, 4.0)
MODES = [("jumprelu", None), ("topk", "layer"), ("topk", "all")]
INPUTS = [f"mlp_in.{layer}" for layer in range(L)]
TARGETS = [f"mlp_out.{layer}" for layer in range(L)]


def _clt(activation: str, clt_topk: str | None, *, seed: int = 0, kernel: str = "sparse") -> CrossLayerTranscoder:
    """A CLT with distinct per-layer scales and every weight off its initial value, as after training."""
    options = {"k": K, "clt_topk": clt_topk} if activation == "topk" else {}
    clt = CrossLayerTranscoder(
        L, D_IN, N, d_layer_out=D_OUT, activation=activation, seed=seed, kernel=kernel,
        input_scales=INPUT_SCALES, target_scales=TARGET_SCALES, **options,
    )
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, param in clt.named_parameters():
            if name == "log_threshold":
                param.uniform_(-1.5, 0.0, generator=generator)
            elif name.startswith("W_dec"):  # rows of several norms: the unit norm has work to do
                param.mul_(0.5 + torch.rand(param.shape[0], 1, 1, generator=generator))
            else:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return clt


def _inputs(n_tokens: int, seed: int) -> tuple[Tensor, Tensor]:
    """Raw (x, y) at each layer's own scale (the inverse of its normalisation factor)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, L, D_IN, generator=generator) / torch.tensor(INPUT_SCALES)[:, None]
    y = torch.randn(n_tokens, L, D_OUT, generator=generator) / torch.tensor(TARGET_SCALES)[:, None]
    return x.reshape(n_tokens, -1), y.reshape(n_tokens, -1)


def _loop_prediction(clt: CrossLayerTranscoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """The CLT written out layer by layer: (dense (B, L * N) features, raw (B, L * D_OUT) prediction)."""
    batch = x.shape[0]
    features = []
    for layer in range(L):
        x_l = x[:, layer * D_IN:(layer + 1) * D_IN] * INPUT_SCALES[layer]
        features.append(x_l @ clt.W_enc[layer] + clt.b_enc[layer])
    pre = torch.stack(features, dim=1)  # (B, L, N)
    if clt.activation == "jumprelu":
        threshold = clt.log_threshold.exp()
        acts = pre * (pre > threshold)
    elif clt.clt_topk == "layer":
        values, indices = pre.relu().topk(K, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, values)
    else:
        values, indices = pre.reshape(batch, -1).relu().topk(K * L, dim=-1)
        acts = torch.zeros(batch, L * N).scatter(-1, indices, values).view(batch, L, N)
    prediction = []
    for target in range(L):
        y_hat = clt.b_dec[target].expand(batch, -1).clone()
        for source in range(target + 1):
            rows = clt.W_dec[source]
            unit = rows / rows.reshape(N, -1).norm(dim=1)[:, None, None]
            y_hat = y_hat + acts[:, source] @ unit[:, target - source]
        prediction.append(y_hat / TARGET_SCALES[target])
    return acts.reshape(batch, -1), torch.cat(prediction, dim=1)


def _dense(acts: Tensor, indices: Tensor | None) -> Tensor:
    if indices is None:
        return acts
    return torch.zeros(acts.shape[0], L * N).scatter_add(1, indices, acts)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(("activation", "clt_topk"), MODES)
@torch.no_grad()
def test_prediction_equals_a_loop_over_layers(activation: str, clt_topk: str | None) -> None:
    clt = _clt(activation, clt_topk)
    x, y = _inputs(40, seed=1)
    expected_acts, expected = _loop_prediction(clt, x)
    code, prediction = clt.reconstruct(x)
    torch.testing.assert_close(_dense(code.acts, code.indices), expected_acts)
    torch.testing.assert_close(prediction, expected)
    fired = (expected_acts > 0).sum(dim=1).float()
    assert 0 < fired.mean() < L * N
    if activation == "topk" and clt_topk == "all":  # the budget moves between layers, token by token
        per_layer = (expected_acts.view(40, L, N) > 0).sum(dim=2)
        assert (per_layer != K).any() and (per_layer.sum(dim=1) == K * L).all()
    out = clt(x, target=y)
    torch.testing.assert_close(out.reconstruction, expected)
    torch.testing.assert_close(out.l0, fired.mean())
    # Each layer's FVU, by hand in raw units, and the loss in the normalised space (every layer's
    # error times its target scale).
    per_layer_fvu = torch.stack([
        (expected[:, t * D_OUT:(t + 1) * D_OUT] - y[:, t * D_OUT:(t + 1) * D_OUT]).pow(2).sum()
        / (y[:, t * D_OUT:(t + 1) * D_OUT] - y[:, t * D_OUT:(t + 1) * D_OUT].mean(0)).pow(2).sum()
        for t in range(L)
    ])
    torch.testing.assert_close(clt.layer_fvu(out.reconstruction, y), per_layer_fvu)
    scaled_error = ((expected - y).view(40, L, D_OUT) * torch.tensor(TARGET_SCALES)[:, None]).pow(2)
    if activation == "topk":
        torch.testing.assert_close(out.loss, scaled_error.mean(dim=(0, 2)).sum())
    else:
        l0_penalty = clt.sparsity_coefficient * fired.mean()
        torch.testing.assert_close(out.loss, scaled_error.sum(dim=(1, 2)).mean() + l0_penalty)


@pytest.mark.parametrize(("activation", "clt_topk"), MODES)
@torch.no_grad()
def test_a_layer_l_feature_writes_only_to_layers_from_l_on(activation: str, clt_topk: str | None) -> None:
    clt = _clt(activation, clt_topk)
    none = clt.decode(torch.zeros(1, L * N))
    for layer in range(L):
        latent = layer * N + 5
        one = torch.zeros(1, L * N)
        one[0, latent] = 2.0
        written = (clt.decode(one) - none).view(L, D_OUT).abs().sum(dim=1)
        assert (written[:layer] == 0).all() and (written[layer:] > 0).all()
        sparse = clt.decode(torch.tensor([[2.0]]), torch.tensor([[latent]]))
        torch.testing.assert_close(sparse, clt.decode(one))
    if clt_topk == "all":  # the selection across layers couples them: no causality to check
        return
    # Per layer: a token's layer-l input moves only the predictions of layers >= l.
    x, _ = _inputs(16, seed=2)
    base = clt.reconstruct(x)[1].view(16, L, D_OUT)
    for layer in range(L):
        moved = x.clone()
        moved[:, layer * D_IN:(layer + 1) * D_IN] += 3.0 * torch.randn(16, D_IN)
        change = (clt.reconstruct(moved)[1].view(16, L, D_OUT) - base).abs().sum(dim=(0, 2))
        assert (change[:layer] == 0).all() and change[layer:].sum() > 0


@pytest.mark.parametrize("clt_topk", ["layer", "all"])
def test_sparse_topk_kernels_agree_with_their_dense_twins(clt_topk: str) -> None:
    """Values and every gradient, AuxK included."""
    x, y = _inputs(32, seed=3)
    dead = torch.zeros(L * N, dtype=torch.bool)
    dead[::5] = True
    results = []
    for kernel in ("sparse", "dense"):
        clt = _clt("topk", clt_topk, kernel=kernel)
        out = clt(x, target=y, dead_mask=dead)
        out.loss.backward()
        assert out.aux_loss > 0
        results.append((out, {name: param.grad for name, param in clt.named_parameters()}))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast.reconstruction, slow.reconstruction)
    torch.testing.assert_close(fast.loss, slow.loss)
    assert fast_grads.keys() == slow_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], msg=name)


# --------------------------------------------------------------------------- training


class SyntheticCLT:
    """A CLT problem with a known sparse answer: layer l's true features (unit encoder directions)
    fire independently and write, through fixed random decoders, to layers l..L-1."""

    def __init__(self, *, n_true: int, mean_active: float, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(L, n_true, D_IN, generator=self.generator)
        self.encoders = directions / directions.norm(dim=-1, keepdim=True)
        self.decoders = [torch.randn(n_true, L - layer, D_OUT, generator=self.generator) / D_OUT**0.5
                         for layer in range(L)]
        self.n_true, self.p = n_true, mean_active / n_true

    def sample(self, n_tokens: int) -> tuple[Tensor, Tensor]:
        fires = torch.rand(n_tokens, L, self.n_true, generator=self.generator) < self.p
        magnitudes = 0.5 + torch.rand(n_tokens, L, self.n_true, generator=self.generator)
        coefficients = fires * magnitudes
        x = torch.einsum("bln,lnd->bld", coefficients, self.encoders)
        y = torch.zeros(n_tokens, L, D_OUT)
        for layer in range(L):
            y[:, layer:] += torch.einsum("bn,nmd->bmd", coefficients[:, layer], self.decoders[layer])
        # Layers at different norms: the CLT's own scales bring them to one footing.
        y = y / torch.tensor(TARGET_SCALES)[:, None] + 0.3
        return (x / torch.tensor(INPUT_SCALES)[:, None]).reshape(n_tokens, -1), y.reshape(n_tokens, -1)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(("architecture", "clt_topk"), [("topk", "layer"), ("jumprelu", "layer")])
def test_training_on_a_synthetic_clt_problem_explains_most_of_the_variance(architecture: str, clt_topk: str) -> None:
    torch.manual_seed(0)
    problem = SyntheticCLT(n_true=12, mean_active=1.5, seed=4)
    cfg = SAEConfig(architecture=architecture, n_latents=N, k=K, clt_topk=clt_topk, sparsity_coefficient=0.01)
    x, y = problem.sample(4096)
    input_scales = [float(D_IN**0.5 / x.view(-1, L, D_IN)[:, layer].norm(dim=1).mean()) for layer in range(L)]
    target_scales = [float(D_OUT**0.5 / y.view(-1, L, D_OUT)[:, layer].norm(dim=1).mean()) for layer in range(L)]
    clt = build_sae(cfg, d_in=D_IN, d_out=D_OUT, seed=1, layers=L, input_scales=input_scales,
                    target_scales=target_scales)
    assert isinstance(clt, CrossLayerTranscoder) and (clt.n_latents, clt.d_in, clt.d_out) == (L * N, L * D_IN, L * D_OUT)
    clt.init_b_dec(y, method="mean")
    x_test, y_test = problem.sample(2048)
    with torch.no_grad():  # b_dec alone: each layer's mean
        mean_fvu = clt.layer_fvu(clt.decode(torch.zeros(len(x_test), L * N)), y_test)
    optimizer = torch.optim.Adam(clt.parameters(), lr=2e-2)
    for _ in range(150):
        x, y = problem.sample(128)
        out = clt(x, target=y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = clt(x_test, target=y_test)
        layer_fvu = clt.layer_fvu(end.reconstruction, y_test)
    assert (mean_fvu > 0.99).all(), mean_fvu
    assert end.fvu < 0.25 and (layer_fvu < 0.35).all(), (end.fvu, layer_fvu)
    if architecture == "topk":
        assert L * K - 1 <= end.l0 <= L * K
    else:
        assert end.l0 < 0.4 * L * N


# --------------------------------------------------------------------------- the folder


def _files(clt: CrossLayerTranscoder) -> dict[str, bytes]:
    return dictionary_files(
        clt, hookpoint=INPUTS[0], hookpoint_out=TARGETS[0], hookpoints=INPUTS, hookpoints_out=TARGETS,
        model_name="tiny", scale=1.0, target_scale=1.0, extra_metadata={}, sparsity=torch.rand(L * N), eval_metrics={},
    )


@pytest.mark.parametrize(("activation", "clt_topk"), MODES)
@torch.no_grad()
def test_the_saved_folder_gives_the_trained_models_raw_prediction_and_round_trips(
    activation: str, clt_topk: str | None
) -> None:
    clt = _clt(activation, clt_topk)
    x, _ = _inputs(50, seed=5)
    expected_code, expected = clt.reconstruct(x)
    files = _files(clt)
    loaded, cfg = load_dictionary(files)
    assert isinstance(loaded, CrossLayerTranscoder)
    assert cfg["architecture"] == f"{activation}_clt" and (cfg["n_layers"], cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (
        L, D_IN, D_OUT, N)
    assert cfg["metadata"]["hook_names"] == INPUTS and cfg["metadata"]["hook_names_out"] == TARGETS
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == (INPUTS[0], TARGETS[0])
    assert loaded.input_scales.tolist() == [1.0] * L and loaded.target_scales.tolist() == [1.0] * L
    code, prediction = loaded.reconstruct(x)
    torch.testing.assert_close(prediction, expected)
    torch.testing.assert_close(_dense(code.acts, code.indices), _dense(expected_code.acts, expected_code.indices))
    # Saved again from the loaded model: the same outputs.
    again, _ = load_dictionary(_files(loaded))
    torch.testing.assert_close(again.reconstruct(x)[1], expected)


@torch.no_grad()
def test_saelens_refuses_a_clt_folder_by_name_and_load_dictionary_reads_it(tmp_path: Path) -> None:
    from sae_lens import SAE

    clt = _clt("jumprelu", None)
    files = _files(clt)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(KeyError, match="jumprelu_clt"):  # SAELens knows no such architecture
        SAE.load_from_disk(tmp_path)
    loaded, _ = load_dictionary({path.name: path.read_bytes() for path in tmp_path.iterdir()})
    x, _ = _inputs(8, seed=6)
    torch.testing.assert_close(loaded.reconstruct(x)[1], clt.reconstruct(x)[1])


# --------------------------------------------------------------------------- bad settings


def test_bad_clt_settings_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"sae.clt_topk='token': expected one of \['layer', 'all'\]"):
        SAEConfig(clt_topk="token")
    with pytest.raises(ValueError, match="sae.architecture='batchtopk' cannot be a cross-layer transcoder"):
        build_sae(SAEConfig(architecture="batchtopk"), d_in=D_IN, seed=0, layers=2)
    with pytest.raises(ValueError, match=r"target_scales shape \(2,\) must be \(n_layers=3,\)"):
        CrossLayerTranscoder(L, D_IN, N, target_scales=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"input_scales=\[1.0, 0.0, 1.0\] must be finite and positive"):
        CrossLayerTranscoder(L, D_IN, N, input_scales=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"k=30 must be in \[1, n_per_layer=24\]"):
        CrossLayerTranscoder(L, D_IN, N, activation="topk", k=30)
    files = _files(_clt("topk", "layer"))
    cfg = json.loads(files["cfg.json"])
    bad = {**files, "cfg.json": json.dumps({**cfg, "d_sae": 20}).encode()}
    with pytest.raises(ValueError, match=r"W_enc shape \(3, 10, 24\) but cfg.json n_layers=3, d_in=10, d_out=8, d_sae=20 "
                                         r"expects \(3, 10, 20\)"):
        load_dictionary(bad)
    bad = {**files, "cfg.json": json.dumps({**cfg, "clt_topk": "token"}).encode()}
    with pytest.raises(ValueError, match="cfg.json clt_topk='token': expected one of"):
        load_dictionary(bad)
