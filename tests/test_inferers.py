"""Tests of himix_monai.inferers: autocast inferer and fixed text-prompt inferer."""

from __future__ import annotations

import logging
import os
from collections import namedtuple

import pytest
import torch
from torch import nn

from himix_monai.inferers import AutocastInferer, TextPromptInferer
from himix_monai.transforms.text import TokenizeTextd

LOGGER = "himix_monai.inferers"
PROMPT = "Unilateral pulmonary infection, one infected area, lower left lung."
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "bilateral unilateral pulmonary infection , . one two infected area areas upper middle lower left right lung"
).split()


@pytest.fixture
def tiny_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(str(tmp_path))


class RecordingNet(nn.Module):
    """Tiny conv net that records what it receives and the dtype of its conv output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.calls: list[dict] = []

    def forward(self, image, input_ids=None, attention_mask=None, **kwargs):
        out = self.conv(image)
        self.calls.append(
            {
                "image": image,
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "kwargs": kwargs,
                "inner_dtype": out.dtype,
                "autocast": torch.is_autocast_enabled(image.device.type),
            }
        )
        return out


def test_bf16_autocast_on_cpu_returns_float32():
    net = RecordingNet()
    out = AutocastInferer(precision="bf16")(torch.rand(2, 1, 4, 4), net)
    assert net.calls[0]["autocast"] and net.calls[0]["inner_dtype"] == torch.bfloat16
    assert out.dtype == torch.float32 and out.shape == (2, 1, 4, 4)


def test_fp32_runs_without_autocast():
    net = RecordingNet()
    image = torch.rand(1, 1, 4, 4)
    out = AutocastInferer()(image, net)
    assert not net.calls[0]["autocast"] and net.calls[0]["inner_dtype"] == torch.float32
    assert torch.equal(out, net.conv(image))


def test_fp16_on_cpu_falls_back_to_bf16_with_one_warning(caplog):
    net = RecordingNet()
    inferer = AutocastInferer(precision="fp16")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            out = inferer(torch.rand(1, 1, 4, 4), net)
    assert net.calls[-1]["inner_dtype"] == torch.bfloat16 and out.dtype == torch.float32
    assert sum("falls back to bf16" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda():
    net = RecordingNet().cuda()
    out = AutocastInferer(precision="fp16")(torch.rand(1, 1, 4, 4, device="cuda"), net)
    assert net.calls[0]["inner_dtype"] == torch.float16 and out.dtype == torch.float32


def test_invalid_precision():
    with pytest.raises(ValueError, match="precision"):
        AutocastInferer(precision="int8")
    assert AutocastInferer(precision="BFloat16").dtype == torch.bfloat16


def test_extra_args_and_kwargs_are_passed():
    net = RecordingNet()
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)
    AutocastInferer(precision="bf16")(torch.rand(2, 1, 4, 4), net, ids, mask, extra="x")
    call = net.calls[0]
    assert call["input_ids"] is ids and call["attention_mask"] is mask and call["kwargs"] == {"extra": "x"}


def test_nested_outputs_are_cast_to_float32():
    Pair = namedtuple("Pair", ["logits", "index"])

    def net(x):
        y = x.to(torch.bfloat16)
        return {"main": y, "aux": [y, (y, Pair(y, torch.ones(1, dtype=torch.long)))]}

    out = AutocastInferer(precision="bf16")(torch.rand(1, 1, 2, 2), net)
    assert out["main"].dtype == torch.float32 and out["aux"][0].dtype == torch.float32
    inner = out["aux"][1]
    assert isinstance(inner, tuple) and inner[0].dtype == torch.float32
    assert isinstance(inner[1], Pair) and inner[1].logits.dtype == torch.float32 and inner[1].index.dtype == torch.long


def test_text_prompt_routes_tokens(tiny_tokenizer):
    net = RecordingNet()
    inferer = TextPromptInferer(text_prompt=PROMPT, tokenizer=tiny_tokenizer, max_length=16)
    image = torch.rand(3, 1, 4, 4)
    out = inferer(image, net)  # the MONAI Label call: image only
    expected = TokenizeTextd("text", tiny_tokenizer, max_length=16)({"text": PROMPT})
    call = net.calls[0]
    assert call["input_ids"].shape == (3, 16) and call["attention_mask"].shape == (3, 16)
    for b in range(3):
        assert torch.equal(call["input_ids"][b], expected["input_ids"])
        assert torch.equal(call["attention_mask"][b], expected["attention_mask"])
    assert call["input_ids"].device == image.device and call["image"] is image
    assert out.shape == (3, 1, 4, 4) and out.dtype == torch.float32
    assert [tiny_tokenizer.convert_ids_to_tokens(int(i)) for i in call["input_ids"][0, 1:4]] == [
        "unilateral",
        "pulmonary",
        "infection",
    ]


def test_text_prompt_is_tokenised_once(tiny_tokenizer):
    class CountingTokenizer:
        def __init__(self, tok):
            self.tok, self.calls = tok, 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.tok(*args, **kwargs)

    counting = CountingTokenizer(tiny_tokenizer)
    inferer = TextPromptInferer(text_prompt=PROMPT, tokenizer=counting)
    net = RecordingNet()
    for batch in (1, 2, 4):
        inferer(torch.rand(batch, 1, 4, 4), net)
    calls_after_first = counting.calls
    inferer(torch.rand(2, 1, 4, 4), net)
    assert counting.calls == calls_after_first
    assert [c["input_ids"].shape[0] for c in net.calls] == [1, 2, 4, 2]


def test_text_prompt_from_a_tokenizer_directory_with_autocast(tmp_path, tiny_tokenizer):
    directory = os.fspath(tmp_path / "tok")
    tiny_tokenizer.save_pretrained(directory)
    net = RecordingNet()
    out = TextPromptInferer(text_prompt=PROMPT, tokenizer=directory, precision="bf16")(torch.rand(2, 1, 4, 4), net)
    assert net.calls[0]["inner_dtype"] == torch.bfloat16 and out.dtype == torch.float32
    assert net.calls[0]["input_ids"].shape == (2, 24)


@pytest.mark.parametrize("prompt", [None, "", "   "])
def test_no_prompt_calls_the_network_without_text(prompt):
    net = RecordingNet()
    TextPromptInferer(text_prompt=prompt)(torch.rand(2, 1, 4, 4), net)
    assert net.calls[0]["input_ids"] is None and net.calls[0]["attention_mask"] is None


def test_prompt_with_caller_text_is_an_error(tiny_tokenizer):
    inferer = TextPromptInferer(text_prompt=PROMPT, tokenizer=tiny_tokenizer)
    ids = torch.ones(1, 24, dtype=torch.long)
    with pytest.raises(ValueError, match="AutocastInferer"):
        inferer(torch.rand(1, 1, 4, 4), RecordingNet(), ids, ids)


def test_prompt_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        TextPromptInferer(text_prompt=PROMPT)


def test_a_prompt_in_the_image_metadata_wins_per_item(tiny_tokenizer):
    """MONAI Label's route: each request's prompt travels in its image's metadata, never in the shared inferer."""
    from monai.data import MetaTensor

    other = "Bilateral pulmonary infection, two infected areas."
    inferer = TextPromptInferer(text_prompt=PROMPT, tokenizer=tiny_tokenizer, max_length=16)
    tokenize = TokenizeTextd("text", tiny_tokenizer, max_length=16)
    net = RecordingNet()
    single = MetaTensor(torch.rand(1, 1, 4, 4), meta={"text_prompt": other})
    batch = MetaTensor(torch.rand(2, 1, 4, 4), meta={"text_prompt": [other, PROMPT]})  # collated metadata
    inferer(single, net)
    inferer(batch, net)
    inferer(torch.rand(1, 1, 4, 4), net)  # no metadata: the fixed prompt
    assert torch.equal(net.calls[0]["input_ids"][0], tokenize({"text": other})["input_ids"])
    assert torch.equal(net.calls[1]["input_ids"][0], tokenize({"text": other})["input_ids"])
    assert torch.equal(net.calls[1]["input_ids"][1], tokenize({"text": PROMPT})["input_ids"])
    assert torch.equal(net.calls[2]["input_ids"][0], tokenize({"text": PROMPT})["input_ids"])
    assert inferer.text_prompt == PROMPT  # nothing of a request stays in the inferer


def test_a_metadata_prompt_needs_text_for_every_item_of_a_batch(tiny_tokenizer):
    from monai.data import MetaTensor

    inferer = TextPromptInferer(tokenizer=tiny_tokenizer)
    net = RecordingNet()
    inferer(MetaTensor(torch.rand(1, 1, 4, 4), meta={"text_prompt": "  "}), net)
    assert net.calls[0]["input_ids"] is None  # a blank prompt is no report
    with pytest.raises(ValueError, match="mixes images with and without"):
        inferer(MetaTensor(torch.rand(2, 1, 4, 4), meta={"text_prompt": [PROMPT, ""]}), net)
    with pytest.raises(TypeError, match="one string per batch item"):
        inferer(MetaTensor(torch.rand(2, 1, 4, 4), meta={"text_prompt": [PROMPT]}), net)
    with pytest.raises(TypeError, match="must be a string or None"):
        TextPromptInferer(text_prompt=42, tokenizer=tiny_tokenizer)
