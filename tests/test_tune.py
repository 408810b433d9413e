"""End-to-end scale tuning (``tune=TuneOptions(steps=N)``): the training form computes the
QuantLinear exactly, tuning changes only the scales, and it lowers the quantized model's KL
and perplexity on a tiny Llama with planted outlier channels."""

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
from outlier_llama import BITS, GROUP, model, outlier_llama, text  # noqa: E402,F401 (fixtures)

import hadacore  # noqa: E402
from hadacore.checkpoint import load  # noqa: E402
from hadacore.convert import TuneOptions  # noqa: E402
from hadacore.convert.evaluate import perplexity  # noqa: E402
from hadacore.convert.tune import _TunedLinear  # noqa: E402
from hadacore.quant.linear import QuantLinear, reference_numerics  # noqa: E402
from hadacore.quant.rtn import rtn_gptq_tensors  # noqa: E402

TUNE = TuneOptions(steps=30, lr=1e-2, samples=32, seqlen=64, batch=4)


def _convert(model, out, text, **kw):
    return hadacore.convert(copy.deepcopy(model), out, bits=BITS, group_size=GROUP, calibration=text[:32],
                            rotate="full", dtype=torch.float32, force=True, **kw)


@pytest.fixture(scope="module")
def checkpoints(model, text, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    return _convert(model, root / "plain", text), _convert(model, root / "tuned", text, tune=TUNE)


@pytest.mark.parametrize("hadamard", [False, True])
def test_training_form_is_the_quantlinear(hadamard):
    """Before any step, codes * s[g_idx] (+ the online Hadamard) is the layer's reference forward."""
    g = torch.Generator().manual_seed(0)
    t = rtn_gptq_tensors(torch.randn(48, 64, generator=g), 4, 16, sym=False)
    t["g_idx"] = (torch.arange(64) // 16)[torch.randperm(64, generator=g)].to(torch.int32)  # act-order's shuffle
    layer = QuantLinear.from_tensors(t, group_size=16, bias=torch.randn(48, generator=g), online_hadamard=hadamard)
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(_TunedLinear(layer)(x), layer.reference(x), rtol=1e-5, atol=1e-5)


def test_tuning_changes_only_the_scales(checkpoints):
    from safetensors.torch import load_file

    plain, tuned = (load_file(p / "model.safetensors") for p in checkpoints)
    assert plain.keys() == tuned.keys()
    changed = {k for k in plain if not torch.equal(plain[k], tuned[k])}
    assert changed and all(k.endswith(".scales") for k in changed), sorted(changed)[:5]


def test_tuning_lowers_kl_and_perplexity(checkpoints, model, text):
    record = json.loads((checkpoints[1] / "config.json").read_text())["hadacore"]["scale_tuning"]
    assert record["options"]["steps"] == TUNE.steps
    assert record["held_out_kl"]["after"] < 0.9 * record["held_out_kl"]["before"], record
    held_out = text[32:]
    ppl = {}
    for path in checkpoints:
        q = load(path)
        with reference_numerics(q):
            ppl[path.name] = perplexity(q, held_out)
    with torch.no_grad():
        fp = perplexity(model, held_out)
    assert fp < ppl["tuned"] < ppl["plain"], (fp, ppl)


def test_no_tuning_by_default(checkpoints):
    hc = json.loads((checkpoints[0] / "config.json").read_text())["hadacore"]
    assert hc["scale_tuning"] is None


def test_tune_options_reject_bad_values():
    for bad in (dict(steps=-1), dict(lr=0), dict(samples=0), dict(seqlen=1), dict(batch=0)):
        with pytest.raises(ValueError):
            TuneOptions(**bad)
    with pytest.raises(TypeError):
        hadacore.convert(outlier_llama(), "/nonexistent/never", tune={"steps": 3})


def test_tuning_draws_more_calibration_and_gptq_keeps_its_samples(model, text):
    """Tuning gets its own calibration windows after GPTQ's: the converter draws enough for
    both, and GPTQ reads only the first ``samples`` of them (bit for bit)."""
    from hadacore.convert.pipeline import ConvertOptions, quantize_model

    opts = ConvertOptions(samples=8, seqlen=64, group_size=GROUP, bits=BITS, rotate="full",
                          tune=TuneOptions(steps=1, samples=24, seqlen=32))
    assert opts.calibration_windows() == 8 + 12  # GPTQ's 8, then 24 x 32 tokens = 12 windows of 64
    assert ConvertOptions(samples=8, seqlen=64).calibration_windows() == 8  # no tuning: GPTQ's own
    plain = ConvertOptions(samples=8, seqlen=64, group_size=GROUP, bits=BITS, rotate="full", dtype=torch.float32)
    few = quantize_model(copy.deepcopy(model), plain, text[:8]).model.state_dict()
    more = quantize_model(copy.deepcopy(model), plain, text[:12]).model.state_dict()
    assert few.keys() == more.keys() and all(torch.equal(few[k], more[k]) for k in few)


def test_provenance_says_which_windows_gptq_read(checkpoints):
    calibration = json.loads((checkpoints[1] / "config.json").read_text())["hadacore"]["calibration"]
    assert calibration["samples"] == 32 and calibration["gptq_samples"] == 32, calibration  # given 32 windows
