"""``llmsh bench``: prefill and decode speed of a loaded model, in the manner of ``llama-bench``.

llama-bench reports tokens/s for a p-token prompt (pp) and for n generated tokens (tg) as a mean
± stddev over repetitions of random token ids; here each is the median with min and max over
``repetitions`` runs after one warm-up run, plus time to first token, peak resident memory and the
memory bandwidth decode achieves (bytes of weights and KV cache read per token × tokens/s), which
is what bounds decoding on a CPU.
"""

from __future__ import annotations

import platform
import resource
import statistics
import sys

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (10^6 bytes), from getrusage."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss * 1024 / 1e6   # macOS: bytes; Linux: KiB


def weight_bytes(decoder) -> int:
    """Bytes of the distinct tensors (parameters and buffers, tied weights once) of ``decoder``."""
    seen, total = set(), 0
    for t in list(decoder.parameters()) + list(decoder.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def decode_bytes_per_token(decoder, context: int) -> int:
    """Bytes one decode step reads: every weight once (the embedding: one row) + ``context`` cached
    positions of keys and values in every layer."""
    c = decoder.config
    total = weight_bytes(decoder)
    emb = decoder.embed_tokens.weight
    if not c.tie_word_embeddings:    # an untied embedding matrix is read one row per token
        total -= emb.numel() * emb.element_size() - c.hidden_size * emb.element_size()
    for name in ("rope_cos", "rope_sin"):   # tables: one row per token
        buf = getattr(decoder.backbone, name, None)
        if buf is not None:
            total -= buf.numel() * buf.element_size()
    kv_elt = torch.finfo(getattr(decoder, "compute_dtype", emb.dtype)).bits // 8
    total += 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * kv_elt * context
    return total


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(model, prompt_tokens: int = 512, new_tokens: int = 128, repetitions: int = 3, *,
              warmup: bool = True, seed: int = 0, compile: bool | None = False,
              progress=None, notice=None) -> dict:
    """Measure ``model`` (a :class:`llmsh.loader.LoadedModel`) on random token ids.

    prefill: one cache of ``prompt_tokens + new_tokens`` positions, the prompt fed by
    :func:`llmsh.generate.prefill` (chunks of 512); decode: ``new_tokens`` greedy steps after that
    prompt, EOS ignored, sampling included (as llama-bench's tg, which starts from an empty context
    instead). ttft_s: prefill plus the first sampled token, seconds. Values are tokens/s.
    compile: as :func:`llmsh.compiled.setup_decoder` (False: eager; None: automatic).
    progress: called with a one-line message before each run; notice: for a compile fallback.

    Returns a dict: prefill_tok_s / decode_tok_s / ttft_s ({"median", "min", "max"}), peak_rss_mb,
    decode_gb_s (median), bytes_per_token, compile_s (seconds spent compiling, 0 if eager),
    compile_cache ("warm"/"cold" inductor cache when compiled, else None), compile_cache_dir,
    device, dtype, quantization, threads, torch, model, prompt_tokens, new_tokens, repetitions.
    Raises ValueError for a non-positive count, or new_tokens 1 (no decode step to time).
    """
    from .compiled import setup_decoder
    from .generate import GenerationStats, generate_tokens
    from .sampling import SamplingParams

    if prompt_tokens < 1 or new_tokens < 2 or repetitions < 1:
        raise ValueError("prompt_tokens and repetitions must be positive, new_tokens at least 2 "
                         "(one decode step)")
    dec = model.decoder
    info = setup_decoder(dec, max_new_tokens=new_tokens, compile=compile, notice=notice)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    params = SamplingParams(temperature=0.0)
    cache = dec.new_cache(prompt_tokens + new_tokens)
    pre, dec_s, ttft = [], [], []
    runs = repetitions + (1 if warmup else 0)
    for r in range(runs):
        if progress:
            progress(f"run {r + 1}/{runs}" + (" (warm-up)" if warmup and r == 0 else ""))
        ids = torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist()
        cache.reset()
        st = GenerationStats()
        for _ in generate_tokens(dec, ids, cache, params, max_new_tokens=new_tokens, stats=st):
            pass
        if warmup and r == 0:
            continue
        pre.append(prompt_tokens / st.prefill_seconds)
        dec_s.append(st.decode_tokens_per_s)
        ttft.append(st.ttft_seconds)
    bpt = decode_bytes_per_token(dec, prompt_tokens + new_tokens // 2)
    p = next(dec.parameters())
    return {
        "model": str(getattr(model, "path", "")),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repetitions": repetitions,
        "prefill_tok_s": _stats(pre), "decode_tok_s": _stats(dec_s), "ttft_s": _stats(ttft),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "bytes_per_token": bpt,
        "decode_gb_s": float(f"{bpt * statistics.median(dec_s) / 1e9:.3g}"),
        "compile": info.get("compiled", False), "compile_s": round(info.get("compile_s", 0.0), 2),
        "compile_cache": info.get("cache"), "compile_cache_dir": info.get("cache_dir"),
        "device": str(p.device), "dtype": str(getattr(dec, "compute_dtype", p.dtype)).replace("torch.", ""),
        "quantization": getattr(dec, "quantization", None) or "none",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def format_bench(r: dict) -> str:
    """A few human-readable lines for the result of :func:`run_bench`."""
    def span(s, f="{:.1f}"):
        return f"{f.format(s['median'])} ({f.format(s['min'])}–{f.format(s['max'])})"

    head = (f"{r['device']} {r['dtype']} quant={r['quantization']} compile={r['compile']} "
            f"threads={r['threads']} torch {r['torch']}")
    return "\n".join([
        head,
        f"prefill  pp{r['prompt_tokens']}: {span(r['prefill_tok_s'])} tok/s",
        f"decode   tg{r['new_tokens']}: {span(r['decode_tok_s'])} tok/s  "
        f"({r['decode_gb_s']:.1f} GB/s at {r['bytes_per_token'] / 1e6:.0f} MB/token)",
        f"ttft: {span(r['ttft_s'], '{:.3f}')} s   peak RSS: {r['peak_rss_mb']:.0f} MB"
        + (f"   compile: {r['compile_s']:.1f} s ({r.get('compile_cache')} cache "
           f"{r.get('compile_cache_dir')})" if r["compile"] else ""),
    ])
