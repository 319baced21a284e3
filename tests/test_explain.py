"""Word-to-region maps (himix_monai/explain.py, issue 16): a network whose weights make the answer known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from himix_monai.explain import WordMapSaver, explain, explain_stage_texts, group_words, save_word_maps
from himix_monai.networks import HiMix
from tests.test_bundle_evaluate_inference import CONFIGS, NETWORK_SIZE, demo_split, trained, workflow_run  # noqa: F401

# ``trained``: the tiny model trained once through train.json (shared with test_bundle_evaluate_inference.py)

SIZE = 256  # the coarsest stage runs on an 8x8 grid


def known_answer_network(text_model_dir: str, word_token: int) -> HiMix:
    """A tiny HiMix in which only token ``word_token`` matters, and only for the top half of the image.

    Coarsest stage: the token projection (Eq. 2) makes projected token 0 from input token ``word_token``
    alone and every other projected token zero (a null token: key 0, value 0). The cross-attention query is
    the 2-D position embedding alone; head 0 compares its ``cos(0.316 row)`` channel (minus 0.45) with channel 0
    of the projected tokens, sharply: the top four rows of the 8x8 grid attend to token 0, the bottom four to
    the null tokens (value 0, which the post-attention LayerNorm leaves at its bias, as when the word is
    absent). Only head 0 has values. The other stages ignore the text (beta_ca = 0); no stage self-attends
    (beta_sa = 0) and ASRM is off, so nothing mixes the rows globally: the word acts on the top half and the
    convolutions of the up blocks blur the boundary by a few pixels.
    """
    torch.manual_seed(0)
    net = HiMix(in_channels=1, image_encoder="test_convnext", text_encoder=text_model_dir, num_heads=4, use_asrm=False)
    net.eval()
    stage = net.stages[0]
    channels = stage.cross_attention.out_proj.out_features  # 64
    head_dim = channels // 4
    quarter = channels // 4
    with torch.no_grad():
        for other in net.stages:
            other.beta_self_attention.zero_()
        for other in net.stages[1:]:
            other.beta_cross_attention.zero_()
        projection = stage.text_projection
        projection.width_projection.weight.zero_()
        projection.width_projection.weight[:, 0] = 1.0  # u_l = t_l[0] * ones
        projection.width_projection.bias.zero_()
        projection.token_projection.weight.zero_()
        projection.token_projection.weight[0, word_token, 0] = 1.0
        projection.token_projection.bias.zero_()
        attention = stage.cross_attention
        stage.cross_attention_norm.weight.zero_()
        stage.cross_attention_norm.bias.zero_()  # query = position embedding
        scale = head_dim**-0.5
        for linear in (attention.to_q, attention.to_k, attention.to_v):
            linear.weight.zero_()
            linear.bias.zero_()
        # head 0, dim 0 <- cos(0.316 * row) - 0.45: > 0.13 on rows 0-3 (top half), < -0.14 on rows 4-7
        sharpness = 30.0 / (0.13 * scale)
        attention.to_q.weight[0, quarter + 2] = sharpness
        attention.to_q.bias[0] = -0.45 * sharpness
        attention.to_k.weight[0, 0] = 1.0  # head 0, dim 0 <- channel 0 of the projected token
        attention.to_v.weight[:head_dim] = torch.randn(head_dim, channels)
        attention.out_proj.bias.zero_()
    return net


def test_attribution_finds_the_region_the_weights_send_the_word_to(tiny_text_model_dir):
    word_token = 5
    net = known_answer_network(tiny_text_model_dir, word_token)
    texts = []
    for stage in net.stages:  # the stage inputs t_m: token 5 carries 1 in channel 0, the rest is noise
        t = torch.randn(1, 24, 32)
        t[0, word_token, 0] = 1.0
        texts.append(t)
    groups = [[1], [2, 3], [word_token], [7]]
    maps = explain_stage_texts(net, torch.rand(1, SIZE, SIZE), texts, groups, ["a", "b", "upper", "c"], chunk_size=5)

    upper = np.abs(maps.word_maps[2])
    assert upper.max() > 1e-3
    rows = upper.mean(axis=1)
    assert np.argmax(rows) < SIZE // 2
    assert rows[: SIZE // 2].sum() > 0.6 * rows.sum()
    assert upper[3 * SIZE // 4 :].max() < 1e-4 * upper.max()  # beyond the blur of the convolutions: nothing
    assert rows[: SIZE // 2].min() > 0.1 * rows.max()  # and the whole top half, not a spot
    for other in (0, 1, 3):  # words the projection ignores did nothing
        assert np.abs(maps.word_maps[other]).max() < 1e-5 * upper.max()
    # the word acts through the coarsest stage only, and it is all the report does there
    np.testing.assert_allclose(maps.word_stage_maps[2, 0], maps.word_maps[2], atol=1e-5 * upper.max())
    assert np.abs(maps.word_stage_maps[2, 1:]).max() < 1e-5 * upper.max()
    np.testing.assert_allclose(maps.stage_maps[0], maps.word_maps[2], atol=1e-5 * upper.max())
    assert maps.logits.shape == (SIZE, SIZE) and maps.mask.dtype == bool


def test_explain_merges_tokens_into_words_and_reproduces_the_forward(tiny_text_model_dir, tmp_path):
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(tiny_text_model_dir)
    text = "Bilateral pulmonary infections, upper left lung."
    encoded = tokenizer(text, max_length=24, padding="max_length", truncation=True, return_tensors="pt")
    ids, mask = encoded["input_ids"][0], encoded["attention_mask"][0]
    words, tokens = group_words(tokenizer, ids, mask, text)
    assert words == ["Bilateral", "pulmonary", "infections", ",", "upper", "left", "lung", "."]
    assert tokens[2] == [3, 4]  # "infection" + "##s"
    assert group_words(tokenizer, ids, mask)[0] == [w.lower() for w in words]  # from the ids alone
    with pytest.raises(ValueError, match="does not tokenise"):
        group_words(tokenizer, ids, mask, "lower right lung")

    torch.manual_seed(0)
    net = HiMix(in_channels=1, image_encoder="test_convnext", text_encoder=tiny_text_model_dir, num_heads=4).eval()
    image = torch.rand(1, 64, 64)
    maps = explain(net, image, ids, mask, tokenizer, text)
    with torch.no_grad():
        logits = net(image[None], ids[None], mask[None])[0, 0].numpy()
    np.testing.assert_allclose(maps.logits, logits, atol=1e-5)
    assert maps.word_maps.shape == (8, 64, 64) and maps.word_stage_maps.shape == (8, 3, 64, 64)
    assert maps.stage_maps.shape == (3, 64, 64)

    png, npz = save_word_maps(tmp_path, "case", image, maps)
    again = save_word_maps(tmp_path, "case", image, maps)  # never over an earlier output
    assert again == (tmp_path / "case_words_1.png", tmp_path / "case_words_1.npz")
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["word_maps"], maps.word_maps)
    assert not list(tmp_path.glob(".*tmp"))


def test_explaining_does_not_touch_ordinary_inference(tiny_text_model_dir):
    """The handler's network keeps its mode and weights; forward after explaining gives the same logits."""
    torch.manual_seed(0)
    net = HiMix(in_channels=1, image_encoder="test_convnext", text_encoder=tiny_text_model_dir, num_heads=4).train()
    ids = torch.tensor([[2, 5, 6, 3] + [0] * 20])
    mask = (ids > 0).long()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    explain(net, torch.rand(1, 64, 64), ids, mask, tiny_text_model_dir)
    assert net.training
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert WordMapSaver("unused", net, tiny_text_model_dir)._tokenizer is None  # lazy: free when not run


@pytest.mark.slow
def test_bundle_inference_explain_true_writes_word_maps(trained, tmp_path):
    """``inference.json --explain true`` on the demo test split of a tiny trained model: one grid + raw maps per
    image, words from the report; a second run adds new files next to the first ones."""
    from PIL import Image

    workflow_run(str(CONFIGS / "inference.json"), bundle_root=str(trained), output_dir=str(tmp_path), explain=True)
    items = demo_split(trained)
    stems = sorted(Path(item["image"]).name[: -len(".nii.gz")] for item in items)
    folder = tmp_path / "explanations"
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(f"{s}_words.png" for s in stems)
    for item in items:
        stem = Path(item["image"]).name[: -len(".nii.gz")]
        with np.load(folder / f"{stem}_words.npz") as data:
            meta = json.loads(str(data["meta"]))
            assert " ".join(meta["words"]).replace(" ,", ",").replace(" .", ".") in item["text"]
            assert data["word_maps"].shape == (len(meta["words"]), NETWORK_SIZE, NETWORK_SIZE)
            assert data["stage_maps"].shape == (3, NETWORK_SIZE, NETWORK_SIZE)
        grid = np.asarray(Image.open(folder / f"{stem}_words.png"))
        assert grid.ndim == 3 and grid.shape[1] > 5 * NETWORK_SIZE
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    # the masks of the first run are replaced only when asked (--overwrite true); the word maps never are
    workflow_run(str(CONFIGS / "inference.json"), bundle_root=str(trained), output_dir=str(tmp_path), explain=True,
                 overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in first} == first  # nothing overwritten
    assert sorted(p.name for p in folder.glob("*_words_1.png")) == sorted(f"{s}_words_1.png" for s in stems)
    # explain defaults to false: an ordinary run writes no explanations
    workflow_run(str(CONFIGS / "inference.json"), bundle_root=str(trained), output_dir=str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "explanations").exists()


def test_word_map_saver_takes_the_prompt_when_the_inferer_replaces_the_report(tiny_text_model_dir, tmp_path):
    """A ``text_prompt`` run: the batch items have no tokens; the words come from ``inferer.prompt_tokens()``."""
    from types import SimpleNamespace

    from monai.data import MetaTensor
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(tiny_text_model_dir)
    encoded = tokenizer("upper left lung", max_length=24, padding="max_length", truncation=True, return_tensors="pt")
    inferer = SimpleNamespace(prompt_tokens=lambda: (encoded["input_ids"], encoded["attention_mask"]))
    torch.manual_seed(0)
    net = HiMix(in_channels=1, image_encoder="test_convnext", text_encoder=tiny_text_model_dir, num_heads=4).eval()
    image = MetaTensor(torch.rand(1, 64, 64), meta={"filename_or_obj": "/data/case_7.nii.gz"})
    engine = SimpleNamespace(state=SimpleNamespace(batch=[{"image": image}], iteration=1))
    saver = WordMapSaver(tmp_path, net, tokenizer, inferer=inferer)
    saver(engine)
    assert [p.name for p in saver.written] == ["case_7_words.png", "case_7_words.npz"]
    with np.load(tmp_path / "case_7_words.npz") as data:
        assert json.loads(str(data["meta"]))["words"] == ["upper", "left", "lung"]
