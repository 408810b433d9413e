"""Writes tests/fixtures/llmcompressor_tiny: a tiny random Llama quantized by llm-compressor
(SpinQuant R1+R2+R4 'hadamard' + GPTQ W4A16 group 32, actorder 'weight') on CPU, with the
logits its own stack reads back (compressed-tensors decompression + online transforms).

Run in a separate environment (llm-compressor pins its own compressed-tensors and
transformers): python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 &&
/tmp/lcvenv/bin/pip install llmcompressor && /tmp/lcvenv/bin/python tools/make_llmcompressor_fixture.py OUT
"""
import json, shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM, CompressedTensorsConfig, PreTrainedTokenizerFast
from datasets import Dataset
import llmcompressor, compressed_tensors, transformers
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.transform import SpinQuantModifier
from compressed_tensors.transform import TransformConfig, apply_transform_config
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
OUT = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg).eval()
tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0")); tk.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t1", eos_token="t2")
import tempfile
src = tempfile.mkdtemp()  # oneshot wants a model saved in a real directory
model.save_pretrained(src); tok.save_pretrained(src)
model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
g = torch.Generator().manual_seed(1)
ds = Dataset.from_dict({"input_ids": [torch.randint(0, 128, (32,), generator=g).tolist() for _ in range(16)],
                        "attention_mask": [[1] * 32 for _ in range(16)]})
scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                             "group_size": 32, "actorder": "weight"}}
recipe = [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="hadamard"),
          GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
shutil.rmtree(OUT, ignore_errors=True)
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=16, max_seq_length=32, pipeline="basic", processor=tok)
model.save_pretrained(OUT, save_compressed=True)
# Read back as compressed-tensors does (decompress + online part of transform_config + saved matrices)
m = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
qc = json.load(open(f"{OUT}/config.json"))["quantization_config"]
full = TransformConfig.model_validate(qc["transform_config"])
online = TransformConfig(config_groups={k: s.model_copy(update={"apply": [a for a in s.apply if a.is_online()]}) for k, s in full.config_groups.items()})
apply_transform_config(m, online)
with safe_open(f"{OUT}/model.safetensors", "pt") as f:
    sd = {k: f.get_tensor(k) for k in f.keys() if k.endswith(("_input.weight", "_output.weight"))}
print(m.load_state_dict(sd, strict=False))
ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    logits = m.eval()(ids).logits
json.dump({"input_ids": ids.tolist(), "logits": logits.tolist(),
           "written_by": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                          "transformers": transformers.__version__, "torch": torch.__version__},
           "reader": "transformers CompressedTensorsConfig(dequantize=True) + compressed_tensors.apply_transform_config (online part) + saved transform matrices",
           "recipe": "SpinQuantModifier(rotations=['R1','R2','R4'], transform_type='hadamard') + GPTQModifier(W4 group 32 sym, actorder='weight', ignore=['lm_head']), 16 x 32 random calibration tokens, seed 0",
           "script": "tools/make_llmcompressor_fixture.py"},
          open(f"{OUT}/reference.json", "w"))
print("ok", logits.shape)
