"""A fixed-shape decode step, compiled with ``torch.compile`` (inductor, on-disk caches kept).

On a small CPU, eager decoding is bound by per-operation overhead (about 30 operators per layer
per token); compiled it becomes about 2x faster, towards the memory-bandwidth bound, as
gpt-fast's ``decode_one_token`` does. Weight freezing is off so that inductor's caches work. The step writes the new
key/value at ``cache.offset`` in place (``index_copy_``), so no shape depends on the Python
value of the offset except the number of visible keys L, which is a dynamic dimension on CPU
(attention reads only L positions, one compilation for every length and cache size). On CUDA
the step attends over the whole cache with a mask instead, so every shape is static and the step
can be captured in a CUDA graph (``mode="reduce-overhead"``).

Installed on a :class:`llmsh.models.Decoder` as ``decoder.decode_step``, which
``Decoder.forward`` uses for one-token steps with a cache; prefill and scoring stay eager.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import torch
from torch import nn


# max_new_tokens from which compile=None (automatic) compiles with a cold inductor cache. The
# compile (42-52 s on 2 busy cores) saves ~8 ms/token (eager 27-30 -> 31-41 tok/s), so it pays
# back only after ~6000 tokens in this process; 2048 is kept because the compile also fills the
# on-disk cache that makes every later process compile in seconds (benchmarks/RESULTS.md).
AUTO_COMPILE_MIN_TOKENS = 2048
# ... and with a warm cache (this model, dtype and device compiled before by this torch): the
# compile is then 7-10 s, paid back after ~1100 tokens.
AUTO_COMPILE_WARM_MIN_TOKENS = 1024


class DecodeStep(nn.Module):
    """One token through a decoder whose backbone has ``decode_hidden`` (the llama family and
    gemma3): (tokens (B, 1), pos (1,), kv_pos (L,), ks, vs) -> float32 logits (B, 1, V), writing
    keys/values at ``pos`` of the caches ks/vs (lists of (B, KV, S, D) tensors, one per layer). kv_pos: the positions 0..L-1 of keys the query may see
    (L = pos + 1 on CPU; L = S on CUDA, where keys after pos are masked). Matches
    ``Decoder.forward(tokens, cache)`` for T = 1 (same operations, same order)."""

    def __init__(self, decoder, full_length: bool) -> None:
        super().__init__()
        self.dec = decoder
        self.full_length = full_length

    def forward(self, tokens, pos, kv_pos, ks: list[torch.Tensor], vs: list[torch.Tensor]):
        dec = self.dec
        x = dec.backbone.decode_hidden(tokens, pos, kv_pos, ks, vs, self.full_length)   # (B, 1, C)
        return dec.head(x)


class _Installed:
    """The callable placed at ``decoder.decode_step``: runs the step for a :class:`KVCache`."""

    def __init__(self, fn, full_length: bool, max_pos: int, device) -> None:
        self.fn, self.full_length = fn, full_length
        self.arange = torch.arange(max_pos, device=device)

    def __call__(self, tokens, cache):
        off = cache.offset
        if off + 1 > cache.max_seq_len:
            raise ValueError(f"KV cache overflow: {off} + 1 tokens > max_seq_len {cache.max_seq_len}")
        if tokens.shape[0] != cache.batch_size or off == 0:
            return None                      # not the shape this step handles: eager forward
        if self.arange.shape[0] < cache.max_seq_len:
            self.arange = torch.arange(2 * cache.max_seq_len, device=self.arange.device)
        kv_pos = self.arange[:cache.max_seq_len] if self.full_length else self.arange[:off + 1]
        if self.full_length and not getattr(cache, "_zeroed", False):
            # Masked keys still enter the matmuls: never-written (torch.empty) values could be
            # NaN, and 0 * NaN would poison the output.
            for t in cache.k + cache.v:
                t[:, :, off:].zero_()
            cache._zeroed = True
        if not self.full_length:
            torch._dynamo.maybe_mark_dynamic(kv_pos, 0)
            if not getattr(cache, "_dynamic_marked", False):
                for t in cache.k + cache.v:
                    torch._dynamo.maybe_mark_dynamic(t, 2)
                cache._dynamic_marked = True
        logits = self.fn(tokens, self.arange[off:off + 1], kv_pos, cache.k, cache.v)
        cache.advance(1)
        return logits


def compile_unavailable(decoder) -> str | None:
    """Why the decode step cannot be compiled for ``decoder`` (a reason), or None if it can."""
    if getattr(decoder, "tensor_parallel", None) is not None:
        return "tensor-parallel decoders decode eagerly"
    if not hasattr(decoder.backbone, "decode_hidden"):
        return f"{decoder.config.model_type} models decode eagerly"
    dev = next(decoder.parameters()).device
    if dev.type == "cpu" and not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
                                  or shutil.which("clang")):
        return "no C compiler found (torch.compile needs one on CPU)"
    if dev.type not in ("cpu", "cuda"):
        return f"torch.compile is not used on {dev.type}"
    return None


def setup_decoder(decoder, *, max_new_tokens: int = 0, compile: bool | None = None,
                  mode: str | None = None, notice=None, warmup: bool = True) -> dict:
    """Install (or remove) the compiled decode step on ``decoder``.

    compile: True — compile now; False — eager (removes an installed step); None — compile when
    ``max_new_tokens >= AUTO_COMPILE_MIN_TOKENS``, or ``>= AUTO_COMPILE_WARM_MIN_TOKENS`` when
    inductor's on-disk cache is warm for this model (:func:`cache_is_warm`), on a CPU/CUDA
    model whose family has a decode step (llama family, gemma3).
    mode: torch.compile mode; default "default" on CPU, "reduce-overhead"
    (CUDA graphs) on CUDA. Compilation happens here, on a small scratch cache, so its time is
    reported and not paid by the first token. Inductor's on-disk caches (FX graph and AOTAutograd,
    kept under :func:`inductor_cache_dir`) make a later process compile in seconds.
    ``notice`` (one line each) announces the compile before it starts and reports a failure,
    after which the decoder stays eager.

    Returns {"compiled": bool, "compile_s": seconds, "reason": why not compiled, or None,
    "cache": "warm" | "cold" (whether this model had been compiled before), "cache_dir": path}.
    """
    decoder.__dict__.pop("decode_step", None)
    if compile is False or (compile is None and max_new_tokens < AUTO_COMPILE_WARM_MIN_TOKENS):
        return {"compiled": False, "compile_s": 0.0, "reason": None}
    reason = compile_unavailable(decoder)
    if reason is not None:
        if compile and notice:
            notice(f"not compiling: {reason}")
        return {"compiled": False, "compile_s": 0.0, "reason": reason}
    warm = cache_is_warm(decoder, mode)
    if compile is None and not warm and max_new_tokens < AUTO_COMPILE_MIN_TOKENS:
        return {"compiled": False, "compile_s": 0.0, "reason": None, "cache": "cold"}
    cache_dir = inductor_cache_dir()
    if notice:      # a cold compile is a minute of silence otherwise
        notice("compiling the decode step " + ("(cached: about 15-20 s on CPU)" if warm else
                                               "(first time for this model: about a minute)"))
    t0 = time.perf_counter()
    try:
        fn = compile_step(decoder, mode=mode)
        if warmup:
            cache = decoder.new_cache(8, batch_size=1)
            with torch.no_grad():
                decoder(torch.zeros(1, 2, dtype=torch.long, device=cache.k[0].device), cache)
                for _ in range(2):         # the second call runs the dynamic-length graph
                    decoder(torch.zeros(1, 1, dtype=torch.long, device=cache.k[0].device), cache)
    except Exception as e:  # inductor raises many kinds (no compiler, backend errors)
        decoder.__dict__.pop("decode_step", None)
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if notice:
            notice(f"torch.compile failed, decoding eagerly ({msg})")
        return {"compiled": False, "compile_s": time.perf_counter() - t0, "reason": msg}
    if warmup:
        _mark_warm(decoder, mode)
    return {"compiled": True, "compile_s": time.perf_counter() - t0, "reason": None, "step": fn,
            "cache": "warm" if warm else "cold", "cache_dir": cache_dir}


class DeferredStep:
    """The ``decoder.decode_step`` of automatic compilation: decode eagerly, and compile only once
    the tokens actually generated say a compile will pay.

    A reply's length is not known in advance (``-n 100000`` may stop after 10 tokens), so the
    decision is the ski-rental rule: once this decoder has run ``after`` eager one-token steps
    (``after``: the tokens whose saved time pays for a compile, :data:`AUTO_COMPILE_MIN_TOKENS`
    cold, :data:`AUTO_COMPILE_WARM_MIN_TOKENS` with a warm inductor cache), and the cache being
    decoded still has room for ``after`` more, the step compiles (as ``setup_decoder(compile=True)``)
    and every later step runs compiled. That way no run pays more than twice the best choice made
    knowing its length. ``compile_seconds`` (total time spent compiling) lets the caller keep the
    compile out of its decode timings (:func:`llmsh.generate.generate_tokens` does); ``info`` is
    :func:`setup_decoder`'s dict once compiled (or failed). A failed compile stays eager, with
    one notice.
    """

    def __init__(self, decoder, *, after: int, mode: str | None = None, notice=None) -> None:
        self.decoder, self.after, self.mode, self.notice = decoder, after, mode, notice
        self.steps = 0
        self.compile_seconds = 0.0
        self.step = None           # the compiled step, once there is one
        self.info: dict | None = None

    def __call__(self, tokens, cache):
        if self.step is not None:
            return self.step(tokens, cache)
        if self.info is not None or tokens.shape[0] != 1:       # failed, or not a reply's shape
            return None
        self.steps += 1
        if self.steps > self.after and cache.max_seq_len - cache.offset >= self.after:
            self._compile()
            if self.step is not None:
                return self.step(tokens, cache)
        return None

    def _compile(self) -> None:
        info = setup_decoder(self.decoder, compile=True, mode=self.mode, notice=self.notice)
        self.compile_seconds += info["compile_s"]
        self.info = info
        if info["compiled"]:
            self.step = self.decoder.__dict__["decode_step"]
            if self.notice:
                self.notice(f"compiled the decode step in {info['compile_s']:.1f} s after "
                            f"{self.steps - 1} eager tokens ({info.get('cache', 'cold')} inductor cache)")
        self.decoder.__dict__["decode_step"] = self        # the caller reads compile_seconds here


def defer_compile(decoder, *, max_new_tokens: int | None = None, mode: str | None = None,
                  notice=None) -> DeferredStep | None:
    """Automatic compilation for replies of unknown length: install a :class:`DeferredStep` on
    ``decoder`` and return it, or None (and leave the decoder eager) when it could never compile:
    ``max_new_tokens`` (the most a reply may generate; None: no limit but the cache) below twice
    its threshold, or :func:`compile_unavailable`."""
    decoder.__dict__.pop("decode_step", None)
    if compile_unavailable(decoder):
        return None
    after = AUTO_COMPILE_WARM_MIN_TOKENS if cache_is_warm(decoder, mode) else AUTO_COMPILE_MIN_TOKENS
    if max_new_tokens is not None and max_new_tokens < 2 * after:
        return None
    step = DeferredStep(decoder, after=after, mode=mode, notice=notice)
    decoder.__dict__["decode_step"] = step
    return step


def inductor_cache_dir() -> str:
    """Where inductor keeps its on-disk caches: ``$TORCHINDUCTOR_CACHE_DIR`` if set, else
    ``llmsh_home()/inductor``, which is then set in the environment (inductor reads it there at
    each compile, so this must run before compiling)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        from .hub import llmsh_home

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(llmsh_home() / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _warm_marker(decoder, mode: str | None) -> str:
    # The inductor cache keys on the graph, shapes, torch version and config; this marker keys on
    # what decides them here, so "warm" predicts a cache hit without tracing anything.
    p = next(decoder.parameters())
    key = repr((decoder.config, str(p.dtype), p.device.type, mode, torch.__version__,
                getattr(decoder, "quantization", None)))
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    return os.path.join(inductor_cache_dir(), "llmsh-warm", name)


def cache_is_warm(decoder, mode: str | None = None) -> bool:
    """True if this decoder's step (config, dtype, device type, mode, torch version) was compiled
    before with the current inductor cache dir, so compiling now should take seconds."""
    return os.path.exists(_warm_marker(decoder, mode))


def _mark_warm(decoder, mode: str | None) -> None:
    path = _warm_marker(decoder, mode)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(repr(decoder.config) + "\n")
    except OSError:
        pass                              # a read-only cache only costs the next compile time


def compile_step(decoder, *, mode: str | None = None, backend: str = "inductor", full_length=None,
                 freeze: bool = False):
    """Build, compile (lazily, at first call) and install ``decoder.decode_step``; returns it.

    full_length: attend over the whole cache with a mask (static shapes; default on CUDA).
    backend "eager" skips inductor (used by the tests to check the step itself).
    freeze: inductor weight freezing. Off: with torch 2.13 freezing bypasses both the FX graph
    cache and the AOTAutograd cache (every process recompiles, 52-64 s here) and peaks at 1.8 GB;
    unfrozen decodes as fast here (34-41 vs 34 tok/s frozen), compiles in 42-52 s cold and
    7-10 s warm, and peaks at 1.0-1.1 GB.
    """
    dev = next(decoder.parameters()).device
    full = dev.type == "cuda" if full_length is None else full_length
    step = DecodeStep(decoder, full_length=full).eval()
    if backend == "eager" and mode is None:
        fn = step
    else:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = freeze
        inductor_cache_dir()
        if mode is None:
            # CPU: "default" decodes as fast here as "max-autotune-no-cudagraphs" (20.3 vs 21.4
            # tok/s, 1 thread) but compiles in 49 s instead of 109 s and peaks at 1.8 GB, not 2.4.
            mode = "reduce-overhead" if dev.type == "cuda" else "default"
        fn = torch.compile(step, backend=backend, mode=mode if backend == "inductor" else None,
                           fullgraph=True)
    installed = _Installed(fn, full, decoder.backbone.rope_cos.shape[0], dev)
    decoder.__dict__["decode_step"] = installed
    return installed
