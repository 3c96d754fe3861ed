"""GGUF tokenizer metadata -> the files of a tokenizer that :mod:`llmsh.tokenizer` loads.

Reference behaviour: llama.cpp's reading of a GGUF vocabulary (``src/llama-vocab.cpp``): its
token ids are the ones we must reproduce, not transformers' GGUF conversion. Two vocabulary kinds:

* ``gpt2`` (byte-level BPE): ``tokenizer.json`` built with Hugging Face ``tokenizers`` from the
  tokens and ``tokenizer.ggml.merges``, with the pre-tokenizer regexes llama.cpp applies for the
  file's ``tokenizer.ggml.pre`` name (:data:`PRE_TOKENIZERS`; unknown names are refused, never
  guessed). Control and unknown tokens (``token_type`` 3, 2) become special added tokens (matched
  only when parsing markup), user-defined ones (4) plain added tokens (always matched), as
  llama.cpp's ``tokenizer_st_partition`` does.
* ``llama`` (sentencepiece, e.g. Gemma 3): ``tokenizer.model``, a sentencepiece ``ModelProto``
  of type BPE holding the tokens, scores and types, so sentencepiece merges by score exactly as
  llama.cpp's SPM tokenizer does (highest score first, leftmost on ties, byte fallback to
  ``<0xNN>``); normalizer "identity" with whitespace escaped to "▁" and a dummy prefix only when
  ``tokenizer.ggml.add_space_prefix`` says so (llama.cpp's default for SPM: true; Gemma's file:
  false). Control/unknown/user-defined tokens are listed in tokenizer_config.json's
  ``added_tokens_decoder`` so they are split out of the raw text first, as llama.cpp does.

Both write ``tokenizer_config.json`` (bos/eos/unk/pad, ``add_bos_token``/``add_eos_token`` from
the file or llama.cpp's default for the vocabulary, ``chat_template`` when the file has one) and
``generation_config.json`` (bos, the end-of-generation ids, pad). Only metadata is read: tensors
are never touched (``gguf.GGUFReader`` memory-maps the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError

# llama.cpp token types (llama_token_type); sentencepiece's ModelProto uses the same numbers
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """What llama.cpp does for one ``tokenizer.ggml.pre`` name (llm_tokenizer_bpe + vocab load).

    regexes: applied in order, each splitting every piece the previous left (matches and the
    text between them both kept); ignore_merges: a whole pre-token found in the vocabulary is
    taken as is; add_bos: the default when the file has no ``tokenizer.ggml.add_bos_token``.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_LLAMA3 = PreTokenizer((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
#: Verified names only (each one has a test). Aliases are the names llama.cpp maps to the same type.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": PreTokenizer((GPT2_REGEX,)),
    "smollm": PreTokenizer((r"\p{N}", GPT2_REGEX)),
    "qwen2": PreTokenizer((QWEN2_REGEX,)),
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3,
}

# llama.cpp marks tokens with these texts end-of-generation (llama_vocab::impl::load, special_eog_ids)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
              "<|end_of_text|>", "<EOT>")


def read_metadata(gguf_path) -> dict:
    """The tokenizer keys of a GGUF file (``tokenizer.*``, ``general.architecture``, context length).

    Reads metadata only; tensor data is neither read nor dequantized. Raises ConvertError for a
    file that cannot be read as GGUF.
    """
    import struct

    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except (OSError, ValueError, IndexError, struct.error) as e:
        raise ConvertError(f"cannot read GGUF file {gguf_path}: {e}") from None
    arch = reader.fields.get("general.architecture")
    arch = arch.contents() if arch is not None else None
    keep = ("general.architecture", f"{arch}.context_length")
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.") or k in keep}


def tokenizer_files(meta: dict) -> dict[str, bytes]:
    """File name -> content of the tokenizer files for GGUF metadata ``meta`` (key -> value).

    gpt2-type: tokenizer.json; llama-type: tokenizer.model; both: tokenizer_config.json and
    generation_config.json. Raises ConvertError for other vocabulary kinds, an unverified
    pre-tokenizer name, or inconsistent token arrays.
    """
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConvertError("GGUF file has no tokenizer.ggml.tokens")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) < len(tokens):
        raise ConvertError(f"GGUF token_type has {len(types)} entries for {len(tokens)} tokens")
    if len(set(tokens)) != len(tokens):
        raise ConvertError("GGUF vocabulary has duplicate tokens")
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ConvertError(f"GGUF pre-tokenizer {pre!r} is not supported "
                               f"(supported: {', '.join(PRE_TOKENIZERS)})")
        add_bos_default = PRE_TOKENIZERS[pre].add_bos
        files = {"tokenizer.json": _bpe_tokenizer(meta, tokens, types, PRE_TOKENIZERS[pre], add_bos_default)}
    elif kind == "llama":
        add_bos_default = True  # llama.cpp's default for SPM vocabularies
        files = {"tokenizer.model": _spm_model(meta, tokens, types)}
    else:
        raise ConvertError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    tconf, gconf = _configs(meta, tokens, types, kind, add_bos_default)
    for name, data in (("tokenizer_config.json", tconf), ("generation_config.json", gconf)):
        files[name] = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return files


def write_tokenizer(meta: dict, folder) -> Path:
    """Write :func:`tokenizer_files` into ``folder`` (created if needed); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files(meta).items():
        (folder / name).write_bytes(data)
    return folder


def _add_bos(meta: dict, default: bool) -> bool:
    v = meta.get("tokenizer.ggml.add_bos_token")
    return bool(default if v is None else v)


def _bpe_tokenizer(meta, tokens, types, pre: PreTokenizer, add_bos_default: bool) -> bytes:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if cut < 0:
            raise ConvertError(f"GGUF merge {m!r} has no space")
        merges.append((m[:cut], m[cut + 1:]))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types[:len(tokens)]) if t == USER_DEFINED])
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types[:len(tokens)]) if t in (CONTROL, UNKNOWN)])
    bos_id, eos_id = _token_id(meta, "bos", tokens), _token_id(meta, "eos", tokens)
    single, special = "$A", {}
    if _add_bos(meta, add_bos_default) and bos_id is not None:
        single, special = f"{tokens[bos_id]} $A", {tokens[bos_id]: bos_id}
    if meta.get("tokenizer.ggml.add_eos_token") and eos_id is not None:
        single += f" {tokens[eos_id]}"
        special[tokens[eos_id]] = eos_id
    if special:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(special.items()))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str().encode("utf-8")


def _spm_model(meta, tokens, types) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = list(types[:len(tokens)])
    unk = _token_id(meta, "unknown", tokens)
    if UNKNOWN not in types:  # sentencepiece needs exactly one; converters often mark <unk> CONTROL
        unk = 0 if unk is None else unk  # llama.cpp's SPM default unk id
        types[unk] = UNKNOWN
    m = pb.ModelProto()
    for text, score, typ in zip(tokens, scores, types):
        if typ not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
            typ = NORMAL  # llama.cpp treats undefined types as plain tokens of the vocabulary
        m.pieces.add(piece=text, score=float(score), type=typ)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = BYTE in types
    ts.unk_id = types.index(UNKNOWN)
    ts.unk_piece = tokens[ts.unk_id]
    for key, field in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        i = _token_id(meta, key, tokens)
        setattr(ts, f"{field}_id", -1 if i is None else i)
        if i is not None:
            setattr(ts, f"{field}_piece", tokens[i])
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    ns.escape_whitespaces = True
    return m.SerializeToString()


def _token_id(meta: dict, key: str, tokens) -> int | None:
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return int(i) if i is not None and 0 <= int(i) < len(tokens) else None


def eog_ids(meta: dict, tokens, types) -> list[int]:
    """End-of-generation ids as llama.cpp collects them: eos, eot and eom ids from the file, then
    control tokens whose text llama.cpp treats as an end of turn (``<end_of_turn>``, ``<|im_end|>``...)."""
    ids = [_token_id(meta, k, tokens) for k in ("eos", "eot", "eom")]
    ids += [i for i, t in enumerate(tokens) if t in _EOG_TEXTS and types[i] == CONTROL]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _configs(meta, tokens, types, kind, add_bos_default) -> tuple[dict, dict]:
    def tok(key):
        i = _token_id(meta, key, tokens)
        return tokens[i] if i is not None else None

    arch = meta.get("general.architecture")
    tconf = {
        "tokenizer_class": "PreTrainedTokenizerFast" if kind == "gpt2" else "LlamaTokenizer",
        "bos_token": tok("bos"), "eos_token": tok("eos"), "pad_token": tok("padding"),
        "unk_token": tok("unknown"),
        "add_bos_token": _add_bos(meta, add_bos_default),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{arch}.context_length") or 2048),
    }
    if kind == "llama":
        # split out of the raw text before sentencepiece runs: control/unknown only when parsing
        # markup, user-defined always (llama.cpp tokenizer_st_partition)
        tconf["added_tokens_decoder"] = {
            str(i): {"content": tokens[i], "special": types[i] != USER_DEFINED, "lstrip": False,
                     "rstrip": False, "normalized": False, "single_word": False}
            for i in range(len(tokens)) if types[i] in (CONTROL, UNKNOWN, USER_DEFINED)}
    if meta.get("tokenizer.chat_template"):
        tconf["chat_template"] = meta["tokenizer.chat_template"]
    eos = eog_ids(meta, tokens, types)
    gconf = {"bos_token_id": _token_id(meta, "bos", tokens),
             "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
             "pad_token_id": _token_id(meta, "padding", tokens)}
    return tconf, gconf
