"""Pieces shared by the click commands: model and sampling options, loading, prompt input.

Nothing here imports torch at import time; the engine modules are imported inside functions.
"""

from __future__ import annotations

import contextlib
import re

import click

from . import output

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ["auto", "float32", "bfloat16", "float16"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _check_device(ctx, param, value):
    if value is not None and not DEVICE_RE.match(value):
        raise click.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


def model_options(f):
    """``-m/--model``, ``--device``, ``--dtype``: every command that runs a model takes them."""
    f = click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                     help="Weight and compute dtype; auto = float32 on CPU, bfloat16 on GPUs.")(f)
    f = click.option("--device", default="auto", show_default=True, metavar="DEVICE",
                     callback=_check_device,
                     help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")(f)
    f = click.option("-m", "--model", envvar="LLMSH_MODEL", metavar="MODEL",
                     help="A model folder, a .gguf file, or a registry name "
                          "[env: LLMSH_MODEL; default: the default model, pulled on first use].")(f)
    return f


class SeedType(click.ParamType):
    """A seed: an integer 0 .. 2**63-1, with a message that says so (click's IntRange says
    "not a valid integer range")."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            n = value
        else:
            try:
                n = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not an integer (give a whole number 0 .. 2**63-1)", param, ctx)
        if not 0 <= n < 2**63:
            self.fail(f"{n} is out of range (give a whole number 0 .. 2**63-1)", param, ctx)
        return n


def _check_stops(ctx, param, value):
    if any(s == "" for s in value):
        raise click.BadParameter("a stop string cannot be empty")
    return tuple(arg_text(s, "a --stop value") for s in value)


def stop_option(f):
    """``--stop STR`` (repeatable, non-empty)."""
    return click.option("--stop", multiple=True, metavar="STR", callback=_check_stops,
                        help="Stop when this text appears (it and what follows are not printed). "
                             "Repeatable; not empty.")(f)


ERRORS_CHOICE = click.Choice(["strict", "replace"])


def errors_option(f, what: str = "input"):
    """``--errors strict|replace``: what to do with invalid UTF-8 in stdin, files and arguments."""
    return click.option("--errors", type=ERRORS_CHOICE, default="strict", show_default=True,
                        help=f"What to do with invalid UTF-8 {what}: strict = an error, replace = "
                             "substitute U+FFFD.")(f)


def arg_text(s: str, what: str = "a command-line argument", errors: str = "strict") -> str:
    """Check that a command-line argument is valid UTF-8.

    Python turns argv bytes that are not valid UTF-8 into lone surrogates ("surrogateescape"),
    which the tokenizer rejects with a TypeError; this finds them first.

    Raises:
        InputError: (errors="strict") naming the argument and the byte, as for stdin.
    """
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        data = s.encode("utf-8", "surrogateescape")
        return output.decode_bytes(data, errors=errors, source=what)


def sampling_options(f):
    """Sampling options, range-checked at parse time; None means "the model's default"."""
    opts = [
        click.option("--seed", type=SeedType(), default=None, metavar="N",
                     help="Random seed, for reproducible sampling."),
        click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=None,
                     metavar="X", help="Penalise tokens already present (> 0; 1 = off)."),
        click.option("--min-p", type=click.FloatRange(0, 1), default=None, metavar="P",
                     help="Drop tokens less likely than P times the most likely one (0..1; 0 = off)."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=None, metavar="P",
                     help="Nucleus sampling (0..1; 1 = off, 0 = only the most likely token)."),
        click.option("--top-k", type=click.IntRange(0), default=None, metavar="K",
                     help="Sample among the K most likely tokens (>= 0; 0 = off)."),
        click.option("--temperature", "-t", type=click.FloatRange(0), default=None, metavar="T",
                     help="Sampling temperature (>= 0; 0 = greedy)."),
    ]
    for opt in opts:
        f = opt(f)
    return f


def sampling_params(generation_config: dict, *, chat: bool = False, **overrides):
    """SamplingParams from the model's generation_config.json, then the command-line values.
    ``chat``: chat's defaults (:func:`llmsh.sampling.chat_params`) where the model's file sets
    nothing, instead of transformers' greedy ones."""
    from ..sampling import SamplingParams, chat_params

    try:
        if chat:
            return chat_params(generation_config, **overrides)
        return SamplingParams.from_generation_config(generation_config, **overrides)
    except ValueError as e:  # a bad generation_config.json value
        raise click.UsageError(str(e)) from None


def load(model, device: str, dtype: str, quantize: str | None = None, tensor_parallel=None):
    """Load a model for a command; notices (auto-pull, conversion) go to stderr, and on a terminal
    the progress of a pull (bytes) or a conversion (tensors).
    ``tensor_parallel``: this rank's group (:mod:`llmsh.cli.ranks`), for its share of the model."""
    from ..loader import load_model

    with from_environment(), output.stage_progress() as progress:  # bars only if it pulls/converts
        return load_model(model, device=device, dtype=dtype, notice=output.notice,
                          quantize=quantize,
                          tensor_parallel=tensor_parallel, progress=progress)


@contextlib.contextmanager
def from_environment():
    """A bad -m value that came from ``LLMSH_MODEL`` says so, or the user looks for a typo in a
    command line that has no -m."""
    from ..errors import LlmshError

    try:
        yield
    except LlmshError as e:
        ctx = click.get_current_context(silent=True)
        source = ctx.get_parameter_source("model") if ctx is not None else None
        if source is None or source.name != "ENVIRONMENT":
            raise
        raise type(e)(f"{e} (the model came from LLMSH_MODEL={ctx.params.get('model')})") from None


QUANTIZE_CHOICE = click.Choice(["auto", "none", "int8", "int4"])


def quantize_option(f):
    """``--quantize auto|none|int8|int4``: the weights' precision (CPU)."""
    return click.option("--quantize", type=QUANTIZE_CHOICE, default="auto", show_default=True,
                        help="Weight precision. auto: the file's own (a GGUF on CPU stays int4/int8 "
                             "where that is exact, bfloat16 elsewhere; `llmsh info` lists it); "
                             "none: float weights in --dtype (a GGUF dequantized; with --dtype "
                             "float32, the reference); int8 per channel or int4 in groups of 32: "
                             "quantized from the float weights while loading (CPU only).")(f)


def compile_option(f):
    """``--compile/--no-compile``: torch.compile the decode step (default: automatic)."""
    return click.option("--compile/--no-compile", "compile_", default=None,
                        help="torch.compile the decode step (CPU: needs a C compiler; costs a "
                             "compile once per process: about a minute the first time, 15-20 s once cached). Default: "
                             "decode eagerly, and compile once this process has generated as many "
                             "tokens as the compile saves (2048; 1024 once cached) with as many "
                             "still to come by -n and the context; never on a large -n alone.")(f)


def setup_decoding(lm, max_new_tokens: int | None, compile_: bool | None) -> None:
    """``--compile``: compile the decode step of ``lm.decoder`` now (see
    :func:`llmsh.compiled.setup_decoder`; a fallback to eager decoding is one notice). Automatic
    (None): decode eagerly and compile only after enough tokens were actually generated
    (:func:`llmsh.compiled.defer_compile`), never on a large ``max_new_tokens`` alone, since a
    reply may stop long before it. ``max_new_tokens``: the most one reply may generate (None:
    the context)."""
    if compile_ is False:
        return
    from ..compiled import defer_compile, setup_decoder

    if compile_ is None:
        defer_compile(lm.decoder, max_new_tokens=max_new_tokens, notice=output.notice)
        return
    info = setup_decoder(lm.decoder, max_new_tokens=max_new_tokens or 0, compile=compile_,
                         notice=output.notice)
    if info.get("compiled"):
        output.notice(f"compiled the decode step in {info['compile_s']:.1f} s "
                      f"({info.get('cache', 'cold')} inductor cache)")


def read_prompt(args: tuple[str, ...], errors: str = "strict") -> str:
    """The prompt of ``generate``: the arguments joined by spaces, after stdin's content when stdin
    is not a terminal (stdin, then a blank line, then the arguments), as ``llm`` does.

    Raises:
        InputError: both are empty, or stdin or an argument is not valid UTF-8 (errors="strict").
    """
    from ..errors import InputError

    text = arg_text(" ".join(args), "the prompt argument", errors)
    if not output.stdin_is_terminal():
        piped = output.read_stdin(errors=errors)
        if piped.strip():
            piped = piped.rstrip("\r\n") if text else _strip_one_newline(piped)
            text = f"{piped}\n\n{text}" if text else piped
    if not text.strip():
        raise InputError("empty prompt: give it as arguments or on stdin")
    return text


def _strip_one_newline(text: str) -> str:
    # `echo` adds one newline that is not part of the prompt; keep any others.
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def timings(st) -> dict:
    """The timing fields of ``--json`` output (seconds; tokens per second)."""
    return {
        "ttft_s": round(st.ttft_seconds, 6),
        "prefill_s": round(st.prefill_seconds, 6),
        "decode_s": round(st.decode_seconds, 6),
        "total_s": round(st.prefill_seconds + st.decode_seconds, 6),
        "prefill_tokens_per_s": round(st.prefill_tokens_per_s, 3),
        "decode_tokens_per_s": round(st.decode_tokens_per_s, 3),
        "compile_s": round(st.compile_seconds, 6),      # an automatic compile mid-reply
    }


def encode_chat(lm, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` through the model's chat template (or ``--chat-template``'s),
    ready for generation: markup special tokens parsed, message contents taken literally (so
    typed ``<|im_end|>`` stays text), exactly as ``llmsh chat`` encodes a conversation.
    Raises NoChatTemplateError when there is no template (see :func:`require_chat_template`)."""
    from ..session import Message, encode_messages

    return encode_messages(lm, [Message(m["role"], m["content"]) for m in messages])


def _read_template(ctx, param, value):
    if value is None:
        return None
    from ..errors import TemplateError
    from ..template import read_chat_template

    try:
        return value, read_chat_template(arg_text(value, "the --chat-template value"))
    except TemplateError as e:
        raise click.BadParameter(str(e)) from None


def chat_template_option(f):
    """``--chat-template FILE|chatml``: read and compiled at parse time, so the value the command
    gets is ``(FILE, template text)`` or None; :func:`use_chat_template` installs it."""
    return click.option("--chat-template", "chat_template", metavar="FILE", callback=_read_template,
                        help="Chat template to use instead of the model's, and the way to chat with "
                             "a model that has none (a base model): a Jinja file, as Hugging Face's "
                             "chat_template.jinja, or a JSON file with a \"chat_template\" key "
                             "(tokenizer_config.json); the built-in name chatml is ChatML "
                             "(./chatml for a file of that name).")(f)


def use_chat_template(lm, chat_template) -> None:
    """Install ``--chat-template``'s ``(FILE, text)`` on ``lm.tokenizer``, replacing the model's
    template for everything that renders chat (session, generate, server); None leaves it."""
    if chat_template is not None:
        lm.tokenizer.chat_template_source, lm.tokenizer.chat_template = chat_template


def require_chat_template(lm, model: str | None, hint: str) -> None:
    """Refuse chat mode for a model without a chat template, in one line naming the model
    (``model``: the -m value as given; None: the default model's folder) and the way out
    (``hint``). ChatML it never saw would make a base model answer in garbage.

    Raises NoChatTemplateError (exit status 2)."""
    from ..template import NO_TEMPLATE, NoChatTemplateError

    if lm.tokenizer.chat_template is None:
        raise NoChatTemplateError(f"{model or lm.name} {NO_TEMPLATE}: {hint}")
