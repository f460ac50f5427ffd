"""The built-in embedding worker: TP math vs sentence-transformers, sharding, the HTTP API, a Ray run."""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")  # the worker extra; CI installs it

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from sparkctl.workers import embed  # noqa: E402 - only importable once torch is known to be there

EMBED_SCRIPT = Path(embed.__file__)
API_KEY = "test-key-0123"
COS_MIN = 0.9999
MAX_ABS = 1e-4

SENTENCES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Two DGX Sparks joined by a 200G fabric serve one model with tensor parallelism.",
    "Ça va? Tokyo is 東京 and naïve café prices are up 3.5%.",
    "short",
    "Attention heads are split across ranks and the partial sums are all-reduced. " * 30,  # > 256 tokens
    "Embeddings, layer norms and pooling are replicated on every rank.",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return embed.resolve_model_dir(embed.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def spec(model_dir: Path) -> embed.ModelSpec:
    return embed.load_model_spec(model_dir)


@pytest.fixture(scope="module")
def tokenizer(spec: embed.ModelSpec) -> embed.TextTokenizer:
    return embed.TextTokenizer(spec.model_dir, spec.max_seq_length, spec.config.pad_token_id)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    return model.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES)).float()


@pytest.fixture(scope="module")
def batch(tokenizer: embed.TextTokenizer) -> tuple[Any, Any]:
    return embed.build_token_batch(tokenizer.tokenize(SENTENCES), tokenizer.pad_id)


def assert_matches(actual: Any, expected: Any) -> None:
    cos = torch.nn.functional.cosine_similarity(actual, expected, dim=1)
    worst = (actual - expected).abs().max().item()
    assert cos.min().item() >= COS_MIN, f"cosine per sentence: {cos.tolist()}"
    assert worst <= MAX_ABS, f"max abs diff {worst}"


# -------------------------------------------------------------------------------------------- model loading


def test_model_spec_reads_pooling_normalize_and_length(spec: embed.ModelSpec) -> None:
    assert spec.pooling == embed.PoolingConfig(mode="mean", normalize=True)
    assert spec.max_seq_length == 256
    assert (spec.config.hidden_size, spec.config.num_attention_heads) == (384, 12)


def test_long_input_is_truncated_to_max_seq_length(tokenizer: embed.TextTokenizer) -> None:
    lengths = [len(t) for t in tokenizer.tokenize(SENTENCES)]
    assert max(lengths) == 256
    assert lengths[0] == 4  # [CLS] hello world [SEP]


def test_unknown_model_name_says_how_to_fix() -> None:
    with pytest.raises(embed.WorkerError) as err:
        embed.resolve_model_dir("no-such-model-dir")
    assert "no such directory" in err.value.message
    assert embed.DEFAULT_MODEL in err.value.hint


def test_parse_pooling_mode_accepts_old_and_new_keys() -> None:
    assert embed.parse_pooling_mode({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}) == "cls"
    assert embed.parse_pooling_mode({"pooling_mode": "mean"}) == "mean"
    with pytest.raises(embed.WorkerError):
        embed.parse_pooling_mode({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})


# ------------------------------------------------------------------------------------------ TP = 1 accuracy


def test_tp1_matches_sentence_transformers(
    model_dir: Path, spec: embed.ModelSpec, batch: tuple[Any, Any], reference: Any
) -> None:
    config, state = embed.load_bert(model_dir)
    model = embed.TPBert(config, embed.shard_state_dict(state, config, 0, 1))
    assert_matches(embed.encode(model, spec.pooling, *batch), reference)


def test_tp1_is_independent_of_padding(model_dir: Path, spec: embed.ModelSpec, tokenizer: Any) -> None:
    config, state = embed.load_bert(model_dir)
    model = embed.TPBert(config, state)
    tokens = tokenizer.tokenize(SENTENCES[:2])
    alone = embed.encode(model, spec.pooling, *embed.build_token_batch(tokens[:1], tokenizer.pad_id))
    padded = embed.encode(model, spec.pooling, *embed.build_token_batch(tokens, tokenizer.pad_id))
    assert_matches(padded[:1], alone)


# -------------------------------------------------------------------------- TP > 1 over real gloo processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tp_rank(rank: int, world: int, port: int, model_dir: str, ids: Any, mask: Any, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the sandbox hostname may not resolve to a usable address
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        spec = embed.load_model_spec(Path(model_dir))
        config, state = embed.load_bert(spec.model_dir)
        shard = embed.shard_state_dict(state, config, rank, world)
        model = embed.TPBert(config, shard, rank, world, embed.build_all_reduce(torch.device("cpu")))
        torch.save(embed.encode(model, spec.pooling, ids, mask), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tp_over_gloo_processes_matches_sentence_transformers(
    world: int, model_dir: Path, batch: tuple[Any, Any], reference: Any, tmp_path: Path
) -> None:
    spawn: Any = importlib.import_module("torch.multiprocessing").spawn  # untyped in torch

    ids, mask = batch
    spawn(_tp_rank, args=(world, _free_port(), str(model_dir), ids, mask, str(tmp_path)), nprocs=world)
    outputs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    cos = torch.nn.functional.cosine_similarity(outputs[0], reference, dim=1).min().item()
    print(f"TP={world} worst cosine {cos:.8f}, max abs diff {(outputs[0] - reference).abs().max().item():.2e}")
    assert_matches(outputs[0], reference)
    for other in outputs[1:]:
        assert torch.equal(other, outputs[0]), "every rank must end with the same replicated result"


# ------------------------------------------------------------------------------------------------- sharding


def test_each_rank_holds_exactly_its_slice(model_dir: Path) -> None:
    config, state = embed.load_bert(model_dir)
    p = "encoder.layer.3."
    shards = [embed.shard_state_dict(state, config, r, 2) for r in range(2)]
    for rank, shard in enumerate(shards):
        heads = slice(rank * 192, (rank + 1) * 192)
        mlp = slice(rank * 768, (rank + 1) * 768)
        for name in ("query", "key", "value"):
            assert torch.equal(
                shard[f"{p}attention.self.{name}.weight"], state[f"{p}attention.self.{name}.weight"][heads]
            )
            assert torch.equal(shard[f"{p}attention.self.{name}.bias"], state[f"{p}attention.self.{name}.bias"][heads])
        assert shard[f"{p}attention.output.dense.weight"].shape == (384, 192)
        assert torch.equal(
            shard[f"{p}attention.output.dense.weight"], state[f"{p}attention.output.dense.weight"][:, heads]
        )
        assert shard[f"{p}intermediate.dense.weight"].shape == (768, 384)
        assert torch.equal(shard[f"{p}intermediate.dense.bias"], state[f"{p}intermediate.dense.bias"][mlp])
        assert shard[f"{p}output.dense.weight"].shape == (384, 768)
        assert torch.equal(shard[f"{p}output.dense.weight"], state[f"{p}output.dense.weight"][:, mlp])
        for replicated in (
            f"{p}attention.output.dense.bias",
            f"{p}output.dense.bias",
            f"{p}output.LayerNorm.weight",
            "embeddings.word_embeddings.weight",
        ):
            assert torch.equal(shard[replicated], state[replicated])
    rebuilt = torch.cat([s[f"{p}output.dense.weight"] for s in shards], dim=1)
    assert torch.equal(rebuilt, state[f"{p}output.dense.weight"])


@pytest.mark.parametrize(("world", "heads_per_rank"), [(3, 4), (4, 3)])
def test_three_and_four_ranks_split_minilm_on_whole_heads(model_dir: Path, world: int, heads_per_rank: int) -> None:
    """MiniLM: 384 hidden, 12 heads of 32, MLP 1536. TP=3 and TP=4 divide both evenly, no uneven split needed:
    each rank holds whole heads (384/3 = 128 = 4 x 32, 384/4 = 96 = 3 x 32) and 1536/T MLP columns, and the
    slices put back together are the checkpoint."""
    config, state = embed.load_bert(model_dir)
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (384, 12, 1536)
    embed.check_tp(config, world)
    p = "encoder.layer.5."
    shards = [embed.shard_state_dict(state, config, r, world) for r in range(world)]
    width, inter = heads_per_rank * config.head_dim, 1536 // world
    for shard in shards:
        assert shard[f"{p}attention.self.query.weight"].shape == (width, 384)
        assert shard[f"{p}attention.output.dense.weight"].shape == (384, width)
        assert shard[f"{p}intermediate.dense.weight"].shape == (inter, 384)
        assert shard[f"{p}output.dense.weight"].shape == (384, inter)
    for key, dim in (
        (f"{p}attention.self.key.weight", 0),
        (f"{p}attention.self.value.bias", 0),
        (f"{p}attention.output.dense.weight", 1),
        (f"{p}intermediate.dense.weight", 0),
        (f"{p}output.dense.weight", 1),
    ):
        assert torch.equal(torch.cat([s[key] for s in shards], dim=dim), state[key]), key


def test_ranks_are_pinned_to_the_named_nodes_in_order() -> None:
    bundles = embed.pinned_bundles({"GPU": 1.0}, 3, ["192.168.100.12", "192.168.100.10", "192.168.100.11"])
    assert bundles == [
        {"GPU": 1.0, "node:192.168.100.12": 0.001},
        {"GPU": 1.0, "node:192.168.100.10": 0.001},
        {"GPU": 1.0, "node:192.168.100.11": 0.001},
    ]
    assert embed.pinned_bundles({"CPU": 1.0}, 2) == [{"CPU": 1.0}, {"CPU": 1.0}]
    with pytest.raises(embed.WorkerError):
        embed.pinned_bundles({"GPU": 1.0}, 2, ["192.168.100.10"])


def test_cli_refuses_nodes_that_do_not_match_the_ranks(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("SPARKCTL_API_KEY", API_KEY)
    assert embed.main(["--tp", "2", "--port", "0", "--nodes", "192.168.100.10"]) == 2
    assert "--nodes names 1 node(s) for 2 rank(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        embed.build_parser().parse_args(["--nodes", "192.168.100.10,spark-b"])


def test_world_that_does_not_divide_heads_is_refused(model_dir: Path) -> None:
    config, state = embed.load_bert(model_dir)
    with pytest.raises(embed.WorkerError) as err:
        embed.shard_state_dict(state, config, 0, 5)
    assert "12 attention heads" in err.value.message
    assert "[1, 2, 3, 4, 6, 12]" in err.value.hint


def test_world_that_does_not_divide_mlp_is_refused() -> None:
    config = embed.BertConfig(
        hidden_size=16,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=30,
        vocab_size=10,
        max_position_embeddings=8,
    )
    with pytest.raises(embed.WorkerError, match="MLP width of 30"):
        embed.check_tp(config, 4)
    with pytest.raises(embed.WorkerError, match="outside"):
        embed.shard_state_dict({}, config, 2, 2)


# ----------------------------------------------------------------------------------------------- HTTP layer


def test_plan_batches_groups_by_length_and_covers_every_input() -> None:
    plan = embed.plan_batches([3, 9, 1, 7, 5], 2)
    assert plan == [[1, 3], [4, 0], [2]]


def test_parse_request_accepts_token_lists_and_rejects_bad_ids() -> None:
    req = embed.parse_embedding_request({"input": [101, 102], "model": "m"}, "m", 384, 100_000, 10)
    assert req.tokens == [[101, 102]]
    with pytest.raises(embed.RequestError, match=r"token ids must be in \[0, 30522\)"):
        embed.parse_embedding_request({"input": [[1, 40000]]}, "m", 384, 30522, 10)


@pytest.fixture(scope="module")
def server(spec: embed.ModelSpec, tokenizer: embed.TextTokenizer) -> Iterator[tuple[str, embed.EmbeddingService]]:
    service = embed.EmbeddingService("minilm", API_KEY, tokenizer, spec.config, max_batch_size=3, max_inputs=16)
    http, thread = embed.start_http_server(service, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{http.server_address[1]}", service
    http.shutdown()
    http.server_close()
    thread.join(timeout=5)


def _request(
    url: str, body: Any = None, key: str | None = API_KEY, raw: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def ready_server(server: tuple[str, embed.EmbeddingService], spec: embed.ModelSpec) -> str:
    url, service = server
    status, body = _request(f"{url}/health", key=None)
    assert (status, body["status"]) == (503, "loading")
    status, body = _request(f"{url}/v1/embeddings", {"input": "x", "model": "minilm"})
    assert status == 503 and body["error"]["type"] == "server_error"
    service.attach(embed.LocalBackend(spec, "cpu"))
    return url


def test_health_turns_200_once_loaded(ready_server: str) -> None:
    assert _request(f"{ready_server}/health", key=None) == (200, {"status": "ok"})


def test_openai_client_models_and_embeddings(ready_server: str, reference: Any, tokenizer: embed.TextTokenizer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{ready_server}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["minilm"]
    expected_tokens = sum(len(t) for t in tokenizer.tokenize(SENTENCES))
    for encoding in ("float", "base64"):
        # the client asks for base64 unless told otherwise and decodes it into floats itself
        kwargs = {"encoding_format": encoding} if encoding == "float" else {}
        result = client.embeddings.create(model="minilm", input=SENTENCES, **kwargs)
        assert [d.index for d in result.data] == list(range(len(SENTENCES)))
        assert_matches(torch.tensor([d.embedding for d in result.data]), reference)
        assert result.usage.prompt_tokens == result.usage.total_tokens == expected_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{ready_server}/v1", api_key="wrong", max_retries=0).models.list()


def test_base64_is_little_endian_float32(ready_server: str, reference: Any) -> None:
    status, body = _request(
        f"{ready_server}/v1/embeddings",
        {"input": SENTENCES[0], "model": "minilm", "encoding_format": "base64"},
    )
    assert status == 200
    raw = base64.b64decode(body["data"][0]["embedding"])
    vector = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    assert vector.shape == (384,)
    assert_matches(vector[None], reference[:1])


def test_token_id_input_embeds_like_text(ready_server: str, tokenizer: embed.TextTokenizer) -> None:
    ids = tokenizer.tokenize(["hello world"])[0]
    _, from_text = _request(f"{ready_server}/v1/embeddings", {"input": "hello world", "model": "minilm"})
    status, from_ids = _request(f"{ready_server}/v1/embeddings", {"input": [ids], "model": "minilm"})
    assert status == 200
    assert from_ids["usage"]["prompt_tokens"] == len(ids) == 4
    assert_matches(torch.tensor([from_ids["data"][0]["embedding"]]), torch.tensor([from_text["data"][0]["embedding"]]))


def test_api_key_is_required_on_v1_only(ready_server: str) -> None:
    for path, body in (("/v1/models", None), ("/v1/embeddings", {"input": "x"})):
        status, err = _request(f"{ready_server}{path}", body, key=None)
        assert status == 401
        assert err["error"]["code"] == "invalid_api_key"
    assert _request(f"{ready_server}/health", key=None)[0] == 200


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "minilm"}, 400, "input"),
        ({"input": [], "model": "minilm"}, 400, "input"),
        ({"input": 42, "model": "minilm"}, 400, "input"),
        ({"input": [[]], "model": "minilm"}, 400, "input"),
        ({"input": ["a", 1], "model": "minilm"}, 400, "input"),
        ({"input": ["x"] * 17, "model": "minilm"}, 400, "input"),
        ({"input": "x", "model": "minilm", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "model": "minilm", "dimensions": 128}, 400, "dimensions"),
        ({"input": "x", "model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(ready_server: str, body: Any, status: int, param: str) -> None:
    got, err = _request(f"{ready_server}/v1/embeddings", body)
    assert got == status
    assert err["error"]["param"] == param
    assert err["error"]["message"]


def test_invalid_json_is_400(ready_server: str) -> None:
    status, err = _request(f"{ready_server}/v1/embeddings", raw=b"{not json")
    assert status == 400
    assert err["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_refuses_to_start_without_api_key(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    for name in embed.API_KEY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert embed.main(["--backend", "local", "--port", "0"]) == 2
    assert "SPARKCTL_API_KEY" in capsys.readouterr().err


def test_cli_refuses_tp_that_does_not_divide_heads(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("SPARKCTL_API_KEY", API_KEY)
    assert embed.main(["--tp", "5", "--port", "0"]) == 2
    assert "12 attention heads" in capsys.readouterr().err


@pytest.mark.parametrize(("tp", "replicas"), [(2, 1), (1, 2)])
def test_worker_script_under_local_ray(tp: int, replicas: int, reference: Any, tmp_path: Path) -> None:
    """The file as sparkctl runs it: ray actors, a gloo group or replicas, HTTP, then SIGTERM."""
    pytest.importorskip("ray")
    log_path = tmp_path / "worker.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SPARKCTL_API_KEY=API_KEY, RAY_USAGE_STATS_ENABLED="0")
    args = [
        sys.executable, str(EMBED_SCRIPT), "--ray-address", "local",
        "--tp", str(tp), "--replicas", str(replicas), "--placement-strategy", "SPREAD",
        "--port", "0", "--served-name", "minilm", "--gloo-ifname", "lo", "--startup-timeout", "180",
    ]  # fmt: skip
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            url = _wait_ready(proc, log_path)
            for _ in range(replicas):  # round-robin: every replica answers once
                status, body = _request(f"{url}/v1/embeddings", {"input": SENTENCES, "model": "minilm"})
                assert status == 200, body
                assert_matches(torch.tensor([d["embedding"] for d in body["data"]]), reference)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = log_path.read_text()
    for phase in (
        "connecting to ray",
        "placement group ready",
        "loading weights",
        "ready:",
        "stopped (exit 0)",
    ):
        assert phase in log, f"missing {phase!r} in:\n{log}"


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + 240
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log_path.read_text()}")
        text = log_path.read_text()
        found = re.search(r"on (http://127\.0\.0\.1:\d+);", text)
        url = found.group(1) if found else None
        try:
            if url and _request(f"{url}/health", key=None)[0] == 200:
                return url
        except OSError:
            pass  # shutting down after a failed start: the next poll() reports it
        time.sleep(0.5)
    pytest.fail(f"worker not ready in time:\n{log_path.read_text()}")
