"""MONAI Label's inference path through bundle/configs/inference.json, reproduced without installing MONAI Label.

:py:class:`MonaiLabelBundleInfer` follows monailabel 0.8.5 step by step (``tasks/infer/bundle.py``
``BundleInferTask``, ``tasks/infer/basic_infer.py`` ``BasicInferTask.__call__``, ``transform/post.py``
``Restored``, ``transform/writer.py`` ``Writer``/``write_itk``):

- the config is read with ``bundle_root`` overridden, the network is ``network_def`` with ``models/model.pt``
  loaded; input/output keys, labels (``channel_def`` keys, background dropped) and the dimension
  (``len(spatial_shape)``) come from ``metadata.json``; ``displayable_configs`` become the task's config;
- per request: the request is merged over that config, request values of ``displayable_configs`` are copied
  into the bundle config, which is parsed again; ``device`` is overridden; ``preprocessing`` runs on the image
  path only (``LoadImaged`` with ``image_only=False``), then ``inferer(image[None], network)`` under
  ``no_grad``; ``postprocessing`` runs without ``SaveImaged``, then ``Restored`` (resize to the image's
  ``spatial_shape`` if different; drop the channel only for predictions of more than three dimensions);
- the writer transposes the array before ITK writes it, so the returned picture is the map transposed.

The real server is checked by ``tests/integration/monailabel_e2e.py`` (not part of this suite).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai.bundle import ConfigItem, ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, Resize, SaveImaged

from himix_monai.transforms import AsLabelMapd
from tests.hostile_text import hostile_texts

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
PROMPT_A = "Unilateral pulmonary infection, one infected area, upper left lung."
PROMPT_B = "Bilateral pulmonary infection, three infected areas, lower left lung and lower right lung."
ROWS, COLUMNS = 40, 56  # not square, not the network size: a transposed or unrestored map shows


def restored_like_monailabel(d: dict, key: str = "pred", ref_image: str = "image") -> dict:
    """The shape handling of monailabel 0.8.5 ``Restored(keys=key, ref_image=ref_image)`` (has_channel=True)."""
    d = dict(d)
    image = d.get(ref_image)
    meta = image.meta if isinstance(image, MetaTensor) else d.get(f"{ref_image}_meta_dict", {})
    result = d[key]
    current_size = result.shape[1:]
    spatial_shape = meta.get("spatial_shape", current_size)
    spatial_size = spatial_shape[-len(current_size) :]
    if np.any(np.not_equal(current_size, spatial_size)):
        result = Resize(spatial_size=spatial_size, mode="nearest")(result, mode="nearest")
    d[key] = result if len(result.shape) <= 3 else result[0] if result.shape[0] == 1 else result
    return d


class MonaiLabelBundleInfer:
    """What monailabel 0.8.5's ``BundleInferTask`` does with a bundle folder (see the module docstring).

    ``overrides`` (a tiny network for the test) are applied right after the config is read.
    """

    def __init__(self, path: Path, overrides: dict) -> None:
        self.path = path
        self.parser = ConfigParser()
        self.parser.read_config(str(path / "configs" / "inference.json"))
        self.parser.config.update({"bundle_root": str(path)})  # BundleInferTask._load_bundle_config
        self.parser.update(overrides)
        self.parser.config["use_click"] = False
        metadata = json.loads((path / "configs" / "metadata.json").read_text())
        self.key_image, image = next(iter(metadata["network_data_format"]["inputs"].items()))
        self.key_pred, pred = next(iter(metadata["network_data_format"]["outputs"].items()))
        self.labels = {v.lower(): int(k) for k, v in pred.get("channel_def", {}).items() if v.lower() != "background"}
        self.dimension = len(image["spatial_shape"])
        self.network = self.parser.get_parsed_content("network_def", instantiate=True)
        checkpoint = torch.load(path / "models" / "model.pt", map_location="cpu", weights_only=True)
        self.network.load_state_dict(checkpoint.get("model", checkpoint), strict=True)
        self.network.eval()
        self.displayable_configs = self.parser.get_parsed_content("displayable_configs", instantiate=True)
        self.config = {"device": ["cpu"], "model_filename": ["model.pt"], **self.displayable_configs}

    def _update_device(self, device: str) -> None:
        self.parser.config.update({"device": device})
        if self.parser.ref_resolver.items.get("device"):
            self.parser.ref_resolver.items["device"] = ConfigItem(config=device, id="device")

    def __call__(self, request: dict) -> tuple[dict, object, torch.Tensor]:
        """Returns the data after ``Restored``, the inferer that ran and the logits it gave."""
        req = copy.deepcopy(self.config)
        req.update(request)
        req["device"] = "cpu"
        data = copy.deepcopy(req)
        data["image_path"] = req["image"]
        # pre_transforms
        self.parser["displayable_configs"].update({c: data[c] for c in self.displayable_configs})
        self.parser.parse()
        self._update_device(data["device"])
        pre = self.parser.get_parsed_content("preprocessing", instantiate=True)
        pre = list(pre.transforms) if isinstance(pre, Compose) else pre
        for t in pre:
            if isinstance(t, LoadImaged):
                t._loader.image_only = False
        for t in pre:
            data = t(data)
        # run_inferer
        inferer = self.parser.get_parsed_content("inferer", instantiate=True)
        with torch.no_grad():
            data[self.key_pred] = logits = inferer(data[self.key_image][None].to("cpu"), self.network)[0]
        # post_transforms: the bundle's postprocessing without SaveImaged, then Restored
        post = self.parser.get_parsed_content("postprocessing", instantiate=True)
        post = list(post.transforms) if isinstance(post, Compose) else post
        for t in post:
            if not isinstance(t, SaveImaged):
                data = t(data)
        return restored_like_monailabel(data, self.key_pred, self.key_image), inferer, logits


@pytest.fixture
def bundle(tmp_path, tiny_text_model_dir):
    """A bundle folder as MONAI Label sees it (configs + models/model.pt of a tiny, seeded HiMix)."""
    root = tmp_path / "model" / "himix"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    for name in ("inference.json", "metadata.json"):
        (root / "configs" / name).write_bytes((CONFIGS / name).read_bytes())
    overrides = {
        "image_encoder": "test_convnext",
        "network_def#num_heads": 4,
        "image_size": [64, 64],
        "text_encoder": tiny_text_model_dir,
    }
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.update(overrides)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def", instantiate=True)
    torch.save({"model": network.state_dict()}, root / "models" / "model.pt")
    return root, overrides


def _studies(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """A grey PNG picture and a 2-D NIfTI slice (MONAI layout), each with a bright blob, and the blob's mask in
    (rows, columns) of the displayed image."""
    folder.mkdir()
    rows, columns = np.mgrid[:ROWS, :COLUMNS]
    blob = (rows - 12) ** 2 + (columns - 40) ** 2 < 60
    Image.fromarray(np.where(blob, 200, 30).astype(np.uint8)).save(folder / "picture.png")
    nifti_blob = (rows - 25) ** 2 + (columns - 15) ** 2 < 50
    hu = np.where(nifti_blob, -400, -850).astype(np.int16)
    nib.save(nib.Nifti1Image(hu.T.copy(), np.diag([0.7, 0.7, 1.0, 1.0])), str(folder / "slice.nii.gz"))
    return {"picture": (folder / "picture.png", blob), "nifti": (folder / "slice.nii.gz", nifti_blob)}


def _prompt_of(input_ids: torch.Tensor, tokenizer_dir: str) -> str:
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(tokenizer_dir).decode(input_ids[0], skip_special_tokens=True)
    return "".join(text.split())


def test_monailabel_gets_a_2d_uint8_label_map_and_the_prompt_reaches_the_network(bundle, tmp_path, tiny_text_model_dir):
    root, overrides = bundle
    task = MonaiLabelBundleInfer(root, overrides)
    assert task.labels == {"lesion": 1} and task.dimension == 2  # what MONAI Label reads from metadata.json
    assert task.config["text_prompt"] == ""  # shown in /info/, sent back with every request

    calls: list[tuple] = []

    def record_and_outline_the_blob(module, args, output):
        """Keep the network's call and logits; return logits > 0 on the image's bright blob, a known answer."""
        calls.append((args, output.detach().clone()))
        image = args[0][:, :1]
        return image - image.mean()

    task.network.register_forward_hook(record_and_outline_the_blob)
    for kind, (path, blob) in _studies(tmp_path / "studies").items():
        outputs = {}
        for prompt in (PROMPT_A, PROMPT_B, None):
            calls.clear()
            request = {"model": "himix", "image": str(path)}
            if prompt is not None:
                request["text_prompt"] = prompt
            data, inferer, logits = task(request)

            label_map = data["pred"]
            image_shape = tuple(int(s) for s in data["image"].meta["spatial_shape"])
            assert image_shape == (COLUMNS, ROWS)  # MONAI's layout for both the picture and the NIfTI slice
            assert tuple(label_map.shape) == image_shape, kind
            assert label_map.dtype == torch.uint8, kind
            assert set(torch.unique(label_map).tolist()) == {0, *task.labels.values()}, kind
            # the writer transposes before ITK writes: the returned file shows the blob where the image has it
            written = np.asarray(label_map).transpose()
            assert written.shape == blob.shape == (ROWS, COLUMNS)
            assert np.logical_and(written, blob).sum() / np.logical_or(written, blob).sum() > 0.8, kind

            # the map is the bundle's own mask (what its SaveImaged and overlays use), in MONAI's layout
            mask = task.parser.get_parsed_content("mask_postprocessing")({**data, "pred": logits})["pred"]
            assert mask.shape[0] == 1
            expected = mask[0].T if kind == "picture" else mask[0]
            torch.testing.assert_close(label_map, expected.to(torch.uint8), rtol=0, atol=0)

            ((args, outputs[prompt]),) = calls
            assert inferer.text_prompt is None  # the request's prompt is data: it never enters the config
            if prompt is None:
                assert len(args) == 1  # no prompt: the image only
            else:
                assert len(args) == 3
                assert _prompt_of(args[1], tiny_text_model_dir) == "".join(prompt.lower().split())
        assert not torch.allclose(outputs[PROMPT_A], outputs[PROMPT_B])  # the prompt changes the network's answer
        assert not torch.allclose(outputs[PROMPT_A], outputs[None])


def test_as_label_map_layout_label_and_errors():
    mask = MetaTensor(torch.zeros(1, 3, 5), meta={"filename_or_obj": "a.png"})
    mask[0, 1, 4] = 1
    image = MetaTensor(torch.zeros(1, 3, 5), meta={"filename_or_obj": "a.png", "spatial_shape": np.array([5, 3])})
    out = AsLabelMapd("pred", label=2)({"pred": mask, "image": image})["pred"]
    assert out.dtype == torch.uint8 and out.shape == (5, 3) and out[4, 1] == 2 and int(out.sum()) == 2
    image.meta.update({"filename_or_obj": "a.nii.gz", "spatial_shape": np.array([3, 5])})
    out = AsLabelMapd("pred", dtype="int16")({"pred": mask, "image": image})["pred"]
    assert out.dtype == torch.int16 and out.shape == (3, 5) and out[1, 4] == 1
    with pytest.raises(ValueError, match=r"a.nii.gz has shape \(3, 5\), the image's spatial_shape is \(6, 5\)"):
        image.meta["spatial_shape"] = np.array([6, 5])
        AsLabelMapd("pred")({"pred": mask, "image": image})
    with pytest.raises(ValueError, match=r"one-channel 2-D mask \(1, H, W\), got \(2, 3, 5\)"):
        AsLabelMapd("pred")({"pred": torch.zeros(2, 3, 5), "image": image})
    with pytest.raises(ValueError, match="integer type"):
        AsLabelMapd("pred", dtype=np.float32)


# What MONAI Label 0.8.5's BundleInferTask builds from inference.json (tasks/infer/bundle.py BundleConstants), and
# the config keys a request writes before it parses the config again (displayable_configs values, device).
BUILT_BY_MONAI_LABEL = (
    "network_def",
    "preprocessing",
    "pre_transforms",
    "postprocessing",
    "post_transforms",
    "inferer",
    "detector",
    "detector_ops",
    "displayable_configs",
)
REQUEST_WRITABLE = ("displayable_configs", "device")


def references_reaching(parser: ConfigParser, roots: tuple[str, ...], targets: tuple[str, ...]) -> dict[str, str]:
    """Every id in ``targets`` (or below one) that the config items ``roots`` reference, directly or through other
    items, mapped to the root that reaches it. A referenced item is resolved, so a ``$``-value there is evaluated."""
    parser.resolve_macro_and_relative_ids()
    sep = "#"
    found: dict[str, str] = {}
    for root in roots:
        if root not in parser:
            continue
        seen: set[str] = set()
        todo = [root]
        while todo:
            item = todo.pop()
            if item in seen:
                continue
            seen.add(item)
            if item != root and any(item == t or item.startswith(t + sep) for t in targets):
                found.setdefault(item, root)
                continue
            refs = parser.ref_resolver.find_refs_in_config(parser[item], item)
            todo.extend(ref.replace("::", sep) for ref in refs)  # MONAI's internal id separator is "::"
    return found


def test_nothing_monai_label_builds_references_a_request_writable_key():
    """A request value that nothing references is stored but never evaluated (MONAI's parser is lazy)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    assert references_reaching(parser, BUILT_BY_MONAI_LABEL, REQUEST_WRITABLE) == {}
    assert parser["displayable_configs"] == {"text_prompt": ""}  # the option Slicer and OHIF show stays declared

    # the check sees a reference through another key, as the prompt once was routed (inferer -> text_prompt)
    parser["text_prompt"] = "@displayable_configs#text_prompt"
    parser["network_def"]["text_encoder_dtype"] = "$himix_monai.inferers.compute_dtype(@precision, @device)"
    assert references_reaching(parser, BUILT_BY_MONAI_LABEL, REQUEST_WRITABLE) == {
        "displayable_configs#text_prompt": "inferer",
        "device": "network_def",
    }




def test_hostile_prompts_are_read_as_plain_text(bundle, tmp_path, tiny_text_model_dir):
    """Each prompt reaches the network as the tokens of its own characters; nothing runs, nothing is read."""
    from himix_monai.transforms import TokenizeTextd

    root, overrides = bundle
    task = MonaiLabelBundleInfer(root, overrides)
    studies = _studies(tmp_path / "studies")
    tokenize = TokenizeTextd("text", tiny_text_model_dir, max_length=24)
    calls: list[tuple] = []
    task.network.register_forward_hook(lambda module, args, output: calls.append(args))
    marker = tmp_path / "marker"
    for prompt in hostile_texts(marker, root / "configs" / "inference.json"):
        calls.clear()
        data, inferer, _ = task({"model": "himix", "image": str(studies["picture"][0]), "text_prompt": prompt})
        assert not marker.exists(), prompt
        if prompt.startswith("$"):  # MONAI Label stored the code in the config: unreferenced, it never runs
            assert task.parser.config["displayable_configs"]["text_prompt"] == prompt
        ((image, input_ids, attention_mask),) = calls
        expected_ids, expected_mask = tokenize.tokenize(prompt)
        torch.testing.assert_close(input_ids[0], expected_ids, rtol=0, atol=0)
        torch.testing.assert_close(attention_mask[0], expected_mask, rtol=0, atol=0)
        assert data["pred"].dtype == torch.uint8


@pytest.mark.parametrize("prompt", [42, {"_target_": "pathlib.Path.touch"}, ["a", "b"]])
def test_a_prompt_that_is_not_text_is_refused_by_name(bundle, tmp_path, prompt):
    root, overrides = bundle
    task = MonaiLabelBundleInfer(root, overrides)
    studies = _studies(tmp_path / "studies")
    with pytest.raises(TypeError, match=r"text_prompt must be text \(the report as a string\), got "):
        task({"model": "himix", "image": str(studies["picture"][0]), "text_prompt": prompt})
