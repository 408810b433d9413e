"""Other serving stacks read hadacore's checkpoints correctly or refuse them, never silently wrong.

A GPTQ checkpoint that needs an online rotation (``rotate="online"``/``"full"``: R4 before
down_proj) computes garbage in any loader that ignores the rotation. transformers reads
``model_type`` through ``AutoConfig`` before anything else, and so do GPTQModel (``load``
and ``from_quantized``), vLLM and SGLang (they build their config with transformers'
``AutoConfig``); vLLM, SGLang and GPTQModel then look ``quant_method`` up in their registries
and raise for an unknown one. So rotated checkpoints say ``model_type: "hadacore_llama"`` and
``quant_method: "hadacore"``; plain ones stay ``llama`` + ``gptq`` and load as GPTQ anywhere.
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import hadacore  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    root = tmp_path_factory.mktemp("serving")
    out = {}
    for rotate in ("none", "offline", "online", "full"):
        out[rotate] = root / rotate
        hadacore.convert(model, out[rotate], method="rtn", group_size=16, rotate=rotate)
    return out


@pytest.mark.parametrize("rotate", ["online", "full"])
def test_rotated_gptq_checkpoints_are_refused_by_transformers_loading_path(checkpoints, rotate):
    path = checkpoints[rotate]
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["quantization_config"]["quant_method"]) == ("hadacore_llama", "hadacore")
    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="model type `hadacore_llama` but Transformers does not recognize"):
            load(path)
    assert isinstance(hadacore.load(path), torch.nn.Module)  # hadacore reads it, rotation and all


@pytest.mark.parametrize("rotate", ["none", "offline"])
def test_plain_gptq_checkpoints_load_as_gptq(checkpoints, rotate):
    """No online rotation: a standard GPTQ checkpoint. transformers parses it as GPTQ and goes
    on to its GPTQ backend (GPTQModel through optimum), which is not installed here."""
    config = AutoConfig.from_pretrained(checkpoints[rotate])
    assert config.model_type == "llama" and config.quantization_config["quant_method"] == "gptq"
    try:
        AutoModelForCausalLM.from_pretrained(checkpoints[rotate])
    except ImportError as e:  # the GPTQ path, asking for its backend: the checkpoint was understood as GPTQ
        assert "GPTQ" in str(e) or "gptq" in str(e)


# --------------------------------------------------------------------------- foreign GPTQ layouts


def _rewrite(path, dest, *, config=None, tensors=None):
    """A copy of checkpoint ``path`` at ``dest`` with ``config(dict)`` / ``tensors(dict)`` applied."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(path, dest)
    cfg = json.loads((dest / "config.json").read_text())
    state = load_file(dest / "model.safetensors")
    if config:
        config(cfg)
    if tensors:
        tensors(state)
    (dest / "config.json").write_text(json.dumps(cfg))
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _logits(model, ids):
    from hadacore.quant.linear import reference_numerics

    with torch.no_grad(), reference_numerics(model):
        return model(ids).logits


def test_gptq_v2_zeros_and_autogptq_quantize_config(checkpoints, tmp_path):
    """GPTQModel's v2 zero convention (checkpoint_format gptq_v2: zeros stored as they are) and
    AutoGPTQ's quantize_config.json beside a config without quantization_config read as the
    same model; a v2 zero of 0, which v1 cannot store, is re-expressed exactly (mirrored group)."""
    from hadacore.formats.gptq import pack_rows, unpack_rows

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    want = _logits(hadacore.load(checkpoints["offline"]), ids)

    def to_v2(state):
        for k in [k for k in state if k.endswith(".qzeros")]:
            z = unpack_rows(state[k].t(), 4).t() + 1  # v1 stores zero - 1
            state[k] = pack_rows(z.t().contiguous(), 4).t().contiguous()

    v2 = _rewrite(checkpoints["offline"], tmp_path / "v2", tensors=to_v2,
                  config=lambda c: c["quantization_config"].update(checkpoint_format="gptq_v2"))
    torch.testing.assert_close(_logits(hadacore.load(v2), ids), want, rtol=0, atol=0)

    auto = _rewrite(checkpoints["offline"], tmp_path / "autogptq", config=lambda c: c.pop("quantization_config"))
    qc = json.loads((checkpoints["offline"] / "config.json").read_text())["quantization_config"]
    (auto / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"}))
    torch.testing.assert_close(_logits(hadacore.load(auto), ids), want, rtol=0, atol=0)

    def a_zero_of_zero(state):
        k = "model.layers.0.mlp.up_proj.qzeros"
        z = unpack_rows(state[k].t(), 4).t()
        z[0, 0] = 0
        state[k] = pack_rows(z.t().contiguous(), 4).t().contiguous()

    zero0 = _rewrite(v2, tmp_path / "v2zero", tensors=a_zero_of_zero)
    from hadacore.formats.gptq import dequantize_gptq
    from safetensors.torch import load_file

    stored = load_file(zero0 / "model.safetensors")
    want_w = dequantize_gptq(*(stored[f"model.layers.0.mlp.up_proj.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")),
                             16, checkpoint_format="gptq_v2", dtype=torch.float32)
    up = hadacore.load(zero0, dtype=torch.float32).model.layers[0].mlp.up_proj
    torch.testing.assert_close(up.dequantized_weight(), want_w, rtol=0, atol=0)
    assert bool((up.scales < 0).any())  # the mirrored group


def test_tied_embedding_checkpoint_without_lm_head(tmp_path):
    """save_pretrained omits lm_head.weight when the embeddings are tied: hadacore.load ties them."""
    from hadacore.quant.rtn import rtn_gptq_tensors
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         tie_word_embeddings=True)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("proj.weight") and k != "lm_head.weight"}
    for name, mod in model.named_modules():
        if name.endswith("proj"):
            state.update({f"{name}.{k}": v for k, v in rtn_gptq_tensors(mod.weight.detach(), 4, 16, True).items()})
    (tmp_path / "tied").mkdir()
    save_file(state, tmp_path / "tied" / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False, "sym": True,
                                  "checkpoint_format": "gptq"}
    (tmp_path / "tied" / "config.json").write_text(json.dumps(cfg))
    loaded = hadacore.load(tmp_path / "tied", dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 7))
    assert float((_logits(loaded, ids) - model(ids).logits).norm() / model(ids).logits.norm()) < 0.2


GPTQMODEL = Path(__file__).parent / "fixtures" / "gptqmodel"


@pytest.mark.parametrize("variant", sorted(p.name for p in GPTQMODEL.iterdir()))
def test_checkpoints_gptqmodel_wrote_give_its_own_logits(variant):
    """tests/fixtures/gptqmodel: real GPTQModel 7.6.0 checkpoints of a tiny Llama (desc_act on/off,
    sym/asym, v1/v2, tied embeddings, bf16, and zero points 0/15 that GPTQModel's v1 writes with a
    borrow), each with the logits GPTQModel's own CPU reader gives (reference.json: versions,
    reader, commands). Its reader computes in fp16 (bf16 for one variant); a wrong zero convention
    or a dropped g_idx moves the logits by 0.15-0.97."""
    path = GPTQMODEL / variant
    ref = json.loads((path / "reference.json").read_text())
    assert ref["gptqmodel_version"] == "7.6.0"
    model = hadacore.load(path, dtype=torch.float32)
    got = _logits(model, torch.tensor(ref["input_ids"]))
    tol = 1e-2 if "bf16" in variant else 5e-3
    assert float((got - torch.tensor(ref["logits"])).abs().max()) < tol
    if "tied" in variant:
        assert model.lm_head.weight is model.model.embed_tokens.weight
