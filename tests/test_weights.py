"""Safetensors loading: sharded folders, gpt2 legacy keys, dtype casts and strict errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmsh.config import ModelConfig
from llmsh.errors import LlmshError, WeightsError
from llmsh.weights import load_decoder, load_state_dict, resolve_device, resolve_dtype
from tiny_models import make_tiny_model, random_tokens


def _logits(dec, hf, n=20, vocab=300):
    tokens = random_tokens(vocab, n)
    with torch.no_grad():
        return dec(tokens), hf(tokens).logits


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def llama(tmp_path):
    path, hf = make_tiny_model("llama", tmp_path)
    return path, hf, ModelConfig.from_file(path)


def test_sharded_checkpoint_loads(tmp_path):
    path, hf = make_tiny_model("llama_bias_tied", tmp_path, shard=True)
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    config = ModelConfig.from_file(path)
    sd = load_state_dict(path, config)
    hf_sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert sd.keys() == hf_sd.keys()
    assert all(torch.equal(sd[k], hf_sd[k]) for k in sd)
    out, ref = _logits(load_decoder(path, config, device="cpu"), hf)
    assert (out - ref).abs().max() <= 1e-4


def test_gpt2_legacy_keys(tmp_path):
    """Original gpt2 checkpoints: no 'transformer.' prefix, attn.bias/masked_bias buffers."""
    path, hf = make_tiny_model("gpt2", tmp_path)
    t = _tensors(path)
    legacy = {k.removeprefix("transformer."): v for k, v in t.items()}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(legacy, str(path / "model.safetensors"))
    config = ModelConfig.from_file(path)
    out, ref = _logits(load_decoder(path, config, device="cpu"), hf)
    assert (out - ref).abs().max() <= 1e-4


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
    path, hf = make_tiny_model("qwen2", tmp_path)
    t = _tensors(path)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, str(path / "model.safetensors"))
    dec = load_decoder(path, ModelConfig.from_file(path), device="cpu")
    assert dec.lm_head.weight is dec.model.embed_tokens.weight
    out, ref = _logits(dec, hf)
    assert (out - ref).abs().max() <= 1e-4


def test_bfloat16_cast(tmp_path):
    path, hf = make_tiny_model("llama_bias_tied", tmp_path)
    dec = load_decoder(path, ModelConfig.from_file(path), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in dec.parameters()} == {torch.bfloat16}
    assert dec.backbone.rope_cos.dtype == torch.bfloat16
    assert dec.lm_head.weight is dec.model.embed_tokens.weight
    assert not any(p.requires_grad for p in dec.parameters()) and not dec.training
    hf_bf16 = hf.to(torch.bfloat16)
    out, ref = _logits(dec, hf_bf16)
    assert out.dtype == torch.float32
    # bfloat16 has ~3 significant digits; both run the same bf16 arithmetic closely.
    assert (out - ref.float()).abs().max() <= 0.1
    cache = dec.new_cache(8)
    assert cache.k[0].dtype == torch.bfloat16


def test_no_pickle(llama, monkeypatch):
    path, hf, config = llama

    def refuse(*a, **k):
        raise AssertionError("torch.load (pickle) must never be used")

    monkeypatch.setattr(torch, "load", refuse)
    load_decoder(path, config, device="cpu")


def test_missing_tensor_is_named(llama):
    path, _, config = llama
    t = _tensors(path)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_decoder(path, config, device="cpu")


def test_missing_lm_head_when_untied(llama):
    path, _, config = llama
    t = _tensors(path)
    del t["lm_head.weight"]
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(WeightsError, match="lm_head.weight"):
        load_decoder(path, config, device="cpu")


def test_unexpected_tensor_is_named(llama):
    path, _, config = llama
    t = _tensors(path)
    t["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.self_attn\.extra\.weight") as e:
        load_decoder(path, config, device="cpu")
    assert "model.safetensors" in str(e.value)


def test_wrong_shape_is_named(llama):
    path, _, config = llama
    t = _tensors(path)
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)   # expects (32, 64)
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"k_proj\.weight.*\(16, 64\).*\(32, 64\)") as e:
        load_decoder(path, config, device="cpu")
    assert "model.safetensors" in str(e.value)


def test_config_that_does_not_match_the_weights(llama):
    path, _, _ = llama
    d = json.loads((path / "config.json").read_text())
    d["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(WeightsError, match="mlp"):
        load_decoder(path, ModelConfig.from_file(path), device="cpu")


@pytest.mark.parametrize("keep", [0.5, 0.999, 20])
def test_truncated_file(llama, keep):
    path, _, config = llama
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(WeightsError, match="model.safetensors") as e:
        load_decoder(path, config, device="cpu")
    assert isinstance(e.value, LlmshError) and "\n" not in str(e.value)


def test_garbage_file(llama):
    path, _, config = llama
    (path / "model.safetensors").write_bytes(b"\xff" * 4096)
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_decoder(path, config, device="cpu")


def test_missing_model_file(llama):
    path, _, config = llama
    (path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_decoder(path, config, device="cpu")
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="pickle"):
        load_decoder(path, config, device="cpu")


def test_missing_shard_is_named(tmp_path):
    path, _ = make_tiny_model("llama", tmp_path, shard=True)
    shard = sorted(path.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=shard.name):
        load_decoder(path, ModelConfig.from_file(path), device="cpu")


def test_index_names_a_tensor_not_in_its_shard(tmp_path):
    path, _ = make_tiny_model("llama", tmp_path, shard=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = sorted(path.glob("model-*-of-*.safetensors"))[0].name
    index["weight_map"]["model.layers.0.ghost.weight"] = first
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="ghost"):
        load_decoder(path, ModelConfig.from_file(path), device="cpu")


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(WeightsError, match="float8"):
        resolve_dtype("float8", "cpu")
    with pytest.raises(WeightsError, match="nonsense"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(WeightsError, match="cuda"):
            resolve_device("cuda")
