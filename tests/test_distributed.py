"""Tensor parallelism and sharded scoring over torch.distributed (gloo, 2 ranks on this CPU).

Each test starts two ranks as torchrun would (tests/dist_worker.py, RANK/WORLD_SIZE/MASTER_* in
the environment) and compares with one process on the same weights: logits within 1e-5 in
float32, greedy ids identical, perplexity sums identical.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmsh import distributed
from llmsh.config import ModelConfig
from llmsh.errors import InputError
from tiny_models import make_tiny_model

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_ranks(mode: str, model_dir, tmp_path, *extra, world: int = 2, timeout: float = 120):
    out = tmp_path / f"{mode}.pt"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(distributed.free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(model_dir), str(out), *extra],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(world)]
    t0 = time.monotonic()
    outs = [p.communicate(timeout=timeout) for p in procs]
    codes = [p.returncode for p in procs]
    return codes, outs, (pickle.loads(out.read_bytes()) if out.exists() else None), time.monotonic() - t0


def _config(**kw):
    base = dict(model_type="llama", vocab_size=100, hidden_size=144, num_hidden_layers=1,
                num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                max_position_embeddings=64)
    return ModelConfig.from_dict(dict(base, **kw))


def test_plan_splits_whole_kv_groups_unevenly():
    """The default model's shape: 3 KV heads over 2 ranks as 2 + 1 with 6 and 3 query heads."""
    a, b = distributed.plan(_config(), 2)
    assert (a.kv0, a.n_kv, a.q0, a.n_q, a.i0, a.n_i) == (0, 2, 0, 6, 0, 768)
    assert (b.kv0, b.n_kv, b.q0, b.n_q, b.i0, b.n_i) == (2, 1, 6, 3, 768, 768)
    c = distributed.plan(_config(intermediate_size=100), 3)
    assert [s.n_i for s in c] == [32, 32, 36] and sum(s.n_i for s in c) == 100


def test_plan_refuses_more_ranks_than_kv_heads():
    with pytest.raises(InputError, match="--tp 4: the model has 3 key/value heads"):
        distributed.plan(_config(), 4)


def _single(model_dir, quantize=None):
    from llmsh.weights import load_decoder
    from dist_worker import greedy

    config = ModelConfig.from_file(model_dir)
    dec = load_decoder(model_dir, config, device="cpu", dtype="float32", quantize=quantize)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, 20), generator=g)
    with torch.no_grad():
        return dec(prompt), greedy(dec, prompt[0].tolist(), 32)


TP_CASES = {
    "llama": {}, "llama_bias_tied": {}, "mistral": {}, "qwen2": {}, "gpt2": {},
    "qwen3": {}, "gemma3": {},
    # 3 KV heads over 2 ranks: uneven shares.
    "llama_uneven": dict(arch="llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=96),
}


@pytest.mark.parametrize("case", list(TP_CASES))
def test_tensor_parallel_matches_one_process(case, tmp_path):
    kw = dict(TP_CASES[case])
    arch = kw.pop("arch", case)
    path, _ = make_tiny_model(arch, tmp_path, **kw)
    codes, outs, res, _ = run_ranks("tp", path, tmp_path)
    assert codes == [0, 0], outs
    logits, ids = _single(path)
    assert (res["logits"] - logits).abs().max().item() < 1e-5
    assert res["greedy"] == ids


def test_tensor_parallel_int4_splits_on_group_boundaries(tmp_path):
    """int4 groups (32 input columns) never straddle ranks: each rank's scales and zeros are
    exactly its slice of one process's, so both quantize the same groups. Logits then differ only
    by the int4 kernel's bfloat16 rounding of partial sums."""
    from llmsh.weights import load_decoder

    path, _ = make_tiny_model("llama", tmp_path, hidden_size=128, intermediate_size=256,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    config = ModelConfig.from_file(path)
    one = load_decoder(path, config, device="cpu", dtype="float32", quantize="int4")
    for shard in distributed.plan(config, 2):
        dec = distributed.load_tp_decoder(path, config, shard, device="cpu", dtype="float32", quantize="int4")
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            mine = dec.get_submodule(f"model.layers.0.{name}").scales_and_zeros      # (K/32, N, 2)
            full = one.get_submodule(f"model.layers.0.{name}").scales_and_zeros
            if name == "self_attn.o_proj":
                want = full[shard.q0 * 32 // 32: (shard.q0 + shard.n_q) * 32 // 32]
            elif name == "mlp.down_proj":
                want = full[shard.i0 // 32: (shard.i0 + shard.n_i) // 32]
            elif name == "mlp.gate_up_proj":
                n = config.intermediate_size
                want = torch.cat([full[:, shard.i0: shard.i0 + shard.n_i],
                                  full[:, n + shard.i0: n + shard.i0 + shard.n_i]], dim=1)
            else:
                q, kv, d = config.num_attention_heads * 32, config.num_key_value_heads * 32, 32
                want = torch.cat([full[:, shard.q0 * d: (shard.q0 + shard.n_q) * d],
                                  full[:, q + shard.kv0 * d: q + (shard.kv0 + shard.n_kv) * d],
                                  full[:, q + kv + shard.kv0 * d: q + kv + (shard.kv0 + shard.n_kv) * d]], dim=1)
            assert torch.equal(mine, want), name
    codes, outs, res, _ = run_ranks("tp", path, tmp_path, "int4")
    assert codes == [0, 0], outs
    logits, _ = _single(path, quantize="int4")
    assert (res["logits"] - logits).abs().max().item() < 0.1 * logits.abs().max().item()


def test_sharded_perplexity_is_one_process(tmp_path):
    from llmsh.perplexity import perplexity_lines, perplexity_llamacpp, perplexity_sliding
    from llmsh.weights import load_decoder

    path, _ = make_tiny_model("llama", tmp_path)
    codes, outs, res, _ = run_ranks("dp", path, tmp_path)
    assert codes == [0, 0], outs
    config = ModelConfig.from_file(path)
    dec = load_decoder(path, config, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(1)
    torch.randint(0, config.vocab_size, (1, 20), generator=g)     # the worker's prompt draw
    ids = torch.randint(0, config.vocab_size, (300,), generator=g).tolist()
    lines = [ids[i:i + 3 + i % 17] for i in range(0, 200, 9)] + [ids[:100]]
    one = {"llamacpp": perplexity_llamacpp(dec, ids, 32, per_token=True, batch_size=1),
           "sliding": perplexity_sliding(dec, ids, 32, 12, per_token=True)}
    for k, r in one.items():
        assert res[k].nll_sum == r.nll_sum and res[k].nll_sq_sum == r.nll_sq_sum, k
        assert res[k].n_tokens == r.n_tokens and res[k].token_positions == r.token_positions
        assert res[k].token_nll == r.token_nll
    lines_one = perplexity_lines(dec, lines, 64, batch_size=4)
    assert [r.nll_sum for r in res["lines"]] == [r.nll_sum for r in lines_one]


def test_a_dead_rank_stops_the_others(tmp_path):
    path, _ = make_tiny_model("llama", tmp_path)
    codes, outs, res, seconds = run_ranks("die", path, tmp_path, timeout=90)
    assert codes[1] == 3
    assert res["error"] is not None, "the surviving rank went on as if nothing happened"
    assert res["seconds"] < 30
