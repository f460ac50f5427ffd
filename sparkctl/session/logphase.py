"""What a workload's own log says it is doing while its endpoint does not answer yet, and how far a long copy got
(pure).

vLLM binds its HTTP port only once the engine is up, so its /health cannot tell Ray placement from loading weights
or graph capture: the log can. Each marker below is a line the named upstream file prints (vLLM 0.32.0), or one the
built-in embedding worker prints (sparkctl/workers/embed.py). tqdm progress bars are written with carriage returns,
so the text is split on both CR and LF and the last marker found wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

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


PROGRESS_LABELS = {"weights_fetch": "downloading", "weights_copy": "copying", "weights_verify": "checking"}
"""What a step whose command reports progress is doing, as the live view names it (the event's status)."""

# rsync --info=progress2 (rsync(1); progress.c, rprint_progress in rsync 3.2): "<bytes>  <pct>%  <rate>  <h:mm:ss>",
# bytes with thousands separators, e.g. "  1,048,576,000  42%  110.53MB/s    0:00:14 (xfr#3, to-chk=5/12)".
_RSYNC = re.compile(r"^\s*([\d,.]+)\s+(\d+)%\s+(\S+/s)\s+(\d+:\d\d:\d\d)")
# sparkctl/workers/weights.py: "progress <done bytes> <total bytes>" once a second
_BYTES = re.compile(r"^progress (\d+) (\d+)$")


@dataclass
class CopyProgress:
    """Reads a long command's stdout as it arrives and says, at most once a second, how far it got."""

    kind: str
    """'rsync' or 'bytes' (the command's `progress`)."""
    clock: Callable[[], float]
    _buffer: str = ""
    _said: float = -1.0
    _last: tuple[float, int] | None = None

    def feed(self, text: str) -> str | None:
        """New output -> a line for the live view (e.g. "1.2 GB of 4.4 GB (27%) at 110 MB/s"), or None."""
        *lines, self._buffer = re.split(r"[\r\n]", self._buffer + text)
        said = None
        for line in lines:
            said = self._parse(line.strip()) or said
        now = self.clock()
        if said is None or now - self._said < 1.0:
            return None
        self._said = now
        return said

    def _parse(self, line: str) -> str | None:
        if self.kind == "rsync":
            m = _RSYNC.match(line)
            if m is None:
                return None
            done = int(m.group(1).replace(",", "").replace(".", ""))
            return f"{done / 1e9:.2f} GB ({m.group(2)}%) at {m.group(3)}"
        m = _BYTES.match(line)
        if m is None:
            return None
        done, total = int(m.group(1)), int(m.group(2))
        now = self.clock()
        rate = ""
        if self._last is not None and now > self._last[0]:
            rate = f" at {(done - self._last[1]) / (now - self._last[0]) / 1e6:.0f} MB/s"
        self._last = (now, done)
        of = f" of {total / 1e9:.2f} GB ({100 * done // total}%)" if total else ""
        return f"{done / 1e9:.2f} GB{of}{rate}"
