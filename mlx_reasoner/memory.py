"""Memory stage: what a GRPO step will need at its peak, worked out from the model's shape and
the options before anything runs, and the check ``train`` makes with it.

A step has two phases, and its peak is the larger of them:

- the *rollout*: the weights, the adapters with their optimizer state, and the decode's KV
  buffers (``rollout``: two sets of fixed buffers on the CPU, one growing cache elsewhere);
- the *training pass* of one micro-batch: the weights, the adapters with their gradients and
  AdamW moments, the activations every adapted block keeps for the backward pass, and the
  float32 logits of the vocabulary projection with their gradients (``loss``).

Everything is arithmetic on the shape. The constants below come from ``mx.get_peak_memory`` at
the Qwen2.5-3B width in bfloat16: the per-token ones from a full-depth (36-block) micro-batch,
the logits' from runs over 1, 2 and 4 blocks and from the loss's chunk measurements
(``scripts/memory_3b.py``; figures in docs/performance.md, "Memory at the 3B shape"). The
reference pass (beta > 0) runs forward only and stays under the training pass, so beta does not
enter. Small arrays (token ids, masks, per-token log-probs, a block's transient scratch) are
left out; ``training_bounds`` says how far a measured peak may fall from the estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ReasonerError
from .model import lora_blocks

GB = 1e9

# The training pass's rows and prompts are padded to multiples of this (loss.pack_*).
TRAIN_PAD = 16
# The compiled decode's KV buffers grow by this many columns (rollout.CACHE_MULTIPLE) ...
DECODE_CACHE_MULTIPLE = 64
# ... and mlx-lm's caches (prefill, BatchGenerator) by this many (KVCache.step).
MLX_LM_CACHE_STEP = 256

# Bytes each adapted block keeps for the backward pass, per token, in units of the compute
# dtype: so many hidden-size vectors and so many MLP-width vectors (the norms' and the LoRA
# layers' inputs, the attention's queries/keys/values and output, the SwiGLU's gate and up).
# Fitted to the full-depth 3B micro-batch (docs/performance.md, "Memory at the 3B shape").
SAVED_HIDDEN_PER_TOKEN = 10.0
SAVED_MLP_PER_TOKEN = 4.25
# Attention kept per block: the softmax weights and their scores, per query-key pair.
SAVED_SCORE_BYTES = 6.0
# With --grad-checkpoint a block keeps its input only (mlx-lm's block checkpointing), plus
# the block being recomputed in the backward pass and its gradients' scratch.
CHECKPOINTED_HIDDEN_PER_TOKEN = 1.0
CHECKPOINT_WORKING_BLOCKS = 1.5
# Float32 logits of the vocabulary projection alive at the peak of the training pass (logits,
# scaled logits, log-sum-exp terms, gradients). The loss projects them in chunks under
# mx.checkpoint (loss.logits_chunk). Run plainly, a few copies of one chunk stay alive plus a
# part of the whole micro-batch's worth (an envelope over the loss's own chunk measurements at
# the real vocabulary and the depth-4 run); inside a compiled step MLX keeps 2.4 to 5.3 copies
# of the whole micro-batch's worth, depending on how it orders the chunks (5.3 with one row or
# one stream), and 6.1 when the compiled depth-4 run's excess over the estimate is put down to
# them: the estimate takes that.
LOGIT_CHUNK_COPIES = 4.0
LOGIT_WHOLE_COPIES = 0.8
LOGIT_COPIES_COMPILED = 6.1
LOGIT_COPIES_LEAST = 1.0  # the fewest measured, in copies of the whole micro-batch's worth
# The rollout: the two sets of buffers, plus a third while both grow by a block of columns.
DECODE_KV_SETS = 3.0
# mlx-lm's BatchGenerator: one cache, copied as it is merged and grown.
BATCH_GENERATOR_KV_SETS = 2.0
# Decode scratch per row: float32 logits, log-probs and the sampler's copies of them.
DECODE_VOCAB_COPIES = 4.0
# Adapters in float32: weights, this micro-batch's gradients, their running sum, AdamW's two.
ADAPTER_COPIES = 5

# The per-token constants come from one width (the 3B's); another width keeps a somewhat
# different share of hidden- and MLP-sized arrays: this much either way.
ACTIVATION_SPREAD = 0.25

# Question and chat template, in tokens, on top of the system prompt's own: GSM8K's longest
# question is 212 Qwen2.5 tokens and the template 10 more (its longest prompt is 247 tokens
# with the default system prompt; the median 91).
QUESTION_TOKENS = 224
CHARS_PER_TOKEN = 3.0  # a system prompt's length in tokens, over-counted


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only model that set its memory."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2  # the weights' dtype, which activations follow
    tied_embeddings: bool = True
    attention_bias: bool = False
    quant_bits: int | None = None  # quantized linear layers and embeddings (QLoRA)
    quant_group_size: int = 64

    @classmethod
    def from_args(cls, args, dtype_bytes: int, quantization: dict | None = None) -> ModelShape:
        """From an mlx-lm ``ModelArgs`` (or anything with its field names).

        Raises:
            ValueError: a size this estimate needs is missing.
        """
        get = args.get if isinstance(args, dict) else lambda k, d=None: getattr(args, k, d)
        missing = [
            k
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if not get(k)
        ]
        intermediate = get("intermediate_size") or get("moe_intermediate_size")
        if missing or not intermediate:
            raise ValueError(f"no {', '.join(missing or ['intermediate_size'])} in the config")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        model_type = get("model_type", "")
        quantization = quantization or {}
        return cls(
            hidden_size=hidden,
            num_layers=int(get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate_size=int(intermediate),
            vocab_size=int(get("vocab_size")),
            dtype_bytes=int(dtype_bytes),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            # Qwen2's attention always has query/key/value biases; Llama's when configured.
            attention_bias=model_type == "qwen2" or bool(get("attention_bias", False)),
            quant_bits=quantization.get("bits"),
            quant_group_size=int(quantization.get("group_size", 64)),
        )

    @classmethod
    def from_model(cls, model) -> ModelShape:
        """From a loaded mlx-lm model: its ``args`` and the dtype of its embedding."""
        embed = model.model.embed_tokens
        if hasattr(embed, "scales"):  # quantized: the scales carry the compute dtype
            quantization = {"bits": embed.bits, "group_size": embed.group_size}
            dtype_bytes = embed.scales.dtype.size
        else:
            quantization, dtype_bytes = None, embed.weight.dtype.size
        return cls.from_args(model.args, dtype_bytes, quantization)

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelShape:
        """From a model folder's ``config.json`` (and its safetensors headers for the dtype,
        which a re-saved config may misstate), without loading any weights.

        Raises:
            ValueError: no readable config, or a size this estimate needs is missing.
        """
        folder = Path(path).expanduser()
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {folder / 'config.json'}: {exc}") from exc
        config = {**config, **config.get("text_config", {})}
        config.setdefault("tie_word_embeddings", _mlx_lm_default(config, "tie_word_embeddings"))
        quantization = config.get("quantization") or config.get("quantization_config")
        dtype_bytes = _safetensors_dtype_bytes(folder) or _DTYPE_BYTES.get(
            str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), 2
        )
        return cls.from_args(config, dtype_bytes, quantization)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_matrix_elements(self) -> int:
        """Weight-matrix elements of one block: attention and SwiGLU MLP."""
        h, q = self.hidden_size, self.num_heads * self.head_dim
        return h * q + 2 * h * self.kv_dim + q * h + 3 * h * self.intermediate_size

    def _matrix_bytes(self, elements: int) -> int:
        if self.quant_bits is None:
            return elements * self.dtype_bytes
        groups = elements // self.quant_group_size
        return elements * self.quant_bits // 8 + 2 * groups * self.dtype_bytes

    def weight_bytes(self) -> int:
        """Bytes of every weight as mlx-lm holds them (a tied output layer is the embedding)."""
        h = self.hidden_size
        vectors = 2 * h  # the block's two norms
        if self.attention_bias:
            vectors += self.num_heads * self.head_dim + 2 * self.kv_dim
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        matrices = self.num_layers * self.block_matrix_elements() + embeddings
        return self._matrix_bytes(matrices) + (self.num_layers * vectors + h) * self.dtype_bytes

    def parameters(self) -> int:
        """Base parameters (elements, not bytes; a quantized matrix counts as unpacked)."""
        h = self.hidden_size
        vectors = 2 * h + (self.num_heads * self.head_dim + 2 * self.kv_dim) * self.attention_bias
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return self.num_layers * (self.block_matrix_elements() + vectors) + embeddings + h

    def lora_parameters(self, layers: int | None, rank: int) -> int:
        """LoRA parameters on every linear layer of ``layers`` blocks (mlx-lm's default keys)."""
        h, q, i = self.hidden_size, self.num_heads * self.head_dim, self.intermediate_size
        per_block = (h + q) + 2 * (h + self.kv_dim) + (q + h) + 2 * (h + i) + (i + h)
        return self.adapted_blocks(layers) * rank * per_block

    def adapted_blocks(self, lora_layers: int | None) -> int:
        """The blocks ``--lora-layers`` adapts on this shape: ``attach_lora``'s own rule, except
        that a number above the depth counts as every block (train refuses it before estimating,
        ``run.check_lora_layers``; scripts/memory_3b.py estimates shallow cuts of a model)."""
        if lora_layers is not None and lora_layers > self.num_layers:
            return self.num_layers
        return lora_blocks(lora_layers, self.num_layers)


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2}


def _mlx_lm_default(config: dict, name: str):
    """The default mlx-lm's ``ModelArgs`` of this model type gives a field the config lacks."""
    try:
        from mlx_lm.utils import _get_classes

        _, args_class = _get_classes(config)
        field = next(f for f in dataclasses.fields(args_class) if f.name == name)
        return field.default if field.default is not dataclasses.MISSING else False
    except Exception:  # unknown model type or another mlx-lm layout: Hugging Face's default
        return False


def _safetensors_dtype_bytes(folder: Path) -> int | None:
    """The float dtype holding most elements in the folder's first safetensors file."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    try:
        with open(files[0], "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    counts: dict[int, int] = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry.get("dtype") not in _DTYPE_BYTES:
            continue
        size = _DTYPE_BYTES[entry["dtype"]]
        counts[size] = counts.get(size, 0) + math.prod(entry.get("shape", [1]))
    return max(counts, key=counts.get) if counts else None


@dataclass(frozen=True)
class StepOptions:
    """The options of a GRPO step that set its memory (``TrainConfig``'s names)."""

    batch_size: int = 2
    group_size: int = 8
    prompt_tokens: int = 200  # the longest prompt of a step, system prompt and template included
    max_completion_tokens: int = 256
    micro_batch_size: int = 4
    lora_layers: int | None = None  # --lora-layers; None: the default (model.lora_blocks)
    lora_rank: int = 8
    grad_checkpoint: bool = False
    share_prompts: bool = True
    compiled_decode: bool = True  # two sets of fixed KV buffers (CPU); else a BatchGenerator
    compiled_training: bool = False  # the training pass under mx.compile (trainer.GradientComputer)

    @classmethod
    def from_config(cls, config, prompt_tokens: int, **overrides) -> StepOptions:
        """From a ``TrainConfig`` (or a bench config); ``overrides`` replace fields."""
        values = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(cls)
            if hasattr(config, f.name) and f.name != "prompt_tokens"
        }
        values.update(prompt_tokens=prompt_tokens, **overrides)
        return cls(**values)

    @property
    def completions(self) -> int:
        return self.batch_size * self.group_size

    @property
    def shared_layout(self) -> bool:
        """The training pass runs each prompt once per micro-batch (not with checkpointing)."""
        return self.share_prompts and not self.grad_checkpoint


@dataclass(frozen=True)
class MemoryEstimate:
    """A GRPO step's memory, in bytes, by part and by phase."""

    weights: int
    kv_cache: int  # the rollout's
    activations: int  # kept for the backward pass of one micro-batch
    logits: int  # the vocabulary projection of one micro-batch, forward and backward
    adapters: int  # LoRA weights, gradients and AdamW moments
    decode: int  # the decode's per-row scratch
    shape: ModelShape
    options: StepOptions

    @property
    def rollout(self) -> int:
        return self.weights + self.adapters + self.kv_cache + self.decode

    @property
    def training(self) -> int:
        return self.weights + self.adapters + self.activations + self.logits

    @property
    def peak(self) -> int:
        return max(self.rollout, self.training)

    @property
    def phase(self) -> str:
        """Which phase sets the peak."""
        return "training pass" if self.training >= self.rollout else "rollout"

    def split(self) -> dict[str, float]:
        """The parts and the phases in GB."""
        parts = ("weights", "kv_cache", "activations", "logits", "adapters", "rollout", "training")
        return {name: getattr(self, name) / GB for name in parts} | {"peak": self.peak / GB}

    def describe(self) -> str:
        """One line: the peak and what makes it up."""
        if self.phase == "rollout":
            parts = f"weights {self.weights / GB:.1f} + KV cache {self.kv_cache / GB:.1f}"
        else:
            parts = (
                f"weights {self.weights / GB:.1f} + activations {self.activations / GB:.1f}"
                f" + logits {self.logits / GB:.1f}"
            )
        return f"{self.peak / GB:.1f} GB at the {self.phase} ({parts} + adapters)"


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def prompts_per_micro_batch(options: StepOptions) -> int:
    """The most distinct prompts one micro-batch holds (completion i continues prompt i // G)."""
    size, group, total = options.micro_batch_size, options.group_size, options.completions
    return max(
        (min(start + size, total) - 1) // group - start // group + 1
        for start in range(0, total, size)
    )


def training_tokens(options: StepOptions) -> int:
    """Token positions one micro-batch runs through each block (padded as the loss pads)."""
    rows = min(options.micro_batch_size, options.completions)
    completion = _round_up(options.max_completion_tokens, TRAIN_PAD)
    if options.shared_layout:
        prefix = _round_up(max(options.prompt_tokens - 1, 1), TRAIN_PAD)
        return prompts_per_micro_batch(options) * prefix + rows * completion
    return rows * _round_up(options.prompt_tokens + options.max_completion_tokens, TRAIN_PAD)


def attention_scores(shape: ModelShape, options: StepOptions) -> int:
    """Query-key pairs of one block's attention over a micro-batch (all heads)."""
    rows = min(options.micro_batch_size, options.completions)
    completion = _round_up(options.max_completion_tokens, TRAIN_PAD)
    if options.shared_layout:
        prefix = _round_up(max(options.prompt_tokens - 1, 1), TRAIN_PAD)
        pairs = prompts_per_micro_batch(options) * prefix**2 + rows * completion * (
            prefix + completion
        )
    else:
        pairs = rows * _round_up(options.prompt_tokens + options.max_completion_tokens, 16) ** 2
    return shape.num_heads * pairs


def kv_set_bytes(shape: ModelShape, options: StepOptions) -> int:
    """One set of the rollout's key and value buffers at their widest, every layer and row."""
    length = options.prompt_tokens + options.max_completion_tokens
    if options.compiled_decode:  # the last column written is prompt + completion - 2
        columns = _round_up(length - 1, DECODE_CACHE_MULTIPLE)
    else:
        columns = _round_up(length, MLX_LM_CACHE_STEP)
    rows = options.completions
    return shape.num_layers * 2 * rows * shape.kv_dim * columns * shape.dtype_bytes


def left_out_bytes(shape: ModelShape, options: StepOptions) -> int:
    """A bound on what the training estimate leaves out: one more block's activations (the
    peak may fall inside a block's own scratch rather than at the logits), and the per-token
    arrays of a micro-batch (ids, positions, masks, log-probs and their gradients)."""
    rows = min(options.micro_batch_size, options.completions)
    per_token = 16 * rows * _round_up(options.max_completion_tokens, TRAIN_PAD) * 4
    return block_activation_bytes(shape, options) + per_token


def logits_bytes(shape: ModelShape, options: StepOptions) -> int:
    """The vocabulary projection's float32 logits at the peak of a micro-batch's training pass."""
    from .logprobs import logits_chunk

    rows = min(options.micro_batch_size, options.completions)
    positions = _round_up(options.max_completion_tokens, TRAIN_PAD)
    whole = rows * positions * shape.vocab_size * 4
    if options.compiled_training:
        return int(LOGIT_COPIES_COMPILED * whole)
    chunk = rows * min(positions, logits_chunk(rows, shape.vocab_size)) * shape.vocab_size * 4
    return int(LOGIT_CHUNK_COPIES * chunk + LOGIT_WHOLE_COPIES * whole)


def training_bounds(estimate: MemoryEstimate) -> tuple[float, float]:
    """The range a measured training-pass peak should fall in, from what the estimate leaves
    out or takes at its most: the logits may be as few as ``LOGIT_COPIES_LEAST`` copies, the
    activations off by ``ACTIVATION_SPREAD``, and ``left_out_bytes`` may come on top."""
    spread = ACTIVATION_SPREAD * estimate.activations
    options = estimate.options
    rows = min(options.micro_batch_size, options.completions)
    positions = _round_up(options.max_completion_tokens, TRAIN_PAD)
    fewest = LOGIT_COPIES_LEAST * rows * positions * estimate.shape.vocab_size * 4
    low = estimate.training - max(estimate.logits - fewest, 0) - spread
    high = estimate.training + spread + left_out_bytes(estimate.shape, estimate.options)
    return low, high


def block_activation_bytes(shape: ModelShape, options: StepOptions) -> int:
    """What one adapted block keeps for the backward pass of a micro-batch."""
    per_token = (
        SAVED_HIDDEN_PER_TOKEN * shape.hidden_size + SAVED_MLP_PER_TOKEN * shape.intermediate_size
    ) * shape.dtype_bytes
    return int(
        per_token * training_tokens(options) + SAVED_SCORE_BYTES * attention_scores(shape, options)
    )


def estimate_step(shape: ModelShape, options: StepOptions) -> MemoryEstimate:
    """The memory of one GRPO step of ``options`` on a model of ``shape``."""
    blocks = shape.adapted_blocks(options.lora_layers)
    rows = options.completions
    b = shape.dtype_bytes

    # Rollout: each layer's keys and values for every row, and the prompts' own caches.
    sets = DECODE_KV_SETS if options.compiled_decode else BATCH_GENERATOR_KV_SETS
    prefill = (
        options.batch_size
        * shape.num_layers
        * 2
        * shape.kv_dim
        * _round_up(options.prompt_tokens, MLX_LM_CACHE_STEP)
        * b
    )
    kv_cache = int(sets * kv_set_bytes(shape, options)) + prefill
    decode = int(DECODE_VOCAB_COPIES * rows * shape.vocab_size * 4)

    # Training pass of one micro-batch: what the adapted blocks keep, then the logits.
    tokens = training_tokens(options)
    if options.grad_checkpoint:
        kept = CHECKPOINTED_HIDDEN_PER_TOKEN * shape.hidden_size * b * tokens
        working = CHECKPOINT_WORKING_BLOCKS * block_activation_bytes(shape, options)
        activations = int(blocks * kept + working)
    else:
        activations = blocks * block_activation_bytes(shape, options)
    logits = logits_bytes(shape, options)

    adapters = ADAPTER_COPIES * shape.lora_parameters(options.lora_layers, options.lora_rank) * 4
    return MemoryEstimate(
        weights=shape.weight_bytes(),
        kv_cache=kv_cache,
        activations=activations,
        logits=logits,
        adapters=adapters,
        decode=decode,
        shape=shape,
        options=options,
    )


def device_memory() -> tuple[int | None, str]:
    """How much memory a run may use here, and what that figure is.

    On Metal, the GPU's recommended working set (beyond it macOS starts to page, and a step
    slows to a crawl); on CUDA, the device's memory; on the CPU, the machine's RAM.
    Returns ``(None, reason)`` where it cannot be read.
    """
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        try:
            info = mx.device_info()
        except Exception:  # older MLX: the Metal module's own call
            try:
                info = mx.metal.device_info()
            except Exception:
                info = {}
        for key, what in (
            ("max_recommended_working_set_size", "the GPU's recommended working set"),
            ("memory_size", "the device's memory"),
            ("total_memory", "the device's memory"),
        ):
            if info.get(key):
                return int(info[key]), what
        return None, "the device reports no memory size"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (ValueError, OSError, AttributeError):
        return None, "this machine's RAM size is unknown"


# What check_fits tries, in order, until the estimate fits: the options that cost the least
# (time, not results) first; the completion length last, since it changes what is learned.
def _candidates(options: StepOptions):
    sizes = []
    size = options.micro_batch_size
    while size > 1:
        size = max(1, size // 2)
        sizes.append(size)
    for size in sizes:
        yield {"micro_batch_size": size}
    if not options.grad_checkpoint:
        for size in [options.micro_batch_size, *sizes]:
            yield {"grad_checkpoint": True, "micro_batch_size": size}
    tokens = options.max_completion_tokens
    while tokens > 64:
        tokens = max(64, (tokens - 1) // 64 * 64)
        yield {"max_completion_tokens": tokens}
    for size in [options.micro_batch_size, *sizes]:
        yield {"grad_checkpoint": True, "micro_batch_size": size, "max_completion_tokens": 64}


def _flags(change: dict, options: StepOptions) -> str:
    parts = []
    for name, value in change.items():
        if value == getattr(options, name):
            continue
        flag = "--" + name.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def suggest(estimate: MemoryEstimate, limit_bytes: float) -> tuple[str, MemoryEstimate] | None:
    """The first change of options (``_candidates``) whose estimate fits ``limit_bytes``, as
    command-line flags, with its estimate; None if none does."""
    for change in _candidates(estimate.options):
        options = dataclasses.replace(estimate.options, **change)
        candidate = estimate_step(estimate.shape, options)
        if candidate.peak <= limit_bytes:
            return _flags(change, estimate.options), candidate
    return None


def check_fits(
    estimate: MemoryEstimate, limit_bytes: float, limit_name: str = "", escape: str = ""
) -> None:
    """Refuse a step whose estimated peak is over ``limit_bytes``, naming what to change.

    ``limit_name`` says what the limit is; ``escape``, if given, is appended (how to run
    anyway).

    Raises:
        ReasonerError: one line with the estimate, the limit and an option that fits.
    """
    if estimate.peak <= limit_bytes:
        return
    limit = f"{limit_bytes / GB:.1f} GB" + (f" ({limit_name})" if limit_name else "")
    head = f"a step needs about {estimate.describe()}, over the {limit} it may use"
    escape = f" ({escape})" if escape else ""
    if estimate.weights + estimate.adapters > limit_bytes:
        raise ReasonerError(
            f"{head}: the weights alone are {estimate.weights / GB:.1f} GB; use a smaller or "
            f"quantized model (mlx_lm.convert -q){escape}"
        )
    found = suggest(estimate, limit_bytes)
    if found is None:
        raise ReasonerError(
            f"{head}; no change of --micro-batch-size, --grad-checkpoint or "
            "--max-completion-tokens fits: lower --batch-size or --group-size, or use a smaller "
            f"or quantized model{escape}"
        )
    flags, fitted = found
    raise ReasonerError(f"{head}; use {flags} (about {fitted.peak / GB:.1f} GB){escape}")


def prompt_tokens_estimate(system_prompt: str) -> int:
    """A step's longest prompt in tokens, before any tokenizer or data is loaded: the system
    prompt's length over-counted, plus room for a question and the chat template."""
    return math.ceil(len(system_prompt) / CHARS_PER_TOKEN) + QUESTION_TOKENS


def model_shape(name_or_path: str) -> ModelShape | None:
    """The shape of a local model folder, or of a hub model from its ``config.json`` (from the
    local cache, else fetched alone); None where it cannot be read (loading will say why)."""
    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir():
            return ModelShape.from_folder(path)
        if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
            return None
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
        if not isinstance(cached, str):
            cached = hf_hub_download(name_or_path, "config.json")
        return ModelShape.from_folder(Path(cached).parent)
    except Exception:  # offline, unknown repo, odd config: no estimate, loading reports it
        return None


def _lora_layout(config) -> tuple[int, int]:
    """``(lora layers, rank)`` the run will train: a resumed run's, the --adapter-path's, or the
    options'."""
    try:
        if getattr(config, "resume", None):
            lora = json.loads((Path(config.resume) / "config.json").read_text())["lora"]
            return lora["num_layers"], lora["lora_parameters"]["rank"]
        if getattr(config, "adapter_path", None):
            saved = json.loads((Path(config.adapter_path) / "adapter_config.json").read_text())
            return saved["num_layers"], saved["lora_parameters"]["rank"]
    except (OSError, ValueError, KeyError):
        pass
    return config.lora_layers, config.lora_rank


def compiles_training_pass(shape: ModelShape) -> bool:
    """Whether ``trainer.GradientComputer`` compiles this model's training pass here (the
    trainer's own rule, ``trainer.compile_training_pass``, on the shape's parameter count)."""
    from .trainer import compile_training_pass

    return compile_training_pass(shape.parameters())


def step_options(config, prompt_tokens: int, shape: ModelShape | None = None) -> StepOptions:
    """The ``StepOptions`` of a train (or bench) config on this device (``shape`` decides
    whether the training pass is compiled; without it, as compiled)."""
    from .backend import uses_compiled_decode

    layers, rank = _lora_layout(config)
    compile = bool(getattr(config, "compile", True))
    return StepOptions.from_config(
        config,
        prompt_tokens,
        lora_layers=layers,
        lora_rank=rank,
        compiled_decode=compile and uses_compiled_decode(),
        compiled_training=compile and (shape is None or compiles_training_pass(shape)),
    )


def memory_limit(config) -> tuple[int | None, str]:
    """``--memory-limit-gb`` when given, else ``device_memory()``."""
    if getattr(config, "memory_limit_gb", None):
        return int(config.memory_limit_gb * GB), "--memory-limit-gb"
    return device_memory()


def preflight(config, system_prompt: str) -> MemoryEstimate | None:
    """The check ``train`` makes before it creates a run folder or loads a model: refuse a
    GRPO run whose estimated peak is over ``memory_limit(config)``.

    Returns the estimate, or None where it does not apply (another command, the check turned
    off, a model whose shape cannot be read).

    Raises:
        ReasonerError: the step will not fit; the message names an option that does.
    """
    if not hasattr(config, "group_size") or not getattr(config, "memory_check", True):
        return None
    shape = model_shape(config.model)
    if shape is None:
        return None
    options = step_options(config, prompt_tokens_estimate(system_prompt), shape)
    estimate = estimate_step(shape, options)
    limit, name = memory_limit(config)
    if limit is not None:
        # The estimate is an estimate: where the config has the switch, name the way past it.
        escape = "--no-memory-check runs it anyway" if hasattr(config, "memory_check") else ""
        check_fits(estimate, limit, name, escape)
    return estimate
