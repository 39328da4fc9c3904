"""The command line refuses bad input with one line on stderr, before any work starts."""

from __future__ import annotations

import time

from cluster.cli import main as saeforge


def test_train_rejects_bad_config_before_starting_anything(capsys, tmp_path):
    start = time.perf_counter()
    code = saeforge(["train", "sae.k=0", f"cache.uri={tmp_path / 'store'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "saeforge train: error: sae.k=0 must be in [1, sae.n_latents=4608]"
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "store").exists(), "nothing may be written for a refused job"


def test_train_rejects_missing_text_and_model_paths(capsys, tmp_path):
    code = saeforge(["train", "data=text_files", f"data.source={tmp_path / 'missing'}", f"cache.uri={tmp_path}"])
    assert code == 2
    assert f"data.source='{tmp_path / 'missing'}': no such file or folder" in capsys.readouterr().err
    code = saeforge(["train", "model=local", f"model.name_or_path={tmp_path}", f"cache.uri={tmp_path}"])
    assert code == 2
    assert "no config.json (not a Hugging Face model directory)" in capsys.readouterr().err


def test_pull_refuses_a_folder_that_is_not_a_dictionary(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cfg.json").write_text("{}")
    code = saeforge(["pull", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert code == 2
    assert "no checksums.json (a dictionary still being written, or not one)" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_train_cfg_job_prints_the_resolved_config_and_starts_nothing(capsys):
    import yaml

    assert saeforge(["train", "--cfg", "job", "experiment=laptop", "sweep.k=[16,32]", "hookpoints=mid_layer"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sae"]["n_latents"] == 4096 and printed["sweep"]["k"] == [16, 32]
    assert printed["model"]["hookpoints"] == ["resid_post.mid", "attn_out.mid", "mlp_out.mid"]
    assert printed["deepspeed"]["zero_stage"] == 2 and printed["run"]["checkpoint_every_steps"] == 200
