"""Engine configuration: one frozen dataclass, checked when built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import MAX_TOP_LOGPROBS


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; on plain AVX2 they are ~6x slower than fp32
    (measured here: 64x576 @ 576x1536 took 6.7 ms in bf16, 1.1 ms in fp32)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None -> smollm2-135m; embedded smollm2-135m | gemma3-270m, a HF directory, a .gguf
    dtype: str = "auto"  # "auto" | "bfloat16" | "float32"; auto = bf16 where the hardware is fast at it
    device: str = "cpu"  # "cpu" | "cuda"
    vmm_backend: str | None = None  # None -> "host" on cpu, "cuda" on cuda
    device_memory_bytes: int = 2 << 30  # the ElasticPool budget per rank: weights + KV + activations
    pool_policy: str = "elastic"  # "elastic" | "static"
    static_activation_tokens: int | None = None  # static policy: activations reserved for this many tokens
    host_buffer_bytes: int = 1 << 30  # host RAM for swapped-out KV
    max_model_len: int | None = None  # None -> min(model context, 8192)
    max_num_seqs: int = 64  # running batch limit (and KV slots)
    max_num_batched_tokens: int = 512  # chunked-prefill token budget per step (the floor when adaptive)
    # eLLM: when set above max_num_batched_tokens, each step's budget is chosen between the two from the
    # pool's free memory (engine/core/chunk_policy.py); a static pool reserves activations for this ceiling
    max_prefill_chunk_tokens: int | None = None
    # who gives way when KV and the step's activations both want memory (engine/core/memory_arbiter.py):
    # "kv_first" (KV keeps what it needs) | "slo" (also swaps decodes out so a prompt about to miss its TTFT
    # target gets a larger chunk; needs max_prefill_chunk_tokens and ttft_slo_ms to do anything)
    memory_arbiter: str = "kv_first"
    # the most top logprobs a request may ask for (vLLM's max_logprobs; a request above it gets a 400);
    # None: logprobs are not served at all, and a static split reserves no log_softmax rows for them
    max_logprobs: int | None = 20
    max_num_waiting: int = 256  # beyond this, generate() raises EngineOverloadedError
    tokens_per_page: int = 128  # KV page: this many tokens of one layer's K (or V)
    enable_prefix_caching: bool = True
    preemption_mode: str = "auto"  # "auto" (swap if the host buffer has room, else recompute) | "swap" | "recompute"
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    num_threads: int | None = None  # torch threads per rank
    tensor_parallel_size: int = 1
    # The network interface of the tensor-parallel group's sockets (GLOO_SOCKET_IFNAME on CPU,
    # NCCL_SOCKET_IFNAME on GPU). None: torch's default (the host name's address). The serving layer sets it
    # from where Ray placed the ranks (deployments/cluster/placement.py); the engine knows nothing of nodes.
    process_group_interface: str | None = None
    attention_backend: str = "auto"  # "auto" (native decode kernel if it builds) | "native" | "torch"
    # "auto" (bf16 on AVX512-BF16/AMX: onednn; else the native small-batch GEMM) | "onednn" | "native" | "torch"
    linear_backend: str = "auto"
    # Health: the engine counts as stalled (check_health fails) when one pass of its loop (inbox + step)
    # has run this long; a long request is many short steps, so it never trips this.
    stall_timeout_s: float = 60.0
    # Debug: after every step and every engine call (migration, cooperation), check that each KV slot's pages map
    # exactly its request's chunks (memory/kv/invariants.py); the first violation is logged with the last engine
    # events (engine/kv_audit.py) and stops the loop. Costs a walk over every page of every slot: not for serving.
    check_kv_invariants: bool = False
    # Stream pacing (engine/stream_pacer.py): with N streams open, a stream's next output goes out no earlier
    # than min(N / stream_chunks_per_s, 0.25) s after its previous one; outputs arriving sooner are merged.
    # It bounds the chunks a second that asyncio, SSE and Serve's proxy handle (their CPU is taken from the
    # step's GEMMs). The first and the last output of a stream are never held. None: every step's output.
    # 10 (was 50; 200 before): a chunk every 100 ms at 1 stream, 250 ms (the cap) from 3 on. Served c=1 out tok/s
    # 1.06-1.17x in 4 alternating pairs (TPOT 18.5-20.6 ms against the engine's 17.3); 50 gave c=8 1.19-1.31x over
    # 200 (docs/SPEED.md 2026-12-06).
    stream_chunks_per_s: float | None = 10.0
    # The engine loop thread's nice value, set when it starts (the OpenMP threads it starts inherit it); None:
    # inherited. Ray starts workers at nice 15, so every nice-0 process on the box (Ray's GCS, raylet,
    # dashboard, the client) preempted the step's compute threads and the partner waited at the step's barriers:
    # served batch-1 TPOT 30.5 ms at 15, 25.4 at 0, 20.8 at -10 against 20.0 offline (Xeon with AMX, 2 cores;
    # docs/SPEED.md). Lowering it needs CAP_SYS_NICE: without, the loop logs a warning and keeps its value
    # (RAY_worker_niceness=0 when starting Ray then gives 0).
    engine_thread_nice: int | None = -10
    kv_layout: str = "contiguous"  # "contiguous" (per-slot virtual ranges) | "paged" (block tables)
    # cached KV blocks: "lru" | "prefix_subset" (Jenga: least hit length lost first) | "auto" (prefix_subset
    # when the model has sliding-window layers, lru otherwise; docs/JENGA.md measures both)
    kv_evictor: str = "auto"
    # LayerKV: "layerwise" admits a prompt whose KV does not all fit with its top layers on the host,
    # demotes layers before preempting, stages host layers per step (docs/LAYERKV.md); "none" does not
    kv_offload: str = "none"
    # how offloaded layers are read: "copy" (staged one layer ahead by a copy thread / CUDA stream),
    # "inline" (staged on the compute thread), "in_place" (host backend: host pages mapped and read where
    # they are), "auto" (in_place on the host backend, copy elsewhere; see docs/LAYERKV.md)
    kv_staging: str = "auto"
    priority_scale: float = 2.0  # a request's SLO targets are scaled by priority_scale ** priority
    # KunServe: keep a host copy of every layer's weights so layer ranges can be dropped (their memory
    # goes to KV) and restored by copy; costs host RAM equal to the layers' weights
    enable_parameter_dropping: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.max_logprobs is not None and not 0 <= self.max_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"max_logprobs must be None or in [0, {MAX_TOP_LOGPROBS}], got {self.max_logprobs!r}")
        if self.memory_arbiter not in ("kv_first", "slo"):
            raise ValueError(f"memory_arbiter must be kv_first or slo, got {self.memory_arbiter!r}")
        if self.pool_policy not in ("elastic", "static"):
            raise ValueError(f"pool_policy must be elastic or static, got {self.pool_policy!r}")
        if self.kv_evictor not in ("auto", "lru", "prefix_subset"):
            raise ValueError(f"kv_evictor must be auto, lru or prefix_subset, got {self.kv_evictor!r}")
        if self.kv_layout not in ("contiguous", "paged"):
            raise ValueError(f"kv_layout must be contiguous or paged, got {self.kv_layout!r}")
        if self.preemption_mode not in ("auto", "swap", "recompute"):
            raise ValueError(f"preemption_mode must be auto, swap or recompute, got {self.preemption_mode!r}")
        for name in ("device_memory_bytes", "max_num_seqs", "max_num_batched_tokens", "tokens_per_page",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kv_offload not in ("none", "layerwise"):
            raise ValueError(f"kv_offload must be none or layerwise, got {self.kv_offload!r}")
        if self.kv_staging not in ("auto", "copy", "inline", "in_place"):
            raise ValueError(f"kv_staging must be auto, copy, inline or in_place, got {self.kv_staging!r}")
        if self.kv_staging == "in_place" and self.backend_name != "host":
            raise ValueError("kv_staging: in_place needs the host VMM backend (device and host share RAM)")
        if self.kv_offload == "layerwise" and (not self.host_buffer_bytes or self.kv_layout != "contiguous"):
            raise ValueError("kv_offload: layerwise needs a host buffer and kv_layout contiguous")
        if self.priority_scale < 1:
            raise ValueError("priority_scale must be >= 1")
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be > 0")
        if self.stream_chunks_per_s is not None and (isinstance(self.stream_chunks_per_s, bool)
                                                     or not isinstance(self.stream_chunks_per_s, (int, float))
                                                     or not self.stream_chunks_per_s > 0):
            raise ValueError(f"stream_chunks_per_s must be None or a number > 0, got {self.stream_chunks_per_s!r}")
        if self.engine_thread_nice is not None and (isinstance(self.engine_thread_nice, bool)
                                                    or not isinstance(self.engine_thread_nice, int)
                                                    or not -20 <= self.engine_thread_nice <= 19):
            raise ValueError(f"engine_thread_nice must be None or an integer in [-20, 19], "
                             f"got {self.engine_thread_nice!r}")
        if self.enable_parameter_dropping and self.tensor_parallel_size > 1:
            raise ValueError("parameter dropping needs replicas of the whole model (tensor_parallel_size 1)")
        if self.enable_parameter_dropping and self.kv_offload == "layerwise":
            # a pipelined pair's KV (engine/cooperative/kv.py) keeps every layer it holds on the device
            raise ValueError("kv_offload: layerwise and parameter dropping are not supported together yet")
        if self.host_buffer_bytes < 0 or self.max_num_waiting < 0:
            raise ValueError("host_buffer_bytes and max_num_waiting must be >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            fast = self.device == "cuda" or cpu_has_fast_bf16()
            return torch.bfloat16 if fast else torch.float32
        return getattr(torch, self.dtype)

    @property
    def staging_mode(self) -> str:
        if self.kv_staging == "auto":
            return "in_place" if self.backend_name == "host" else "copy"
        return self.kv_staging

    @property
    def backend_name(self) -> str:
        return self.vmm_backend or ("cuda" if self.device == "cuda" else "host")
