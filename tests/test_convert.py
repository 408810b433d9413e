"""The offline converter on tiny random Llama models: exact rotations, RTN/GPTQ round trips,
TP-aware act-order, atomic output, bad inputs. Everything built from configs (no downloads)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import hadacore  # noqa: E402
from hadacore.checkpoint import load  # noqa: E402
from hadacore.checkpoint import write as checkpoint  # noqa: E402
from hadacore.checkpoint.read import DictSource, read_gptq  # noqa: E402
from hadacore.convert.pipeline import ConvertOptions, quantize_model, rotate_model  # noqa: E402
from hadacore.formats.gptq import dequantize_gptq  # noqa: E402
from hadacore.quant.linear import QuantLinear  # noqa: E402
from hadacore.quant.act_order import is_sorted_by_group  # noqa: E402

HIDDEN, INTER, HEADS, KV, LAYERS, VOCAB = 64, 128, 4, 2, 2, 256  # head_dim 16


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random GQA Llama with tied embeddings and non-trivial norm gains."""
    kw = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV,
              num_hidden_layers=LAYERS, vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=128)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def logits(m, ids):
    return m(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------- rotations


@pytest.mark.parametrize("rotate,tp", [("none", 1), ("offline", 1), ("full", 1), ("full", 2), ("full", 4)])
def test_rotation_is_exact(model, tokens, rotate, tp):
    rotated = copy.deepcopy(model)
    rotate_model(rotated, rotate=rotate, seed=3, r4_block=INTER // tp)
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight  # untied
    assert not rotated.config.tie_word_embeddings
    for layer in rotated.model.layers:  # gains folded
        assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.post_attention_layernorm.weight == 1)
    if rotate != "none":
        assert rel(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight) > 0.5  # it did rotate
    want = logits(model, tokens)
    assert rel(logits(rotated, tokens), want) < 1e-5


def test_rotation_exact_for_qwen2_biases(tokens):
    """Qwen2: q/k/v biases (V's bias is rotated by R2 too)."""
    cfg = transformers.Qwen2Config(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                                   num_key_value_heads=KV, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                   tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(5)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    rotated = copy.deepcopy(m)
    rotate_model(rotated, rotate="full", seed=0)
    assert rel(logits(rotated, tokens), logits(m, tokens)) < 1e-5


# --------------------------------------------------------------------------- round trips


def _quantize(model, calib, **kw):
    opts = ConvertOptions(**{"group_size": 16, "samples": 8, "seqlen": 32, "dtype": torch.float32, **kw})
    return quantize_model(copy.deepcopy(model), opts, calib if opts.method == "gptq" else None, progress=False)


@pytest.mark.parametrize(
    "method,rotate,group_size,tp",
    [("rtn", "offline", 16, 1), ("gptq", "none", 16, 1), ("gptq", "offline", 32, 1), ("gptq", "full", 16, 2), ("gptq", "full", -1, 1)],
)
def test_convert_save_load_roundtrip(model, calib, tokens, tmp_path, method, rotate, group_size, tp):
    out = tmp_path / "out"
    qm = _quantize(model, calib, method=method, rotate=rotate, group_size=group_size, tp=tp)
    hadacore.convert(model, out, method=method, rotate=rotate, group_size=group_size, tp=tp, calibration=calib,
                     samples=8, seqlen=32, dtype=torch.float32)
    loaded = load(out)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 7 * LAYERS
    # the checkpoint holds exactly the in-memory model: bitwise equal logits
    assert torch.equal(logits(loaded, tokens), logits(qm.model, tokens))
    # and it is a 4-bit approximation of the fp model (random tiny weights: ~5-10% error)
    assert rel(logits(loaded, tokens), logits(model, tokens)) < 0.2
    config = json.loads((out / "config.json").read_text())
    qc, hc = config["quantization_config"], config["hadacore"]
    online = rotate == "full"  # other loaders must refuse a checkpoint that needs online rotations
    assert qc == {**qc, "quant_method": "hadacore" if online else "gptq", "bits": 4, "group_size": group_size,
                  "sym": True, "checkpoint_format": "gptq", "desc_act": method == "gptq"}
    assert config["tie_word_embeddings"] is False
    assert (config["model_type"], config["architectures"]) == (
        ("hadacore_llama", ["HadacoreLlamaForCausalLM"]) if online else ("llama", ["LlamaForCausalLM"]))
    assert hc["online"] == {"r4_down_proj": online, "r3_qk": False} and hc["base_model_type"] == "llama"
    assert hc["rotations"]["r1"] == (rotate != "none") and hc["tp_planned"] == tp
    assert hc["r4_block_size"] == (INTER // tp if rotate == "full" else None)
    down = loaded.model.layers[0].mlp.down_proj
    if rotate == "full":
        assert down.online_hadamard
        assert (down.hadamard_block not in (None, INTER)) == (tp > 1)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w_clip_option_reaches_the_quantizer_and_config(model, calib, tokens, tmp_path, method):
    out = tmp_path / "out"
    default = hadacore.convert(model, tmp_path / "default", method=method, group_size=16, calibration=calib,
                               samples=8, seqlen=32, dtype=torch.float32)
    flipped = ConvertOptions().w_clip is False
    hadacore.convert(model, out, method=method, group_size=16, calibration=calib, samples=8, seqlen=32,
                     dtype=torch.float32, w_clip=flipped)
    assert json.loads((out / "config.json").read_text())["hadacore"]["w_clip"] is flipped
    assert json.loads((default / "config.json").read_text())["hadacore"]["w_clip"] is (not flipped)
    a, b = load(out), load(default)
    scales = lambda m: m.model.layers[0].mlp.down_proj.scales
    assert not torch.equal(scales(a), scales(b))  # the option changed the grids
    qm = _quantize(model, calib, method=method, w_clip=flipped)
    assert torch.equal(logits(a, tokens), logits(qm.model, tokens))
    assert rel(logits(a, tokens), logits(model, tokens)) < 0.2


def test_asymmetric_checkpoint_compiled_matches_eager(model, calib, tokens, tmp_path):
    """sym=False: zeros other than 8 reach the config, the checkpoint and the compiled int4 path."""
    from hadacore.formats.gptq import unpack_gptq

    out = tmp_path / "asym"
    hadacore.convert(model, out, method="gptq", rotate="full", group_size=32, sym=False, calibration=calib,
                     samples=8, seqlen=32)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is False
    loaded = load(out, dtype=torch.float32).eval()
    zeros = unpack_gptq({k: getattr(loaded.model.layers[0].mlp.up_proj, k) for k in ("qweight", "qzeros", "scales")})[2]
    assert (zeros != 8).float().mean() > 0.5
    eager = logits(loaded, tokens)
    assert rel(eager, logits(model, tokens)) < 0.2
    torch._dynamo.reset()
    hadacore.reset_stats()
    with torch.no_grad():
        compiled = torch.compile(loaded.forward, backend="hadacore")(input_ids=tokens, use_cache=False).logits
    assert hadacore.stats()["linear_rewritten"] == 7 * LAYERS
    assert rel(compiled, eager) < 1e-2  # bf16 compute on the int4 kernel


@pytest.mark.parametrize("option", [{"sym": False}, {"static_groups": True}, {"gptaq": True}, {"gptaq": True, "gptaq_alpha": 1.0}])
def test_gptq_options_reach_the_quantizer_and_config(model, calib, tokens, tmp_path, option):
    out = tmp_path / "out"
    default = _quantize(model, calib, rotate="full")
    hadacore.convert(model, out, method="gptq", rotate="full", group_size=16, calibration=calib, samples=8, seqlen=32,
                     dtype=torch.float32, **option)
    config = json.loads((out / "config.json").read_text())
    qm = _quantize(model, calib, rotate="full", **option)
    assert config == json.loads(json.dumps(qm.checkpoint_config("in-memory LlamaForCausalLM", "token ids").to_json()))
    assert config["quantization_config"]["sym"] is option.get("sym", True)
    assert config["quantization_config"]["static_groups"] is option.get("static_groups", False)
    assert config["hadacore"]["gptaq"] == ({"alpha": option.get("gptaq_alpha", 0.25)} if "gptaq" in option else None)
    loaded = load(out)
    assert torch.equal(logits(loaded, tokens), logits(qm.model, tokens))
    assert not torch.equal(logits(loaded, tokens), logits(default.model, tokens))  # the option did something
    assert rel(logits(loaded, tokens), logits(model, tokens)) < 0.2
    if option.get("static_groups"):
        for m in loaded.modules():
            if isinstance(m, QuantLinear):
                assert torch.equal(m.g_idx.long(), torch.arange(m.in_features) // 16)


def test_gptaq_tracks_the_fp_model_better_on_a_deep_model(calib, tokens):
    """Errors compound over layers; GPTAQ corrects toward the fp model's activations."""
    deep = tiny_llama(seed=4, num_hidden_layers=6)
    ref = logits(deep, calib)
    err = lambda **kw: rel(logits(_quantize(deep, calib, rotate="full", group_size=32, **kw).model, calib), ref)
    plain, gptaq = err(), err(gptaq=True, gptaq_alpha=1.0)
    assert gptaq < plain, (gptaq, plain)


def test_gptq_beats_rtn_end_to_end(model, calib, tokens):
    ref = logits(model, tokens)
    e_rtn = rel(logits(_quantize(model, calib, method="rtn", rotate="offline").model, tokens), ref)
    e_gptq = rel(logits(_quantize(model, calib, method="gptq", rotate="offline").model, tokens), ref)
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_fp16_checkpoint_is_standard_gptq(model, tmp_path):
    out = tmp_path / "fp16"
    hadacore.convert(model, out, method="rtn", rotate="none", group_size=32)
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")
    q = state["model.layers.0.self_attn.q_proj.qweight"]
    assert q.dtype == torch.int32 and q.shape == (HIDDEN // 8, HEADS * 16)
    assert state["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert state["model.layers.0.self_attn.q_proj.qzeros"].shape == (HIDDEN // 32, HEADS * 16 // 8)
    assert state["lm_head.weight"].dtype == torch.float16
    assert load(out).model.embed_tokens.weight.dtype == torch.float16


# --------------------------------------------------------------------------- act-order and TP


def test_tp_aware_permutation_sorts_down_proj(model, calib, tokens):
    qm = _quantize(model, calib, method="gptq", rotate="offline", group_size=16)
    for layer in qm.model.model.layers:
        assert is_sorted_by_group(layer.mlp.down_proj.g_idx)  # no gather at any TP degree
        assert not is_sorted_by_group(layer.mlp.gate_proj.g_idx)  # column-parallel: plain act-order
        o = layer.self_attn.o_proj.g_idx.long().view(HEADS, 16)  # head-local: group == head
        assert torch.equal(o, torch.arange(HEADS)[:, None].expand(HEADS, 16))
    assert qm.plan["down_proj"].startswith("tp_aware_permutation")
    assert qm.plan["o_proj"] == "head_local"


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_reassemble_and_are_self_contained(calib, tp):
    model = tiny_llama(num_key_value_heads=4)  # tp=4 needs 4 KV heads
    qm = _quantize(model, calib, method="gptq", rotate="full", group_size=16, tp=tp)
    gs = 16
    for layer in qm.model.model.layers:
        down = layer.mlp.down_proj
        assert down.hadamard_block == INTER // tp
        t = {k: getattr(down, k) for k in ("qweight", "qzeros", "scales", "g_idx")}
        full_w = dequantize_gptq(*t.values(), gs, 4)
        shards = [read_gptq(DictSource({f"w.{k}": v for k, v in t.items()}), "w",
                            in_index=torch.arange(r * INTER // tp, (r + 1) * INTER // tp)) for r in range(tp)]
        per = INTER // tp
        for r, s in enumerate(shards):  # shard-local act-order: each shard owns exactly its groups
            assert s["scales"].shape[0] == per // gs
            w = dequantize_gptq(s["qweight"], s["qzeros"], s["scales"], s["g_idx"], gs, 4)
            assert torch.equal(w, full_w[:, r * per : (r + 1) * per])
        assert not is_sorted_by_group(t["g_idx"])  # act-order is really there, just shard-local
        for name in ("gate_proj", "up_proj"):  # column-parallel shards reassemble exactly
            lin = getattr(layer.mlp, name)
            t = {k: getattr(lin, k) for k in ("qweight", "qzeros", "scales", "g_idx")}
            n = t["scales"].shape[1]
            parts = [read_gptq(DictSource({f"w.{k}": v for k, v in t.items()}), "w",
                               out_index=torch.arange(r * n // tp, (r + 1) * n // tp)) for r in range(tp)]
            for k in ("qweight", "qzeros", "scales"):
                assert torch.equal(torch.cat([p[k] for p in parts], dim=1), t[k])


def test_down_proj_permutation_matches_unpermuted_function(model, calib, monkeypatch):
    """The converter's own TP-aware permutation changes the stored layout, not what the MLP
    computes: its GPTQ tensors before and after the fold give the same MLP, the fold really
    moved something, and the installed layers are the folded tensors."""
    import hadacore.convert.pipeline as pipeline

    folds = []
    real = pipeline.fold_into_gate_up

    def spy(gate, up, down, bits):
        out = real(gate, up, down, bits)
        folds.append(((gate, up, down), out))
        return out

    monkeypatch.setattr(pipeline, "fold_into_gate_up", spy)
    qm = _quantize(model, calib, method="gptq", rotate="none", group_size=16)
    assert len(folds) == LAYERS

    def deq(t):
        return dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 16, dtype=torch.float64)

    x = torch.randn(3, HIDDEN, dtype=torch.float64)

    def mlp(gate, up, down):
        return (torch.nn.functional.silu(x @ deq(gate).T) * (x @ deq(up).T)) @ deq(down).T

    for layer, (before, after) in zip(qm.model.model.layers, folds):
        assert not is_sorted_by_group(before[2]["g_idx"]) and is_sorted_by_group(after[2]["g_idx"])
        assert not torch.equal(deq(before[0]), deq(after[0]))  # gate's rows really moved
        torch.testing.assert_close(mlp(*after), mlp(*before), rtol=1e-10, atol=1e-10)
        for lin, t in zip((layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj), after):
            assert torch.equal(lin.qweight, t["qweight"]) and torch.equal(lin.g_idx, t["g_idx"])


# --------------------------------------------------------------------------- output handling


def test_sharded_save_with_index(model, tokens, tmp_path):
    out = tmp_path / "sharded"
    hadacore.convert(model, out, method="rtn", group_size=16, dtype=torch.float32, max_shard_bytes=40_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    single = tmp_path / "single"
    hadacore.convert(model, single, method="rtn", group_size=16, dtype=torch.float32)
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    assert torch.equal(logits(load(out), tokens), logits(load(single), tokens))


def test_refuses_to_overwrite_without_force(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="force"):
        hadacore.convert(model, out, method="rtn", group_size=16)
    assert (out / "keep.txt").exists()
    hadacore.convert(model, out, method="rtn", group_size=16, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left


def test_interrupted_conversion_leaves_no_output(model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = checkpoint.write_safetensors

    def fail_midway(state, directory, **kw):
        real(dict(list(state.items())[:3]), directory, **kw)  # a partial file is on disk...
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint, "write_safetensors", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        hadacore.convert(model, out, method="rtn", group_size=16)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # ...and the temporary directory is gone too


def test_a_directory_made_at_out_during_a_conversion_survives(model, tmp_path, monkeypatch):
    """Issue 13.1: without --force the final step never replaces anything; the error says
    where the finished checkpoint was left, and it is whole."""
    import hadacore.convert.pipeline as pipeline

    out = tmp_path / "race2"
    real = pipeline.quantize_model

    def user_mkdirs_meanwhile(*a, **kw):
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "quantize_model", user_mkdirs_meanwhile)
    with pytest.raises(FileExistsError, match=r"appeared while converting.*finished checkpoint is at (\S+race2\.converted-\w+)") as e:
        hadacore.convert(model, out, method="rtn", group_size=16, dtype=torch.float32)
    assert (out / "notes.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    kept = tmp_path / e.value.args[0].split("finished checkpoint is at ")[1].split(":")[0].rsplit("/", 1)[1]
    assert kept.is_dir() and isinstance(load(kept), torch.nn.Module)


def test_cli_reports_expected_failures_in_one_line_naming_the_file(model, tmp_path, capsys):
    from hadacore.convert.cli import main

    src = tmp_path / "hf"
    model.save_pretrained(src)
    capsys.readouterr()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    assert main([str(src), str(blocker / "out"), "--method", "rtn", "--group-size", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hadacore-convert: error: ") and str(blocker) in err[0], err
    (src / "config.json").write_text("{ not json")
    assert main([str(src), str(tmp_path / "o"), "--method", "rtn", "--group-size", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0], err
    assert not (tmp_path / "o").exists()


def test_refuses_to_replace_the_source_model(model, tmp_path):
    src = tmp_path / "hf"
    model.save_pretrained(src)
    with pytest.raises(ValueError, match="is the source model"):
        hadacore.convert(src, src, method="rtn", group_size=16, force=True)
    with pytest.raises(ValueError, match="holds it"):
        hadacore.convert(src, tmp_path, method="rtn", group_size=16, force=True)
    assert (src / "config.json").exists()


def test_non_finite_source_weights_are_named_before_any_work(model, tmp_path):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.embed_tokens.weight[3, 1] = float("inf")
        bad.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    for method in ("rtn", "gptq"):
        with pytest.raises(ValueError, match=r"non-finite values \(NaN or Inf\) in model\.embed_tokens\.weight \(1 of "
                                             r"\d+\), model\.layers\.1\.mlp\.up_proj\.weight"):
            hadacore.convert(bad, tmp_path / "o", method=method, group_size=16,
                             calibration=torch.randint(0, VOCAB, (2, 16)))
    assert not (tmp_path / "o").exists()


def test_load_rejects_bad_g_idx_naming_the_layer_and_range(model, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "o"
    hadacore.convert(model, out, method="rtn", group_size=16, dtype=torch.float32)
    state = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.g_idx"
    for bad, match in ((-1, r"g_idx has values in \[-1, \d+\]; they must lie in \[0, 8\)"),
                       (8, r"g_idx has values in \[0, 8\]; they must lie in \[0, 8\)")):
        g = state[name].clone()
        g[5] = bad
        save_file({**state, name: g}, out / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: " + match):
            load(out)
    (out / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load(out)


@pytest.mark.parametrize("edit", ["drop_hadacore_block", "plain_gptq_config", "r4_block_size"])
def test_load_refuses_a_config_that_disagrees_with_its_tensors(model, calib, tmp_path, edit):
    """A rotate=full checkpoint whose config lost or changed its online rotation would run
    another model (0.26 off): the tensors carry the contract too, and loading fails."""
    out = tmp_path / "o"
    hadacore.convert(model, out, method="rtn", rotate="full", group_size=16, tp=2, dtype=torch.float32)
    load(out)  # as written: fine
    f = out / "config.json"
    config = json.loads(f.read_text())
    if edit == "drop_hadacore_block":
        del config["hadacore"]
    elif edit == "plain_gptq_config":  # made to look like a plain GPTQ checkpoint
        del config["hadacore"]
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
        config["quantization_config"]["quant_method"] = "gptq"
    else:
        config["hadacore"]["r4_block_size"] = INTER
    f.write_text(json.dumps(config))
    match = {"drop_hadacore_block": "disagree with the online rotations it declares",
             "plain_gptq_config": "config.json and the tensors .* disagree",
             "r4_block_size": "config.json and the tensors .* disagree"}[edit]
    with pytest.raises(ValueError, match=match):
        load(out)


# --------------------------------------------------------------------------- bad inputs


def test_rejects_unsupported_models(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Llama-family.*llama, mistral, qwen2"):
        hadacore.convert(gpt2, tmp_path / "o", method="rtn")
    with pytest.raises(TypeError, match="path or an nn.Module"):
        hadacore.convert(42, tmp_path / "o", method="rtn")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hadacore.convert(tmp_path / "nothing", tmp_path / "o", method="rtn")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="cannot read"):
        hadacore.convert(tmp_path / "notes.txt", tmp_path / "o", method="rtn")


def test_rejects_unsupported_hadamard_size(tmp_path):
    m = tiny_llama(hidden_size=184, num_attention_heads=4, num_key_value_heads=4)  # 184 = 23 * 8: no construction
    with pytest.raises(ValueError, match=r"hidden size 184.*nearest supported: 180 or 192"):
        hadacore.convert(m, tmp_path / "o", method="rtn", group_size=8)
    hadacore.convert(m, tmp_path / "o", method="rtn", group_size=8, rotate="none")  # fine without rotation


def test_rejects_group_size_that_does_not_divide(model, tmp_path):
    with pytest.raises(ValueError, match=r"group size 48 does not divide the input size 64 of q_proj.*\[32, 64, -1\]"):
        hadacore.convert(model, tmp_path / "o", method="rtn", group_size=48)
    m = tiny_llama(intermediate_size=96)  # down_proj shard of 48 columns at tp=2
    with pytest.raises(ValueError, match=r"group size 32 does not divide the input size 48 of down_proj \(per TP shard\)"):
        hadacore.convert(m, tmp_path / "o", method="rtn", group_size=32, tp=2)


def test_rejects_missing_and_corrupt_shards(model, tmp_path):
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="100KB")
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) > 1
    shards[-1].rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="missing weight shard"):
        hadacore.convert(src, tmp_path / "o", method="rtn", group_size=16)
    (tmp_path / "moved").rename(shards[-1])
    shards[0].write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt safetensors shard"):
        hadacore.convert(src, tmp_path / "o", method="rtn", group_size=16)
    assert not (tmp_path / "o").exists()


def test_gptq_needs_tokens_without_tokenizer(model, tmp_path):
    with pytest.raises(ValueError, match="LongTensor"):
        hadacore.convert(model, tmp_path / "o", calibration=["some text"], group_size=16)
    with pytest.raises(ValueError, match="LongTensor"):
        hadacore.convert(model, tmp_path / "o", calibration=torch.zeros(4, 8), group_size=16)


# --------------------------------------------------------------------------- entry points


def test_cli_convert_from_hf_directory(model, tokens, tmp_path):
    from hadacore.convert.cli import main

    src = tmp_path / "hf"
    model.save_pretrained(src)
    out = tmp_path / "q"
    assert main([str(src), str(out), "--method", "rtn", "--group-size", "16", "--rotate", "full", "--dtype", "float32"]) == 0
    assert main([str(src), str(out), "--method", "rtn", "--group-size", "16"]) == 2  # exists, no --force
    clip = tmp_path / "clip"
    assert main([str(src), str(clip), "--method", "rtn", "--group-size", "16", "--w-clip", "--dtype", "float32"]) == 0
    assert main([str(src), str(tmp_path / "noclip"), "--method", "rtn", "--group-size", "16", "--no-w-clip", "--dtype", "float32"]) == 0
    assert json.loads((clip / "config.json").read_text())["hadacore"]["w_clip"] is True
    assert json.loads((tmp_path / "noclip" / "config.json").read_text())["hadacore"]["w_clip"] is False
    assert rel(logits(load(out), tokens), logits(model, tokens)) < 0.2
    # GPTQ flags (the HF directory has no tokenizer: rtn keeps it fast; the flags still parse and reach the config)
    asym = tmp_path / "asym"
    assert main([str(src), str(asym), "--method", "rtn", "--group-size", "16", "--no-sym", "--dtype", "float32"]) == 0
    assert json.loads((asym / "config.json").read_text())["quantization_config"]["sym"] is False
    assert main([str(src), str(tmp_path / "bad"), "--method", "rtn", "--gptaq"]) == 2  # a GPTQ-only option
    assert main([str(src), str(tmp_path / "bad"), "--percdamp", "1.5"]) == 2


def test_wiki_calibration_text_is_disjoint_from_the_evaluation_text():
    pytest.importorskip("gensim")
    from hadacore import data
    from hadacore.convert.pipeline import _describe_calibration

    wiki, held_out = data.wiki_calibration_text(), data.eval_text()
    assert len(wiki) > 5 * len(held_out)  # 2.6 MB vs 0.44 MB
    paragraphs = [p for p in held_out.split("\n\n") if len(p) > 100]
    assert len(paragraphs) > 50 and not any(p in wiki for p in paragraphs)
    assert data.CALIBRATION_SOURCES["lee"]() == data.calibration_text()
    assert _describe_calibration("wiki") == "packaged:wiki" and _describe_calibration(None) == "packaged:lee"
    assert _describe_calibration(torch.zeros(1, 2, dtype=torch.long)) == "token ids"


def test_import_hadacore_does_not_import_transformers():
    code = "import sys, hadacore; assert 'transformers' not in sys.modules; assert callable(hadacore.convert); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_load_checks_its_tp_arguments(tmp_path, model):
    out = tmp_path / "o"
    hadacore.convert(model, out, method="rtn", group_size=16)
    with pytest.raises(ValueError, match="tp_rank"):
        load(out, tp_rank=1)
    with pytest.raises(RuntimeError, match="initialised default process group"):
        load(out, tp_rank=1, tp_size=2)
