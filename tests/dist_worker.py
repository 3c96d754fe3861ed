"""One rank of a multi-process test (tests/test_distributed.py starts it as torchrun would:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

    python dist_worker.py tp MODEL_DIR OUT [int4]   tensor-parallel logits + 32 greedy ids
    python dist_worker.py dp MODEL_DIR OUT          sharded perplexity (three protocols)
    python dist_worker.py die MODEL_DIR OUT         rank 1 dies; rank 0 records how it fails
Rank 0 writes its results to OUT (pickle).
"""

from __future__ import annotations

import os
import pickle
import sys
import time

import torch

from llmsh import distributed
from llmsh.config import ModelConfig


def greedy(decoder, ids: list[int], n: int) -> list[int]:
    cache = decoder.new_cache(len(ids) + n)
    logits = decoder(torch.tensor([ids]), cache)[0, -1]
    out = []
    for _ in range(n):
        t = int(logits.argmax())
        out.append(t)
        logits = decoder(torch.tensor([[t]]), cache)[0, -1]
    return out


def main() -> None:
    mode, model_dir, out = sys.argv[1:4]
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    config = ModelConfig.from_file(model_dir)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, 20), generator=g)
    result = {}
    if mode == "tp":
        quantize = sys.argv[4] if len(sys.argv) > 4 else None
        shard = distributed.plan(config, ctx.world)[ctx.rank]
        dec = distributed.load_tp_decoder(model_dir, config, shard, device="cpu", dtype="float32",
                                          quantize=quantize)
        with torch.no_grad():
            result["logits"] = dec(prompt)
            result["greedy"] = greedy(dec, prompt[0].tolist(), 32)
    elif mode == "dp":
        from llmsh.perplexity import perplexity_lines, perplexity_llamacpp, perplexity_sliding
        from llmsh.weights import load_decoder

        dec = load_decoder(model_dir, config, device="cpu", dtype="float32")
        ids = torch.randint(0, config.vocab_size, (300,), generator=g).tolist()
        lines = [ids[i:i + 3 + i % 17] for i in range(0, 200, 9)] + [ids[:100]]
        result["llamacpp"] = perplexity_llamacpp(dec, ids, 32, per_token=True, shard=ctx, batch_size=1)
        result["sliding"] = perplexity_sliding(dec, ids, 32, 12, per_token=True, shard=ctx)
        result["lines"] = perplexity_lines(dec, lines, 64, batch_size=4, shard=ctx)
    elif mode == "die":
        if ctx.rank == 1:
            os._exit(3)
        t0 = time.monotonic()
        try:
            x = torch.ones(4)
            for _ in range(3):
                torch.distributed.all_reduce(x)
                time.sleep(0.5)
            result["error"] = None
        except Exception as e:  # what the rank sees when its peer is gone
            result["error"] = type(e).__name__
        result["seconds"] = time.monotonic() - t0
    if ctx.rank == 0:
        with open(out, "wb") as f:
            pickle.dump(result, f)
    if mode != "die":
        distributed.shutdown()


if __name__ == "__main__":
    main()
