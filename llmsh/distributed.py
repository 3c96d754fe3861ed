"""More than one process over ``torch.distributed``: tensor parallelism and sharded scoring.

Tensor parallelism (TP) follows Megatron-LM (Shoeybi et al., 2019): q/k/v and gate/up are split
column-wise by whole heads (each KV head with its group of query heads) and by rows of the MLP,
o_proj and down_proj row-wise with one all-reduce of their outputs each; embeddings, norms and
lm_head are replicated. Each rank's decoder is an ordinary :class:`llmsh.models.Decoder` of a
narrower config (fewer heads, a smaller intermediate size; same head_dim and hidden_size), filled
with its own slices of the checkpoint, read with safetensors' slicing so no rank reads the whole
file; forward hooks add the all-reduces. After the all-reduces every rank holds the same hidden
states, hence the same logits: every rank samples with the same seed (rank 0's, broadcast once)
and reaches the same token without a broadcast per step.

Where the KV-head count does not divide by the world size, ranks take uneven shares (3 KV heads
over 2 ranks: 2 + 1). A world larger than the KV-head count is refused (KV heads are not
replicated) before any weight is read.

Sharded scoring (data parallel, DP) is in :mod:`llmsh.perplexity` (``shard=``): ranks take
turns over the batches of windows; :meth:`Dist.gather` brings the partial sums to every rank,
which adds them in the single-process order.

The process group is made from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, …), gloo
on CPU and NCCL on CUDA. :func:`launch` starts the other ranks of ``--tp N`` on this machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

_ACTIVE: "Dist | None" = None
# A collective waits this long for a peer before failing (a dead peer usually fails it at once:
# its sockets close).
TIMEOUT_S = 60


@dataclass
class Dist:
    """This process's place in the group: rank (0 … world−1) and world size."""

    rank: int
    world: int
    backend: str

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order, on every rank (pickled; small objects only)."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it), 1 when absent or invalid."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def active() -> Dist | None:
    """The initialised group of this process, or None for a single process."""
    return _ACTIVE


def init(device_type: str = "cpu") -> Dist | None:
    """Join the process group described by the environment (once); None when WORLD_SIZE <= 1.

    Raises:
        InputError: the rendezvous fails (a one-line reason).
    """
    global _ACTIVE
    if _ACTIVE is not None or env_world_size() <= 1:
        return _ACTIVE
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    except Exception as e:  # rendezvous errors come as RuntimeError, ValueError, DistNetworkError
        raise InputError(f"cannot join the process group: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    _ACTIVE = Dist(dist.get_rank(), dist.get_world_size(), backend)
    return _ACTIVE


def shutdown() -> None:
    """Leave the process group (no-op for a single process)."""
    global _ACTIVE
    if _ACTIVE is None:
        return
    import torch.distributed as dist

    try:
        dist.destroy_process_group()
    except Exception:  # a peer that already died: nothing left to tear down cleanly
        pass
    _ACTIVE = None


# ----------------------------------------------------------------------------- the split

@dataclass(frozen=True)
class Shard:
    """One rank's slice of every block: KV heads [kv0, kv0+n_kv), query heads [q0, q0+n_q),
    MLP rows [i0, i0+n_i) (units: heads, heads, rows)."""

    rank: int
    world: int
    kv0: int
    n_kv: int
    q0: int
    n_q: int
    i0: int
    n_i: int


def _shares(total: int, world: int, unit: int = 1) -> list[tuple[int, int]]:
    """(start, count) of each rank over ``total`` items in multiples of ``unit`` where possible,
    the larger shares first (3 over 2: (0, 2), (2, 1))."""
    units, rest = divmod(total, unit)
    base, extra = divmod(units, world)
    out, start = [], 0
    for r in range(world):
        n = (base + (r < extra)) * unit + (rest if r == world - 1 else 0)
        out.append((start, n))
        start += n
    return out


def plan(config, world: int) -> list[Shard]:
    """Every rank's :class:`Shard` of ``config`` (a :class:`llmsh.config.ModelConfig`).

    MLP rows are split in multiples of 32 where they can be, so that int4 groups (32 columns
    of down_proj) never straddle two ranks.

    Raises:
        InputError: ``world`` < 1, or larger than the number of KV heads.
    """
    kv, h = config.num_key_value_heads, config.num_attention_heads
    if world < 1:
        raise InputError(f"--tp must be at least 1, got {world}")
    if world > kv:
        raise InputError(f"--tp {world}: the model has {kv} key/value heads, so at most {kv} ranks "
                         f"can share its attention (heads are split whole, with their KV group)")
    group = h // kv
    inter = _shares(config.intermediate_size, world, 32 if config.intermediate_size >= 32 * world else 1)
    return [Shard(r, world, k0, nk, k0 * group, nk * group, i0, ni)
            for r, ((k0, nk), (i0, ni)) in enumerate(zip(_shares(kv, world), inter))]


def local_config(config, shard: Shard):
    """The config of one rank's narrower decoder (same head_dim, hidden_size and layers)."""
    return dataclasses.replace(config, num_attention_heads=shard.n_q, num_key_value_heads=shard.n_kv,
                               intermediate_size=shard.n_i, head_dim=config.head_dim)


# Checkpoint names (after the family's checkpoint_name) -> how a rank slices them. "q"/"kv"/"mlp":
# rows (dimension 0 of nn.Linear's (out, in)) by query heads, KV heads or MLP rows; "o"/"down":
# columns (dimension 1), with the bias kept on rank 0 only (it must be added once, after the sum).
# gpt2's c_attn holds q, k and v stacked by rows: "qkv". Conv1D weights are (in, out) on disk.
_RULES = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv",
    "self_attn.o_proj": "o", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "down",
    "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "mlp", "mlp.c_proj": "down",
}
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj", "attn.c_proj", "mlp.c_proj")


def _rule(name: str) -> tuple[str | None, str]:
    """(rule, "weight"|"bias") of our parameter ``name`` (rule None: replicated)."""
    stem, _, leaf = name.rpartition(".")
    for suffix, rule in _RULES.items():
        if stem.endswith("." + suffix):
            return rule, leaf
    return None, leaf


def _slice(sl, rule: str, leaf: str, shard: Shard, config, transposed: bool):
    """The rank's part of one checkpoint tensor through safetensors' slice object ``sl``."""
    import torch

    d = config.head_dim
    rows = {"q": (shard.q0 * d, shard.n_q * d), "kv": (shard.kv0 * d, shard.n_kv * d),
            "o": (shard.q0 * d, shard.n_q * d), "mlp": (shard.i0, shard.n_i),
            "down": (shard.i0, shard.n_i)}
    if rule == "qkv":                          # [q; k; v] rows (gpt2: kv heads == q heads)
        c = config.hidden_size
        a, n = shard.q0 * d, shard.n_q * d
        parts = [sl[:, j * c + a: j * c + a + n] if transposed and leaf == "weight" else sl[j * c + a: j * c + a + n]
                 for j in range(3)]
        t = torch.cat(parts, dim=1 if transposed and leaf == "weight" else 0)
        return t.t().contiguous() if transposed and leaf == "weight" else t
    a, n = rows[rule]
    if rule in ("o", "down"):
        if leaf == "bias":                     # added once, after the all-reduce
            t = sl[:]
            return t if shard.rank == 0 else torch.zeros_like(t)
        t = sl[a:a + n] if transposed else sl[:, a:a + n]
    else:
        t = sl[:, a:a + n] if transposed and leaf == "weight" else sl[a:a + n]
    return t.t().contiguous() if transposed and leaf == "weight" else t


def load_tp_decoder(model_dir, config, shard: Shard, *, device="auto", dtype="auto",
                    quantize: str | None = None, group=None):
    """This rank's decoder: the narrower :func:`local_config` filled with its own slices of the
    safetensors checkpoint in ``model_dir``, fused, optionally quantized (int8/int4, split along
    the same axes: quantization runs on the slices), with all-reduce hooks on the row-parallel
    projections. Logits are those of the whole model.

    Raises:
        WeightsError: as :func:`llmsh.weights.load_decoder` (missing files or tensors, shapes).
    """
    import torch
    from safetensors import safe_open

    from .checkpoint import checkpoint_files
    from .errors import WeightsError
    from .models.decoder import Decoder
    from .weights import _our_name, _transposed, resolve_device, resolve_dtype

    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    dt = resolve_dtype(dtype, dev)
    lc = local_config(config, shard)
    with torch.device("meta"):
        decoder = Decoder(lc)
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    if lc.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state = {}
    by_file: dict[Path, list[str]] = {}
    for key, path in checkpoint_files(model_dir).items():
        by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:
            raise WeightsError(f"{path}: cannot read safetensors file ({str(e).splitlines()[0]})") from None
        for key in keys:
            ours = _our_name(config, key)
            if ours is None:
                continue
            if ours not in expected:
                raise WeightsError(f"{path}: unexpected tensor {ours!r} for a {config.model_type} model")
            rule, leaf = _rule(ours)
            sl = f.get_slice(key)
            t = sl[:] if rule is None else _slice(sl, rule, leaf, shard, config,
                                                  _transposed(config, ours))
            if rule is None and _transposed(config, ours):
                t = t.t().contiguous()
            if tuple(t.shape) != expected[ours]:
                raise WeightsError(f"{path}: tensor {ours!r} has shape {tuple(t.shape)} on rank "
                                   f"{shard.rank}, config expects {expected[ours]}")
            state[ours] = t.to(dt) if t.is_floating_point() else t
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(f"{Path(model_dir)}: tensor {missing[0]!r} missing from the checkpoint")
    if lc.tie_word_embeddings:
        state["lm_head.weight"] = state[f"{decoder.prefix}.{decoder.backbone.embed_name}.weight"]
    decoder.load_state_dict(state, strict=True, assign=True)
    decoder.tie_weights()
    decoder.fuse_projections()
    if quantize:
        quantize_loaded(decoder, quantize, dt)
    decoder.to(device=dev, dtype=dt)
    decoder.requires_grad_(False)
    decoder.compute_dtype = dt
    add_all_reduce(decoder, group)
    decoder.tensor_parallel = shard
    return decoder.eval()


def quantize_loaded(decoder, mode: str, dtype) -> None:
    """Quantize a loaded float decoder in place as :func:`llmsh.quant.swap_modules` lays out."""
    from torch import nn

    from . import quant

    floats = {n: m for n, m in decoder.named_modules() if isinstance(m, nn.Linear)}
    embed = decoder.embed_tokens
    quant.swap_modules(decoder, mode, dtype)
    for name, old in floats.items():
        new = decoder.get_submodule(name)
        bufs = quant.quantize_tensor(new, old.weight.detach().float(), dtype)
        if old.bias is not None:
            bufs["bias"] = old.bias.detach().to(dtype)
        new.load_state_dict(bufs, strict=True, assign=True)
    new = decoder.embed_tokens
    new.load_state_dict(quant.quantize_tensor(new, embed.weight.detach().float(), dtype), assign=True)
    quant.tie(decoder)


def add_all_reduce(decoder, group=None) -> None:
    """Sum the outputs of every row-parallel projection over the group (forward hooks)."""
    import torch.distributed as dist

    def hook(module, args, out):
        dist.all_reduce(out, group=group)
        return out

    for name, mod in decoder.named_modules():
        if name.endswith(ROW_PARALLEL):
            mod.register_forward_hook(hook)


# ----------------------------------------------------------------------------- launching

def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, argv: list[str]) -> list[subprocess.Popen]:
    """Make this process rank 0 of ``n`` on this machine: set the rendezvous environment and
    start ranks 1 … n−1 as ``python -m llmsh ARGV`` with no stdin and silent stdout (their
    errors still reach stderr). Returns the children (wait for them at exit)."""
    port = free_port()
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n),
                LLMSH_TP_CHILD="1")
    children = []
    for r in range(1, n):
        env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
        children.append(subprocess.Popen([sys.executable, "-m", "llmsh", *argv], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    os.environ.update(base, RANK="0", LOCAL_RANK="0")
    return children
