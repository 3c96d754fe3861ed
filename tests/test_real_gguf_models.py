"""Real GGUF files (Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M, Q4_K_M) run as ``-m FILE.gguf
--dtype float32 --quantize none`` (converted into a test cache, every tensor dequantized to
float32), against ../shared/reference (see its README):

- Qwen2.5-Coder: greedy ids of the three raw prompts identical to transformers' float32 run on
  the dequantized weights (``transformers_fp32_dequantized``), checked teacher-forced for all
  32 tokens of each and by real cached generation for one; perplexity of gpl-3.txt (llama.cpp
  protocol, n_ctx 512) within 0.05% of transformers'.
- Gemma 3 270M: token ids of the hard strings and of the greedy prompts identical to
  llama.cpp's; perplexity of gpl-3.txt (BOS added, each window's first token replaced by BOS, as
  llama-perplexity does) within 1% of the llama-perplexity binary's 13.8844; every converted
  tensor equal to transformers' own GGUF reading (``load_gguf_checkpoint``); transformers'
  float32 figures on the converted folder (greedy ids of the three prompts, NLL of two windows)
  reproduced (the reference file has llama.cpp's figures only).

The files are found by tests/real_models.py (or the tests are skipped). Slow: about 20 minutes
on 2 busy cores (the two perplexities are most of it; about 6 minutes of CPU time in all).
"""

from __future__ import annotations

import os

import pytest
import torch

from real_models import SHARED, gguf_file, reference

pytestmark = pytest.mark.slow

QWEN, GEMMA = "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"
REFS = {QWEN: "qwen2.5-coder-0.5b.json", GEMMA: "gemma-3-270m.json"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """name -> LoadedModel of the GGUF, float32 (every tensor dequantized: ``--dtype float32
    --quantize none``), converted into a cache of this test module; ``get(name, "auto")``: in
    the GGUF's own precision (the default)."""
    from llmsh.loader import load_model

    cache, paths = {}, {}

    def get(name, quantize="none"):
        if (name, quantize) not in cache:
            path = paths[name] = paths.get(name) or gguf_file(name, tmp_path_factory.mktemp("fetch"))
            old = os.environ.get("LLMSH_HOME")
            os.environ["LLMSH_HOME"] = str(tmp_path_factory.mktemp("home"))
            try:
                cache[name, quantize] = load_model(path, device="cpu", dtype="float32", quantize=quantize,
                                                   auto_pull=False)
            finally:
                if old is None:
                    os.environ.pop("LLMSH_HOME", None)
                else:
                    os.environ["LLMSH_HOME"] = old
        return cache[name, quantize]
    get.gguf_path = paths.__getitem__   # the GGUF file a loaded model came from
    return get


def _gpl3() -> str:
    p = SHARED / "data" / "gpl-3.txt"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    text = p.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text  # llama-perplexity drops one trailing newline


def _ppl(lm, ref):
    from llmsh.perplexity import perplexity_llamacpp

    tok = lm.tokenizer
    ids = tok.encode(_gpl3())
    assert len(ids) == ref["tokens"]
    with torch.no_grad():
        r = perplexity_llamacpp(lm.decoder, ids, 512, bos_id=tok.bos_token_id if tok.add_bos else None)
    assert r.n_tokens == ref["scored"]
    return r.perplexity


def test_qwen_config_as_the_file_says(loaded):
    c = loaded(QWEN).config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.attention_bias, c.tie_word_embeddings, c.sliding_window, c.rope_theta) == \
        ("qwen2", 24, 896, 14, 2, 64, True, False, None, 1e6)


def test_qwen_greedy_ids_equal_transformers_fp32(loaded):
    from llmsh.generate import generate_tokens
    from llmsh.sampling import SamplingParams

    lm = loaded(QWEN)
    for case in reference(REFS[QWEN])["transformers_fp32_dequantized"]["greedy"]:
        prompt, want = case["prompt_ids"], case["ids"]
        assert lm.tokenizer.encode(case["prompt"]) == prompt
        with torch.no_grad():   # teacher-forced: the argmax after each prefix is the next greedy id
            logits = lm.decoder(torch.tensor([prompt + want[:-1]]))[0, len(prompt) - 1:]
        assert logits.argmax(-1).tolist() == want, case["prompt"]
    case = reference(REFS[QWEN])["transformers_fp32_dequantized"]["greedy"][1]  # and generated, cached
    got = list(generate_tokens(lm.decoder, case["prompt_ids"], lm.decoder.new_cache(64),
                               SamplingParams(temperature=0.0), max_new_tokens=32))
    assert got == case["ids"]


def test_qwen_perplexity_within_0_05_percent_of_transformers(loaded):
    ref = reference(REFS[QWEN])["transformers_fp32_dequantized"]["perplexity_c512"]["gpl-3"]
    ppl = _ppl(loaded(QWEN), ref)
    assert abs(ppl / ref["ppl"] - 1) <= 5e-4, (ppl, ref["ppl"])


def test_qwen_own_precision_perplexity_and_kl(loaded):
    """The Q4_K_M file in its own precision (the default: int4 where exact, bfloat16 elsewhere):
    perplexity of gpl-3 (llama.cpp's protocol, n_ctx 512) within 1% of llama.cpp's on the same
    file, and mean KL divergence from the float32 run at most 0.01 nats per token."""
    import math

    ref = reference(REFS[QWEN])["llamacpp"]["perplexity_c512"]["gpl-3"]
    f32, nat = loaded(QWEN), loaded(QWEN, "auto")
    assert getattr(nat.decoder, "quantization", None) == "native"
    ids = torch.tensor(f32.tokenizer.encode(_gpl3()))
    assert len(ids) == ref["tokens"]
    n_ctx, first = 512, 256
    nll, kls = [], []
    with torch.inference_mode():
        for w in range(len(ids) // n_ctx):
            win = ids[w * n_ctx:(w + 1) * n_ctx][None]
            target = win[0, first + 1:]
            lp_ref = torch.log_softmax(f32.decoder(win, logits_from=first)[0, :-1].double(), -1)
            lp_nat = torch.log_softmax(nat.decoder(win, logits_from=first)[0, :-1].double(), -1)
            nll.append(-lp_nat.gather(-1, target[:, None])[:, 0])
            kls.append((lp_ref.exp() * (lp_ref - lp_nat)).sum(-1))
    nll, kl = torch.cat(nll), torch.cat(kls)
    assert nll.numel() == ref["scored"]
    ppl = math.exp(nll.mean().item())
    assert abs(ppl / ref["ppl"] - 1) <= 0.01, (ppl, ref["ppl"])
    assert kl.mean().item() <= 0.01, kl.mean().item()


def test_gemma_config_as_llamacpp_reads_it(loaded):
    c = loaded(GEMMA).config
    assert (c.model_type, c.num_hidden_layers, c.head_dim, c.query_pre_attn_scalar, c.sliding_window,
            c.rope_theta, c.rope_local_theta, c.tie_word_embeddings, c.final_logit_softcapping) == \
        ("gemma3_text", 18, 256, 256.0, 512, 1e6, 1e4, True, None)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]


def test_gemma_token_ids_equal_llamacpp(loaded):
    ref = reference(REFS[GEMMA])["llamacpp"]
    tok = loaded(GEMMA).tokenizer
    assert (tok.bos_token_id, tok.add_bos) == (ref["bos"], True)
    for case in ref["tokenize"]:  # llama.cpp's ids here are without BOS
        assert tok.encode(case["text"], add_bos=False, parse_special=case["parse_special"]) == case["ids"], case
    for g in ref["greedy"]:
        assert tok.encode(g["prompt"]) == g["prompt_ids"], g["prompt"]


def test_gemma_chat_needs_a_template_and_takes_gemma_markup(loaded):
    from llmsh.cli.common import encode_chat, use_chat_template
    from llmsh.session import ChatSession
    from llmsh.template import NoChatTemplateError

    from test_chat_template import GEMMA_TEMPLATE

    lm = loaded(GEMMA)
    assert lm.tokenizer.chat_template is None      # a base model: refused, not prompted with ChatML
    with pytest.raises(NoChatTemplateError):
        ChatSession(lm)
    before = lm.tokenizer.chat_template, lm.tokenizer.chat_template_source
    try:
        use_chat_template(lm, ("gemma.jinja", GEMMA_TEMPLATE))
        ids = encode_chat(lm, [{"role": "user", "content": "What is the capital of France?"}])
    finally:
        lm.tokenizer.chat_template, lm.tokenizer.chat_template_source = before
    # <bos> <start_of_turn> user \n ... <end_of_turn> \n <start_of_turn> model \n: the markup as specials
    tok = lm.tokenizer
    turn, end = (tok.encode(t, add_bos=False, parse_special=True) for t in ("<start_of_turn>", "<end_of_turn>"))
    assert len(turn) == len(end) == 1
    nl = tok.encode("\n", add_bos=False)
    assert ids == ([tok.bos_token_id] + turn + tok.encode("user", add_bos=False) + nl
                   + tok.encode("What is the capital of France?", add_bos=False) + end + nl
                   + turn + tok.encode("model", add_bos=False) + nl)


def test_gemma_perplexity_within_1_percent_of_llamacpp(loaded):
    ref = reference(REFS[GEMMA])["llamacpp"]["perplexity_c512"]["gpl-3"]
    ppl = _ppl(loaded(GEMMA), ref)
    assert abs(ppl / ref["llama-perplexity_binary"] - 1) <= 0.01, (ppl, ref["llama-perplexity_binary"])


def test_gemma_weights_equal_transformers_gguf_loader(loaded):
    """Every converted tensor (norms minus one included) equals transformers' own GGUF reading."""
    tf = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    lm = loaded(GEMMA)
    path = loaded.gguf_path(GEMMA)
    meta = load_gguf_checkpoint(str(path))["config"]
    with torch.device("meta"):
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**{k: v for k, v in meta.items()
                                                            if k not in ("model_type", "architectures")}))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    ours = load_file(str(lm.path / "model.safetensors"))
    assert set(ours) == set(theirs)
    for k, t in ours.items():
        assert torch.equal(t, torch.as_tensor(theirs[k]).float()), k


def test_gemma_matches_transformers_fp32_on_the_folder(loaded):
    """transformers' float32 figures on the converted folder: greedy ids of the three prompts
    (32 tokens) and the llama.cpp-protocol NLL of gpl-3's first two windows."""
    from transformers import AutoModelForCausalLM

    lm = loaded(GEMMA)
    hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    with torch.no_grad():
        for g in reference(REFS[GEMMA])["llamacpp"]["greedy"]:
            prompt = g["prompt_ids"]
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
            ours = lm.decoder(torch.tensor([prompt + want[:-1]]))[0, len(prompt) - 1:].argmax(-1).tolist()
            assert ours == want, g["prompt"]
        ids = torch.tensor(lm.tokenizer.encode(_gpl3())[:1024]).view(2, 512)
        ids[:, 0] = lm.tokenizer.bos_token_id
        nll = [torch.nn.functional.cross_entropy(lg[:, 255:511].reshape(-1, lg.shape[-1]), ids[:, 256:].reshape(-1))
               for lg in (hf(ids).logits, lm.decoder(ids))]
    assert abs(float(nll[1] - nll[0])) <= 5e-4, nll   # perplexity = exp(NLL): within 0.05%
