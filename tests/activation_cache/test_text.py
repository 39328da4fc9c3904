"""Text sources: .txt, .jsonl and Parquet files (or folders of them) give the same documents,
and a source that cannot be read is refused by name before any model loads."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.hooking import load_tokenizer, resolve_model_source
from activation_cache.text import check_source, excluded_token_ids, iter_documents, pack_sequences

TEXTS = ["The first document.", "A second one, with ünïcode.", "Third."]


def _write_all(folder):
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n\n")
    pq.write_table(pa.table({"body": TEXTS, "other": [1, 2, 3]}), folder / "b.parquet")
    (folder / "c.txt").write_text(TEXTS[0], encoding="utf-8")
    (folder / "ignored.csv").write_text("x")


def test_jsonl_parquet_and_txt_documents_in_a_fixed_order(tmp_path):
    _write_all(tmp_path / "data")
    documents = [text for _, text in iter_documents(str(tmp_path / "data"), "body")]
    assert documents == [*TEXTS, *TEXTS, TEXTS[0]]
    check_source(str(tmp_path / "data"), "body")


def test_packing_a_jsonl_file_equals_packing_the_same_text_files(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t * 20}) for t in TEXTS))
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(t * 20, encoding="utf-8")
    from_jsonl = pack_sequences(DataConfig(source=str(tmp_path / "docs.jsonl"), context_length=16, max_tokens=None), tokenizer)
    from_txt = pack_sequences(DataConfig(source=str(folder), context_length=16, max_tokens=None), tokenizer)
    assert (from_jsonl == from_txt).all() and len(from_jsonl) > 3


def test_unreadable_sources_are_refused_by_name(tmp_path):
    pq.write_table(pa.table({"content": TEXTS}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet: no column 'text' \(data.text_column\); it has \['content'\]"):
        check_source(str(tmp_path / "t.parquet"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not JSON"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))
    (tmp_path / "field.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"field.jsonl line 1: no string field 'text'"):
        check_source(str(tmp_path / "field.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x.csv'?: expected a .txt, .jsonl, .parquet file"):
        check_source(str(tmp_path / "x.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="folder holds no .txt, .jsonl, .parquet files"):
        check_source(str(empty))
    with pytest.raises(ValueError, match="data.text_column='' must name"):
        DataConfig(text_column="")


def test_excluded_token_ids_are_the_special_tokens_plus_the_configured_ones(tiny_model_dir):
    tokenizer = load_tokenizer(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))
    special = set(tokenizer.all_special_ids)
    assert excluded_token_ids(DataConfig(), tokenizer) == special
    assert excluded_token_ids(DataConfig(exclude_token_ids=[7, 9]), tokenizer) == special | {7, 9}
    assert excluded_token_ids(DataConfig(exclude_special_tokens=False, exclude_token_ids=[7]), tokenizer) == {7}
    with pytest.raises(ValueError, match=r"data.exclude_token_ids: 99999 is outside the tokenizer's vocabulary"):
        excluded_token_ids(DataConfig(exclude_token_ids=[99999]), tokenizer)
    with pytest.raises(ValueError, match=r"data.exclude_token_ids=\[-1\]: -1 is not a token id"):
        DataConfig(exclude_token_ids=[-1])
