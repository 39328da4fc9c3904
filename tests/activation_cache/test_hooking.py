"""Model loading, hookpoints, text packing and shard production on a tiny real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.hooking import (
    ActivationHarvester,
    MultiHarvester,
    describe_model,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.producing import (
    ShardTarget,
    produce_shard,
    produce_shards,
    split_units,
    unit_rows,
)
from activation_cache.reader import read_shard
from activation_cache.schema import ShardMeta
from activation_cache.store import LocalStore
from activation_cache.text import pack_sequences


def test_harvested_activations_equal_the_models_hidden_states(tiny_model_dir):
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = load_model(source)
    harvester = ActivationHarvester(model, "resid_post.1")
    assert harvester.hookpoint == "model.layers.1"
    ids = torch.randint(0, 300, (2, 12))
    acts = harvester(ids)
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output, so layer L's output is hidden_states[L + 1].
    torch.testing.assert_close(acts, hidden[2])


def test_block_shorthands_capture_attention_and_mlp_outputs_and_the_mlp_input(tiny_model_dir):
    model = load_model(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))
    layer = model.model.layers[1]
    captured = {}

    def keep(name):
        def hook(module, args, out) -> None:  # returns None: the forward is left unchanged
            captured[name] = (out[0] if isinstance(out, tuple) else out).clone()
        return hook

    handles = [
        layer.self_attn.register_forward_hook(keep("attn_out")),
        layer.mlp.register_forward_hook(keep("mlp_out")),
        layer.post_attention_layernorm.register_forward_hook(keep("mlp_in")),
    ]
    ids = torch.randint(3, 100, (2, 12))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    expected_paths = {"attn_out": "model.layers.1.self_attn", "mlp_out": "model.layers.1.mlp",
                      "mlp_in": "model.layers.1.mlp:input"}
    for kind, path in expected_paths.items():
        harvester = ActivationHarvester(model, f"{kind}.1")
        assert harvester.hookpoint == path
        torch.testing.assert_close(harvester(ids), captured[kind])
    with pytest.raises(ValueError, match=r"hookpoint 'model.layers.1.nope:input': no such module"):
        ActivationHarvester(model, "model.layers.1.nope:input")


def test_one_forward_captures_several_hookpoints_and_stops_after_the_deepest(tiny_model_dir):
    model = load_model(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))
    ids = torch.randint(3, 100, (2, 12))
    ran = []
    handle = model.model.layers[3].register_forward_hook(lambda *args: ran.append(3))
    harvester = MultiHarvester(model, ["resid_post.1", "mlp_in.2", "attn_out.0"])
    captured = harvester(ids)
    handle.remove()
    assert list(captured) == ["model.layers.1", "model.layers.2.mlp:input", "model.layers.0.self_attn"]
    assert not ran, "layer 3 comes after every hookpoint: it must not run"
    for hookpoint, acts in captured.items():
        torch.testing.assert_close(acts, ActivationHarvester(model, hookpoint)(ids))
    with pytest.raises(ValueError, match="name the same place twice"):
        MultiHarvester(model, ["resid_post.1", "model.layers.1"])


def test_a_device_map_placed_model_harvests_the_same_activations(tiny_model_dir):
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    ids = torch.randint(3, 100, (2, 12))
    plain = ActivationHarvester(load_model(source), "resid_post.1")(ids)
    placed_model = load_model(source, device_map="auto")  # on this CPU-only machine: all on the CPU
    assert {p.device.type for p in placed_model.parameters()} == {"cpu"}
    torch.testing.assert_close(ActivationHarvester(placed_model, "resid_post.1")(ids), plain)
    with pytest.raises(ValueError, match=r"model.device_map='gpu': expected null, 'auto'"):
        ModelConfig(device_map="gpu")


def test_describe_model_resolves_without_loading_weights(tiny_model_dir):
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert describe_model(source, ["resid_post.mid"]) == (["model.layers.2"], [32])
    assert describe_model(source, ["model.layers.3.mlp", "mlp_in.1"])[0] == ["model.layers.3.mlp", "model.layers.1.mlp:input"]
    with pytest.raises(ValueError, match=r"layer 9 out of range, model has 4 layers"):
        describe_model(source, ["resid_post.9"])
    with pytest.raises(ValueError, match=r"hookpoint 'blocks.2.hook_resid_post': no such module"):
        describe_model(source, ["blocks.2.hook_resid_post"])
    with pytest.raises(ValueError, match=r"hookpoints 'resid_post.2' and 'model.layers.2' both name model.layers.2"):
        describe_model(source, ["resid_post.2", "model.layers.2"])
    with pytest.raises(ValueError, match=r"model.hookpoints=\['mlp_out.1', 'mlp_out.1'\]: 'mlp_out.1' is listed twice"):
        ModelConfig(hookpoints=["mlp_out.1", "mlp_out.1"])


def test_each_hookpoint_gets_the_width_it_captures(tiny_model_dir):
    """A cache's d_model is what the hookpoint holds: the MLP's neurons at down_proj's input are
    intermediate_size wide, not the residual's width."""
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    names = ["resid_post.1", "model.layers.1.mlp.down_proj:input", "model.layers.0.mlp.up_proj",
             "model.embed_tokens", "mlp_in.2", "model.layers.2.self_attn.o_proj:input"]
    canonical, widths = describe_model(source, names)
    captured = MultiHarvester(load_model(source), canonical).harvest(torch.tensor([[1, 2, 3]]))
    assert widths == [captured[name].shape[-1] for name in canonical]
    assert widths[1] == widths[2] == 64 != widths[0] == 32


def test_gpt2_conv1d_widths_match_what_is_captured():
    from transformers import GPT2Config, GPT2LMHeadModel

    from activation_cache.hooking import hookpoint_width

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2, n_inner=40))
    names = ["transformer.h.0.mlp.c_proj:input", "transformer.h.0.mlp.c_fc", "transformer.h.1", "transformer.wte"]
    captured = MultiHarvester(model, names).harvest(torch.tensor([[1, 2, 3]]))
    modules = dict(model.named_modules())
    widths = [hookpoint_width(modules[n.removesuffix(":input")], n.endswith(":input"), 24) for n in names]
    assert widths == [captured[n].shape[-1] for n in names] == [40, 40, 24, 24]


def test_bad_model_paths_fail_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path)))


def test_packing_starts_every_sequence_with_bos(tiny_model_dir, tiny_corpus_dir):
    tokenizer = load_tokenizer(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))
    cfg = DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=320)
    tokens = pack_sequences(cfg, tokenizer)
    assert tokens.shape == (10, 32)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (tokens[:, 1:] != tokenizer.bos_token_id).all()


def test_non_utf8_text_is_refused_by_name(tmp_path, tiny_model_dir):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    tokenizer = load_tokenizer(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))
    with pytest.raises(ValueError, match=r"bad.txt: not UTF-8 text"):
        pack_sequences(DataConfig(source=str(tmp_path), context_length=8, max_tokens=None), tokenizer)


def test_produced_shard_excludes_special_tokens_and_keeps_provenance(tmp_path, tiny_model_dir, tiny_corpus_dir):
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokenizer = load_tokenizer(source)
    tokens = pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=16, max_tokens=160), tokenizer)
    units = split_units(tokens, 4)
    assert [u.shard_name for u in units] == [f"shards/unit-{i:06d}.arrow" for i in range(3)]
    harvester = ActivationHarvester(load_model(source), "resid_post.1")
    meta = ShardMeta(model="tiny", revision=source.revision, hookpoint="model.layers.1", d_model=32, dtype="float32", cache_key="k")
    store = LocalStore(tmp_path)
    result = produce_shard(units[1], harvester=harvester, store=store, meta=meta,
                           excluded_token_ids=frozenset(tokenizer.all_special_ids), batch_size=3)
    shard = read_shard(store, result.entry)
    assert result.entry.rows == 4 * 15, "BOS at position 0 of each sequence is excluded"
    assert set(shard.sequence_ids.tolist()) == {4, 5, 6, 7}
    assert 0 not in shard.positions
    np.testing.assert_array_equal(shard.token_ids, tokens[shard.sequence_ids, shard.positions])
    expected = harvester(torch.from_numpy(tokens[4:8]))[:, 1:].reshape(-1, 32)
    torch.testing.assert_close(shard.activations, expected)


def test_one_forward_pass_writes_a_shard_per_hookpoint(tmp_path, tiny_model_dir, tiny_corpus_dir):
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokenizer = load_tokenizer(source)
    tokens = pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=16, max_tokens=160), tokenizer)
    unit = split_units(tokens, 4)[1]
    model = load_model(source)
    harvester = MultiHarvester(model, ["resid_post.1", "mlp_out.2"])
    forwards = []
    model.model.embed_tokens.register_forward_hook(lambda *args: forwards.append(1))
    excluded = frozenset(tokenizer.all_special_ids)
    targets = {
        h: ShardTarget(LocalStore(tmp_path / h), ShardMeta(model="tiny", revision=source.revision, hookpoint=h,
                                                           d_model=32, dtype="float32", cache_key=h))
        for h in harvester.hookpoints
    }
    results = produce_shards(unit, harvester=harvester, targets=targets, excluded_token_ids=excluded, batch_size=4)
    assert len(forwards) == 1, "both hookpoints come from one forward pass"
    assert list(results) == ["model.layers.1", "model.layers.2.mlp"]
    assert {r.entry.rows for r in results.values()} == {unit_rows(unit, excluded)} == {4 * 15}
    ids = torch.from_numpy(unit.tokens)
    for hookpoint, result in results.items():
        shard = read_shard(targets[hookpoint].store, result.entry)
        assert shard.meta.hookpoint == hookpoint
        np.testing.assert_array_equal(shard.token_ids, unit.tokens[:, 1:].reshape(-1))
        expected = ActivationHarvester(model, hookpoint)(ids)[:, 1:].reshape(-1, 32)
        torch.testing.assert_close(shard.activations, expected)
    resid, mlp = (read_shard(targets[h].store, r.entry).activations for h, r in results.items())
    assert not torch.allclose(resid, mlp), "each cache holds its own hookpoint's activations"
