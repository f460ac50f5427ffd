"""Throughput and accuracy of the built-in embedding worker on this machine, against sentence-transformers.

    /opt/sparkctl-runtime/bin/python benchmarks/bench_embed_local.py [--sentences 512] [--tp 2]

Prints embeddings/s for one fixed batch: sentence-transformers, the worker's TP=1 forward, the worker's
forward at TP=N over gloo between local processes, and the HTTP API with a local backend. Accuracy is the
smallest per-sentence cosine and the largest absolute difference against sentence-transformers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sparkctl.workers import embed

WORDS = [
    "cluster",
    "fabric",
    "spark",
    "tensor",
    "rank",
    "gradient",
    "model",
    "token",
    "embedding",
    "vector",
    "latency",
    "throughput",
    "node",
    "network",
    "parallel",
    "attention",
    "head",
    "layer",
    "norm",
    "pooling",
    "batch",
    "request",
    "server",
    "client",
    "memory",
    "bandwidth",
    "interface",
]


def build_sentences(count: int, seed: int = 7) -> list[str]:
    """A fixed mix of short and long sentences (4 to 120 words)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice((4, 8, 16, 32, 64, 120)))) for _ in range(count)]


def accuracy(actual: torch.Tensor, expected: torch.Tensor) -> str:
    cos = torch.nn.functional.cosine_similarity(actual, expected, dim=1).min().item()
    return f"cos min {cos:.7f}, max abs diff {(actual - expected).abs().max().item():.2e}"


def report(label: str, rate: float, note: str = "") -> None:
    print(f"{label:<28}{rate:8.1f} embeddings/s  {note}".rstrip())


def run_batches(model: embed.TPBert, pooling: embed.PoolingConfig, batches: list[Any]) -> list[torch.Tensor]:
    return [embed.encode(model, pooling, ids, mask) for ids, mask in batches]


def assemble(plan: list[list[int]], outputs: list[torch.Tensor], dim: int) -> torch.Tensor:
    out = torch.empty((sum(len(p) for p in plan), dim))
    for idx, part in zip(plan, outputs, strict=True):
        out[idx] = part
    return out


def _rank(rank: int, world: int, port: int, model_dir: str, batches: Any, repeats: int, out: str) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = embed.load_model_spec(Path(model_dir))
    config, state = embed.load_bert(spec.model_dir)
    shard = embed.shard_state_dict(state, config, rank, world)
    model = embed.TPBert(config, shard, rank, world, embed.build_all_reduce(torch.device("cpu")))
    run_batches(model, spec.pooling, batches[:1])  # warm-up
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        outputs = run_batches(model, spec.pooling, batches)
    elapsed = (time.perf_counter() - start) / repeats
    if rank == 0:
        torch.save({"outputs": outputs, "seconds": elapsed}, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    model_dir = embed.resolve_model_dir(embed.DEFAULT_MODEL)
    spec = embed.load_model_spec(model_dir)
    tokenizer = embed.TextTokenizer(model_dir, spec.max_seq_length, spec.config.pad_token_id)
    sentences = build_sentences(args.sentences)
    tokens = tokenizer.tokenize(sentences)
    plan = embed.plan_batches([len(t) for t in tokens], args.batch_size)
    batches = [embed.build_token_batch([tokens[i] for i in idx], tokenizer.pad_id) for idx in plan]
    n, dim = len(sentences), spec.config.hidden_size
    threads = torch.get_num_threads()
    print(f"{n} sentences, {sum(map(len, tokens))} tokens, batch size {args.batch_size}, {threads} threads")

    st = SentenceTransformer(str(model_dir), device="cpu")
    st.encode(sentences[:8])
    start = time.perf_counter()
    for _ in range(args.repeats):
        reference = st.encode(sentences, batch_size=args.batch_size, convert_to_tensor=True).float()
    seconds = (time.perf_counter() - start) / args.repeats
    report("sentence-transformers", n / seconds)

    config, state = embed.load_bert(model_dir)
    model = embed.TPBert(config, embed.shard_state_dict(state, config, 0, 1))
    run_batches(model, spec.pooling, batches[:1])
    start = time.perf_counter()
    for _ in range(args.repeats):
        outputs = run_batches(model, spec.pooling, batches)
    seconds = (time.perf_counter() - start) / args.repeats
    report("worker TP=1", n / seconds, accuracy(assemble(plan, outputs, dim), reference))

    spawn: Any = importlib.import_module("torch.multiprocessing").spawn  # untyped in torch
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        out = str(Path(tmp) / "tp.pt")
        spawn(_rank, args=(args.tp, port, str(model_dir), batches, args.repeats, out), nprocs=args.tp)
        result = torch.load(out)
    tp_out = assemble(plan, result["outputs"], dim)
    report(f"worker TP={args.tp} (gloo, local)", n / result["seconds"], accuracy(tp_out, reference))

    service = embed.EmbeddingService("minilm", "bench", tokenizer, spec.config, args.batch_size, max(n, 2048))
    service.attach(embed.LocalBackend(spec, "cpu"))
    server, _ = embed.start_http_server(service, "127.0.0.1", 0)
    body = json.dumps({"input": sentences, "model": "minilm", "encoding_format": "base64"}).encode()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/embeddings"
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    start = time.perf_counter()
    for _ in range(args.repeats):
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=600) as resp:
            json.loads(resp.read())
    seconds = (time.perf_counter() - start) / args.repeats
    server.shutdown()
    report("HTTP, local backend", n / seconds, "tokenize + JSON + base64 included")


if __name__ == "__main__":
    main()
