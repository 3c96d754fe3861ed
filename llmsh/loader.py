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
) -> LoadedModel:
    """Resolve ``model`` and load it.

    Args:
        model: a model folder, a ``.gguf`` file (converted once into the cache), a registry name
            such as ``smollm2-135m-instruct``, or None for the default model.
        device: ``auto`` (cuda, then mps, then cpu), or a torch device string.
        dtype: ``auto`` (float32 on CPU, bfloat16 on GPUs), ``float32``, ``bfloat16``, ``float16``.
        notice: called with one-line messages for the user (e.g. "pulling the default model").
        auto_pull: pull a registry model that is not cached yet.
        quantize: None, ``"int8"`` or ``"int4"``: weight-only quantization while loading (CPU
            only; see :func:`llmsh.weights.load_decoder`). ``"none"`` is the same as None.
        tensor_parallel: a :class:`llmsh.distributed.Dist`: this rank's share of the model
            (:func:`llmsh.distributed.load_tp_decoder`); rank 0 resolves (and pulls) the model.

    Raises:
        ModelNotFoundError, ConfigError, WeightsError, TokenizerError, ConvertError.
    """
    from . import hub
    from .config import ModelConfig
    from .tokenizer import Tokenizer
    from .weights import load_decoder

    t0 = time.perf_counter()
    quantize = None if quantize in (None, "none") else quantize
    tp = tensor_parallel
    if tp is None:
        path = hub.resolve_model(model if model is not None else hub.DEFAULT_MODEL,
                                 auto_pull=auto_pull, notice=notice)
    else:           # one pull, by rank 0; the others wait for its answer
        from .distributed import load_tp_decoder, plan

        path = tp.broadcast(_resolve_or_error(hub, model, auto_pull, notice) if tp.rank == 0 else None)
        if isinstance(path, Exception):
            raise path
    config = ModelConfig.from_file(path)
    tokenizer = Tokenizer.from_dir(path)
    if tp is None:
        decoder = load_decoder(path, config, device=device, dtype=dtype, quantize=quantize)
    else:
        shard = plan(config, tp.world)[tp.rank]          # refuses an impossible split before reading
        decoder = load_tp_decoder(path, config, shard, device=device, dtype=dtype, quantize=quantize)
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


def _resolve_or_error(hub, model, auto_pull, notice):
    """The resolved model path, or the one-line error resolving it raised (to broadcast)."""
    from .errors import LlmshError

    try:
        return hub.resolve_model(model if model is not None else hub.DEFAULT_MODEL,
                                 auto_pull=auto_pull, notice=notice)
    except LlmshError as e:
        return e
