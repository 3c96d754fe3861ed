"""llmsh vs transformers on the same weights, dtype, threads and prompt (a development tool).

    .venv/bin/python benchmarks/compare.py [--threads 2] [-p 512] [-n 128] [-r 2] [--ppl-windows 8]
        [--llmsh-args '{"quantize": "int8", "compile": true}'] [--json]

Each measurement runs in its own subprocess (so peak RSS is per side), alternating
llmsh, transformers, llmsh, transformers ... ``-r`` times; medians are compared. Measured: prefill
tok/s of a p-token random prompt, greedy decode tok/s of n tokens after it, perplexity tokens/s
(llama.cpp protocol, n_ctx 512, BOS per window, on ../shared/data/gpl-3.txt, the first
--ppl-windows windows), peak RSS (MB, getrusage), and the cold start of
``llmsh generate -n 1 "Hi"`` as a whole process (exec to exit, which is just after the token).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPL = ROOT.parent / "shared" / "data" / "gpl-3.txt"
MODEL = "smollm2-135m-instruct"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 * 1.048576


def child(side: str, p: int, n: int, windows: int, extra: dict) -> dict:
    """Run one side in this process and return its measurements."""
    import torch

    from llmsh import hub
    from llmsh.tokenizer import Tokenizer

    path = hub.resolve_model(MODEL)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 49152, (1, p), generator=g)
    tok = Tokenizer.from_dir(path)
    ids = torch.tensor(tok.encode(GPL.read_text(encoding="utf-8")))
    nw = min(windows, ids.numel() // 512)
    batch = ids[: nw * 512].view(nw, 512).clone()
    batch[:, 0] = tok.bos_token_id
    out: dict = {"side": side}
    with torch.no_grad():
        if side == "llmsh":
            from llmsh.compiled import setup_decoder
            from llmsh.generate import GenerationStats, generate_tokens
            from llmsh.perplexity import perplexity_llamacpp
            from llmsh.sampling import SamplingParams
            from llmsh.weights import load_decoder
            from llmsh.config import ModelConfig

            t0 = time.perf_counter()
            dec = load_decoder(path, ModelConfig.from_file(path), device="cpu",
                               dtype=extra.get("dtype", "float32"), quantize=extra.get("quantize"))
            out["load_s"] = time.perf_counter() - t0
            info = setup_decoder(dec, compile=extra.get("compile", False), max_new_tokens=n)
            out["compile_s"] = info["compile_s"]
            for rep in range(2):                       # the first is the warm-up
                cache = dec.new_cache(p + n)
                st = GenerationStats()
                toks = list(generate_tokens(dec, prompt[0].tolist(), cache, SamplingParams(temperature=0),
                                            max_new_tokens=n, stats=st))
            out["prefill_tok_s"] = p / st.prefill_seconds
            out["decode_tok_s"] = st.decode_tokens_per_s
            t0 = time.perf_counter()
            r = perplexity_llamacpp(dec, ids[: nw * 512], 512, bos_id=tok.bos_token_id)
            out["ppl_tok_s"] = nw * 512 / (time.perf_counter() - t0)
            out["ppl"] = r.perplexity
        else:
            from transformers import AutoModelForCausalLM

            t0 = time.perf_counter()
            dtype = getattr(torch, extra.get("dtype", "float32"))
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            out["load_s"] = time.perf_counter() - t0
            mask = torch.ones_like(prompt)
            kw = dict(do_sample=False, attention_mask=mask, pad_token_id=0, eos_token_id=None)
            for rep in range(2):
                t0 = time.perf_counter()
                hf(prompt, logits_to_keep=1)
                t_pre = time.perf_counter() - t0
                t0 = time.perf_counter()
                hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
                t1 = time.perf_counter() - t0
                t0 = time.perf_counter()
                gen = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
                tn = time.perf_counter() - t0
            toks = gen[0, p:].tolist()
            out["prefill_tok_s"] = p / t_pre
            out["decode_tok_s"] = (n - 1) / (tn - t1)
            t0 = time.perf_counter()
            nll = []
            for b0 in range(0, nw, 4):
                logits = hf(batch[b0:b0 + 4]).logits.float()
                lp = torch.log_softmax(logits[:, 256:511], -1)
                nll.append(-lp.gather(-1, ids[: nw * 512].view(nw, 512)[b0:b0 + 4, 257:, None]).squeeze(-1))
            out["ppl_tok_s"] = nw * 512 / (time.perf_counter() - t0)
            out["ppl"] = float(torch.cat(nll).double().mean().exp())
    out["tokens"] = toks[:16]
    out["peak_rss_mb"] = _rss_mb()
    return out


def cold_start() -> float:
    t0 = time.perf_counter()
    subprocess.run([str(ROOT / ".venv" / "bin" / "llmsh"), "generate", "-n", "1", "Hi"],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=2)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--llmsh-args", default="{}", help="JSON: dtype, quantize, compile")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    extra = json.loads(a.llmsh_args)
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(child(a.child, a.p, a.n, a.ppl_windows, extra)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    runs: dict[str, list[dict]] = {"llmsh": [], "transformers": []}
    for _ in range(a.r):
        for side in ("llmsh", "transformers"):
            cmd = [sys.executable, __file__, "--child", side, "--threads", str(a.threads), "-p", str(a.p),
                   "-n", str(a.n), "--ppl-windows", str(a.ppl_windows), "--llmsh-args", a.llmsh_args]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                sys.exit(f"{side} failed:\n{res.stderr[-2000:]}")
            runs[side].append(json.loads(res.stdout.strip().splitlines()[-1]))
    colds = [cold_start() for _ in range(a.r)]
    keys = ("prefill_tok_s", "decode_tok_s", "ppl_tok_s", "peak_rss_mb", "ppl")
    med = {s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in runs.items()}
    report = {"threads": a.threads, "p": a.p, "n": a.n, "llmsh_args": extra, "medians": med,
              "ratios": {k: med["llmsh"][k] / med["transformers"][k] for k in keys},
              "same_greedy_tokens": runs["llmsh"][0]["tokens"] == runs["transformers"][0]["tokens"],
              "cold_start_s": statistics.median(colds),
              "compile_s": runs["llmsh"][0].get("compile_s", 0.0), "runs": runs}
    if a.json:
        print(json.dumps(report, indent=1))
        return
    print(f"threads {a.threads}, p{a.p} n{a.n}, llmsh {extra or 'defaults'}")
    print(f"{'':14}{'llmsh':>12}{'transformers':>14}{'ratio':>8}")
    for k in keys:
        print(f"{k:14}{med['llmsh'][k]:12.1f}{med['transformers'][k]:14.1f}{report['ratios'][k]:8.2f}")
    print(f"cold start (llmsh generate -n 1): {report['cold_start_s']:.2f} s; "
          f"greedy tokens equal: {report['same_greedy_tokens']}; compile {report['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
