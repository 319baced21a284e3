"""The portable exports: ASRM's export form of the spectral filter, torch.export (``.pt2``) and ONNX (ONNX Runtime).

Each export is made once at batch 2, 64x64 (tiny network: ``test_convnext``, the tiny BERT of ``conftest.py``) and
compared with the eager network at other batch sizes and image sizes (dynamic axes) within ``atol = rtol = 1e-4``
(the TorchScript check's tolerance; the measured differences are about 3e-7).
"""

from __future__ import annotations

import pytest
import torch

from himix_monai.export import check_export, example_inputs, export_network, load_exported
from himix_monai.networks import HiMix
from himix_monai.networks.blocks import AdaptiveSpectrumRefinement, gaussian_spectrum_operator

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(7, 7), (8, 8), (2, 2), (14, 28), (5, 6)])
def test_asrm_matrix_form_equals_the_fft_in_value_and_gradient(size):
    """Fails if the export form of ASRM is not the FFT filter (odd, even and non-square sizes), for the output and
    for the gradients with respect to the input and to sigma."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    outputs, grads = {}, {}
    for form in ("fft", "matrix"):
        asrm = AdaptiveSpectrumRefinement(sigma_init=5.0, spectral_form=form)
        inp = x.clone().requires_grad_(True)
        out = asrm(inp)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outputs[form], grads[form] = out.detach(), (inp.grad, asrm.sigma.grad)
    torch.testing.assert_close(outputs["matrix"], outputs["fft"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["matrix"][0], grads["fft"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["matrix"][1], grads["fft"][1], rtol=1e-4, atol=1e-6)
    assert grads["fft"][1].abs() > 1e-3  # sigma's gradient is really compared


def test_asrm_uses_the_fft_eagerly_and_the_matrix_form_when_exported():
    asrm = AdaptiveSpectrumRefinement(sigma_init=3.0).eval()
    x = torch.randn(1, 4, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(asrm(x), x + asrm._refinement(x), rtol=0, atol=0)  # "auto": the FFT eagerly
        program = torch.export.export(asrm, (x,))
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    targets = [str(node.target) for graph in graphs for node in graph.nodes if node.op == "call_function"]
    assert not any("fft" in t for t in targets) and any("cos" in t for t in targets), targets
    with pytest.raises(ValueError, match="spectral_form"):
        AdaptiveSpectrumRefinement(spectral_form="dft")
    assert gaussian_spectrum_operator(5, torch.tensor(1.0)).shape == (5, 5)


@pytest.fixture(scope="module")
def tiny_network():
    from transformers import BertModel

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    bert = BertModel(tiny_bert_config())
    # the text cache on, as in the bundle: the export must leave it out and the eager network must keep it
    return HiMix(
        in_channels=1, text_encoder=bert, image_encoder="test_convnext", num_heads=4, text_length=24, text_cache_size=8
    ).eval()


def _other_inputs(net: HiMix) -> list[tuple[torch.Tensor, ...]]:
    cases = []
    for batch, size in ((3, (96, 64)), (1, (128, 160))):
        image, input_ids, attention_mask = example_inputs(net, size, in_channels=1, batch_size=batch)
        input_ids[0, :5] = torch.tensor([7, 8, 9, 10, 11])
        cases.append((image, input_ids, attention_mask))
    return cases


def test_torch_export_reproduces_the_eager_network(tmp_path, tiny_network):
    """Fails if the ExportedProgram saved with torch.export.save differs from the eager network for another batch
    size or image size (dynamic axes), loses its extra files, or exporting changed the eager network."""
    net = tiny_network
    path = tmp_path / "model.pt2"
    export_network(net, path, image_size=(64, 64), extra_files={"metadata.json": '{"a": 1}'})  # format from suffix
    extra = {"metadata.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    assert extra["metadata.json"] == '{"a": 1}'
    module = program.module()
    for inputs in _other_inputs(net):
        difference = check_export(net, module, inputs, **TOLERANCE)
        assert difference < 1e-4
    hits = net.text_encoder.cache_hits
    with torch.no_grad():
        net(*_other_inputs(net)[0])
    assert net.text_encoder.cache_hits > hits  # the eager network still uses its text cache
    assert all(stage.asrm.spectral_form == "auto" for stage in net.stages if stage.asrm is not None)


def test_onnx_export_reproduces_the_eager_network_in_onnx_runtime(tmp_path, tiny_network):
    """Fails if the ONNX file differs in ONNX Runtime from the eager network for another batch size or image
    size, has other input/output names, or loses the metadata."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    net = tiny_network
    path = tmp_path / "model.onnx"
    export_network(net, path, image_size=(64, 64), extra_files={"metadata.json": "{}"})
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["image", "input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["pred"]
    assert {p.key: p.value for p in model.metadata_props}.get("metadata.json") == "{}"
    assert not any(node.op_type == "DFT" for node in model.graph.node)
    module = load_exported(path)
    for inputs in _other_inputs(net):
        assert check_export(net, module, inputs, **TOLERANCE) < 1e-4
    with pytest.raises(ValueError, match="takes 3 inputs"):
        module(inputs[0])


def test_export_command_chooses_the_format_by_suffix_and_reports_the_difference(tmp_path, tiny_text_model_dir, capsys):
    """``python -m himix_monai.export --filepath model.pt2`` writes a torch.export program (no ``--format``), checked
    against the eager network, and prints the largest difference."""
    import json

    from himix_monai.export import main

    network_def = {
        "_target_": "himix_monai.networks.HiMix", "in_channels": 1, "image_encoder": "test_convnext",
        "text_encoder": tiny_text_model_dir, "num_heads": 4, "text_length": 8, "text_tokens": [6, 4, 3],
        "text_cache_size": 4,
    }  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"network_def": network_def, "image_size": [64, 64]}))
    torch.manual_seed(0)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config))
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    out = tmp_path / "model.pt2"
    assert main(["--config_file", str(config), "--ckpt_file", str(tmp_path / "model.pt"), "--filepath", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(torch_export, verified" in printed and "max abs difference" in printed
    assert isinstance(torch.export.load(str(out)), torch.export.ExportedProgram)
