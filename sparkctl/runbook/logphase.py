"""What a workload's own log says it is doing while its endpoint does not answer yet (pure).

vLLM binds its HTTP port only once the engine is up, so its /health cannot tell Ray placement from loading weights
or graph capture: the log can. Each marker below is a line the named upstream file prints (vLLM 0.32.0), or one the
built-in embedding worker prints (sparkctl/workers/embed.py). tqdm progress bars are written with carriage returns,
so the text is split on both CR and LF and the last marker found wins.
"""

from __future__ import annotations

import re

# (label, pattern); a bar's "NN% Completed | a/b" (vLLM's _BAR_FORMAT in model_executor/model_loader/weight_utils.py)
# or tqdm's default "NN%|...| a/b" is shown as the label's progress.
_MARKERS: list[tuple[str, re.Pattern[str]]] = [
    # vllm/v1/executor/ray_utils.py: initialize_ray_cluster
    ("Ray placement", re.compile(r"Creating a new placement group|Using the existing placement group")),
    # sparkctl/workers/embed.py: RayBackend.start
    ("Ray placement", re.compile(r"connecting to ray \(address=|reserving \d+ bundles")),
    # vllm/model_executor/model_loader/weight_utils.py: safetensors_weights_iterator (and the other iterators)
    ("loading weights", re.compile(r"Loading (?:safetensors|pt|npcache|fastsafetensors)? ?checkpoint shards")),
    # sparkctl/workers/embed.py: "loading weights (...)", "rank r/w: loading weights from ..."
    ("loading weights", re.compile(r"loading weights \(|: loading weights from ")),
    # vllm/model_executor/model_loader/default_loader.py: "Loading weights took %.2f seconds";
    # vllm/v1/worker/gpu_model_runner.py: "Model loading took %s GiB memory and %.6f seconds"
    ("weights loaded", re.compile(r"Loading weights took|Model loading took")),
    # vllm/v1/worker/gpu_model_runner.py: capture_model's tqdm desc "Capturing CUDA graphs (decode, FULL)"
    ("graph capture", re.compile(r"Capturing CUDA graphs")),
    # vllm/v1/worker/gpu_model_runner.py: "Graph capturing finished in %.0f secs";
    # vllm/v1/engine/core.py: "init engine (profile, create kv cache, warmup model) took %.2f s"
    ("engine ready", re.compile(r"Graph capturing finished in|init engine \(profile, create kv cache")),
    # vllm/entrypoints/launchers/api_server/entry.py: "Starting vLLM server on %s";
    # sparkctl/workers/embed.py: "ready: <name> tp=..."
    ("starting the API server", re.compile(r"Starting vLLM server on|\bready: \S+ tp=\d+")),
]
_BAR = re.compile(r":\s*(\d{1,3})%\s*(?:Completed\s*)?\|(?:[^|\n]*\|)?\s*(\d+)/(\d+)")


def parse_log_phase(text: str) -> tuple[str, str] | None:
    """The last phase a workload log names, as (label, progress such as "3/5 (60%)" or ""); None if none."""
    for line in reversed(re.split(r"[\r\n]+", text)):
        for label, pattern in _MARKERS:
            if pattern.search(line):
                bar = _BAR.search(line)
                return label, (f"{bar.group(2)}/{bar.group(3)} ({int(bar.group(1))}%)" if bar else "")
    return None
