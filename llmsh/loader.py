"""Load a model by name or path into a ready-to-run bundle: config, decoder, tokenizer, defaults.

This is the one place that ties the model-folder modules together; the CLI and the REPL call
:func:`load_model` and never open model files themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError


@dataclass
class LoadedModel:
    """A model ready to run.

    Attributes:
        path: the model folder (a converted GGUF or a pulled model lives in the cache).
        config: :class:`llmsh.config.ModelConfig`.
        decoder: :class:`llmsh.models.Decoder`, in eval mode, on ``device`` in ``dtype``.
        tokenizer: :class:`llmsh.tokenizer.Tokenizer`.
        generation_config: the folder's generation_config.json as a dict (empty if absent).
        device, dtype: where the weights live and the compute (activation, KV cache) dtype
            (torch.device, torch.dtype); quantized weights are stored in int8/int4.
        load_seconds: wall time of :func:`load_model`, in seconds.
    """

    path: Path
    config: Any
    decoder: Any
    tokenizer: Any
    generation_config: dict = field(default_factory=dict)
    device: Any = None
    dtype: Any = None
    load_seconds: float = 0.0

    @property
    def name(self) -> str:
        """The model's name for people (registry name, .gguf file name or folder name)."""
        from .hub import display_name

        return display_name(self.path)

    @property
    def n_ctx_max(self) -> int:
        """The model's trained context length in tokens (``max_position_embeddings``)."""
        return int(self.config.max_position_embeddings)

    @property
    def eos_ids(self) -> list[int]:
        """Token ids that end a reply: the tokenizer's EOS ids (merged with generation_config's)."""
        return list(self.tokenizer.eos_token_ids)


def read_generation_config(model_dir: Path) -> dict:
    """Return generation_config.json of ``model_dir`` as a dict, ``{}`` when absent.

    Raises:
        ConfigError: the file exists but is not valid JSON.
    """
    from .config import read_json_object

    return read_json_object(Path(model_dir) / "generation_config.json", ConfigError)


def load_model(
    model: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    notice: Callable[[str], None] | None = None,
    auto_pull: bool = True,
    quantize: str | None = None,
    tensor_parallel=None,
    progress=None,
) -> LoadedModel:
    """Resolve ``model`` and load it.

    Args:
        model: a model folder, a ``.gguf`` file (converted once into the cache), a registry name
            such as ``smollm2-135m-instruct``, or None for the default model.
        device: ``auto`` (cuda, then mps, then cpu), or a torch device string.
        dtype: ``auto`` (float32 on CPU, bfloat16 on GPUs), ``float32``, ``bfloat16``, ``float16``.
        notice: called with one-line messages for the user (e.g. "pulling the default model").
        auto_pull: pull a registry model that is not cached yet.
        quantize: None or ``"auto"``: the weights' own precision — a GGUF on CPU stays int4 /
            int8 where its blocks map exactly and is widened to bfloat16 elsewhere
            (:mod:`llmsh.gguf_precision`); a float checkpoint is cast to ``dtype``. ``"none"``:
            float weights in ``dtype`` (a GGUF dequantized: with float32, the reference).
            ``"int8"`` / ``"int4"``: weight-only quantization of the float weights while loading
            (CPU only; see :func:`llmsh.weights.load_decoder`).
        tensor_parallel: a :class:`llmsh.distributed.Dist`: this rank's share of the model
            (:func:`llmsh.distributed.load_tp_decoder`); rank 0 resolves (and pulls) the model.
        progress: ``(stage, done, total)`` callback of a pull or a conversion, if one happens
            (:data:`llmsh.hub.Progress`: bytes downloaded and verified, tensors converted).

    Raises:
        ModelNotFoundError, ConfigError, WeightsError, TokenizerError, ConvertError.
    """
    from .config import ModelConfig
    from .tokenizer import Tokenizer

    t0 = time.perf_counter()
    precision = precision_for(device, quantize, tensor_parallel)
    path = resolve_path(model, auto_pull=auto_pull, notice=notice, tensor_parallel=tensor_parallel,
                        progress=progress, precision=precision)
    config = ModelConfig.from_file(path)
    tokenizer = Tokenizer.from_dir(path)
    decoder = build_decoder(path, config, device=device, dtype=dtype, quantize=quantize,
                            tensor_parallel=tensor_parallel)
    _trim_heap()
    param = next(decoder.parameters())
    return LoadedModel(
        path=Path(path),
        config=config,
        decoder=decoder,
        tokenizer=tokenizer,
        generation_config=read_generation_config(path),
        device=param.device,
        dtype=getattr(decoder, "compute_dtype", param.dtype),   # quantized weights are int8/uint8
        load_seconds=time.perf_counter() - t0,
    )



def _trim_heap() -> None:
    """Give the loader's freed temporaries back to the OS (glibc keeps freed heap pages, and they
    count in RSS for the rest of the run). Best effort: a no-op without glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)     # no find_library: it runs ldconfig
    except (OSError, AttributeError):
        pass


def precision_for(device, quantize, tensor_parallel=None) -> str:
    """The precision a GGUF-derived model is loaded in (:mod:`llmsh.gguf_precision`): ``native``
    (the file's own) on CPU when no quantization or float weights were asked for (``quantize``
    None or "auto"), one process; else ``float32`` (dequantized, then cast or quantized)."""
    from .weights import resolve_device

    if quantize not in (None, "auto") or tensor_parallel is not None:
        return "float32"
    dev = device if hasattr(device, "type") else resolve_device(device)
    return "native" if dev.type == "cpu" else "float32"


def resolve_path(model, *, auto_pull: bool = True, notice: Callable[[str], None] | None = None,
                 tensor_parallel=None, progress=None, precision: str = "native") -> Path:
    """The folder of ``model`` (None: the default model) in ``precision`` (see
    :func:`precision_for`), pulled or converted if needed. In a group (``tensor_parallel``, a
    :class:`llmsh.distributed.Dist`) rank 0 alone resolves (one pull) and the others get its
    answer, or its error.

    Raises:
        ModelNotFoundError, PullError, ConvertError: as :func:`llmsh.hub.resolve_model`.
    """
    from . import hub
    from .errors import LlmshError

    def resolve():
        return hub.resolve_model(model if model is not None else hub.DEFAULT_MODEL,
                                 auto_pull=auto_pull, notice=notice, progress=progress,
                                 precision=precision)

    if tensor_parallel is None:
        return resolve()
    answer = None
    if tensor_parallel.rank == 0:
        try:
            answer = resolve()
        except LlmshError as e:       # sent to the other ranks, so every rank fails alike
            answer = e
    answer = tensor_parallel.broadcast(answer)
    if isinstance(answer, Exception):
        raise answer
    return answer


def build_decoder(path, config, *, device="auto", dtype="auto", quantize: str | None = None,
                  tensor_parallel=None):
    """The decoder of the folder ``path``: :func:`llmsh.weights.load_decoder`, or in a group
    this rank's share (:func:`llmsh.distributed.load_tp_decoder`; an impossible split is refused
    before any weight is read). ``quantize``: None / "auto" (the folder's own precision), "none"
    (float weights: a folder in a GGUF's own precision is dequantized), "int8" or "int4"."""
    if quantize == "none" and tensor_parallel is None:
        from .gguf_precision import load_manifest
        from .weights import load_decoder

        if load_manifest(path) is not None:    # float weights asked for: nothing kept quantized
            return load_decoder(path, config, device=device, dtype=dtype, quantize=None, keep_stored=False)
    quantize = None if quantize in (None, "none", "auto") else quantize
    if tensor_parallel is None:
        from .weights import load_decoder

        return load_decoder(path, config, device=device, dtype=dtype, quantize=quantize)
    from .distributed import load_tp_decoder, plan

    shard = plan(config, tensor_parallel.world)[tensor_parallel.rank]
    return load_tp_decoder(path, config, shard, device=device, dtype=dtype, quantize=quantize)
