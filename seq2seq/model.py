"""The encoder-decoder Transformer of "Attention Is All You Need", shared by every domain.

Shapes: B batch, S source length, T target length, D model width, V output vocabulary.
Domains plug in the source embedding (ids or values -> (B, S, D)), the target embedding and the output head.

Known-future covariates (`future_steps` H > 0, declared by the source encoder): the last H rows of every source
are the covariates of output steps 1..H (the calendar of each forecast day, say). They bypass the encoder: a linear
map takes them to D, they take those rows' place in the memory (which cross-attention never attends), and the
decoder adds row k to its input at position k, the one that predicts output k + 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from seq2seq.attention import KVCache, MultiHeadAttention, causal_keep, padding_keep
from seq2seq.embeddings import IN_ATTENTION, POSITIONS, SINUSOIDS
from seq2seq.errors import ConfigError
from seq2seq.linear import Linear
from seq2seq.lora import LoRASpec
from seq2seq.schema import check, setting

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}  # silu: "swish" in Marian's configs


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and switches of the core; the `model:` config block. Defaults are the paper's base model."""

    block: ClassVar[str] = "model"
    d_model: int = setting(512, "width of every layer", minimum=1)
    n_heads: int = setting(8, "attention heads (must divide d_model)", minimum=1)
    n_kv_heads: int | None = setting(None, "key/value heads, each shared by n_heads / n_kv_heads query heads "
                                           "(grouped-query attention; null: n_heads, multi-head attention)",
                                     minimum=1)
    n_encoder_layers: int = setting(6, "encoder layers", minimum=1)
    n_decoder_layers: int = setting(6, "decoder layers", minimum=1)
    d_ff: int = setting(2048, "inner width of the position-wise feed-forward", minimum=1)
    dropout: float = setting(0.1, "the paper's residual dropout: sublayer outputs and embedding + position sums",
                             minimum=0, maximum=1)
    attention_dropout: float = setting(0.0, "dropout on attention probabilities (not in the paper)", minimum=0,
                                       maximum=1)
    activation_dropout: float = setting(0.0, "dropout after the feed-forward activation (not in the paper)",
                                        minimum=0, maximum=1)
    activation: str = setting("relu", "feed-forward activation", choices=ACTIVATIONS)
    norm_first: bool = setting(False, "false: post-norm Add & Norm as in the paper; true: pre-norm")
    positions: str = setting("sinusoidal", "position encoding: added to the embeddings (sinusoidal, learned) or "
                             "applied in self-attention (rope: rotary; alibi: linear biases)", choices=POSITIONS)
    sinusoid: str = setting("paper", "layout and frequencies of sinusoidal positions: paper (sines and cosines "
                            "interleaved), halves (sines then cosines: Marian), fairseq (halves, fairseq's "
                            "frequencies: M2M-100, NLLB)", choices=SINUSOIDS)
    position_offset: int = setting(0, "the position of the first token in sinusoidal positions (NLLB: 2)", minimum=0)
    max_positions: int = setting(1024, "longest source or target the model accepts", minimum=1)
    tie_output: bool = setting(True, "the output projection shares the target embedding's weight")
    share_embeddings: bool = setting(False, "one embedding for source and target (needs a joint vocabulary)")
    compile: bool = setting(False, "train through torch.compile: each layer compiled once, for any batch shape")
    checkpoint_activations: bool = setting(False, "in training, recompute each layer's activations in the backward "
                                           "pass instead of keeping them: less memory, for a second forward pass")
    lora: LoRASpec = dataclasses.field(default_factory=LoRASpec)

    def __post_init__(self) -> None:
        check(self)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"`model.d_model` ({self.d_model}) must be divisible by `model.n_heads` ({self.n_heads})"
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"`model.n_heads` ({self.n_heads}) must be a multiple of `model.n_kv_heads` "
                              f"({self.n_kv_heads})")
        if self.positions != "sinusoidal" and (self.position_offset or self.sinusoid != "paper"):
            raise ConfigError(f"`model.sinusoid` and `model.position_offset` shape sinusoidal positions; this model "
                              f"has `model.positions={self.positions}`: leave them out")
        if self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"`model.positions=rope` rotates pairs of dimensions: the head width d_model / n_heads "
                              f"({self.d_model // self.n_heads}) must be even")

    def attention(self, self_attention: bool = False) -> MultiHeadAttention:
        """An attention module of this spec; self-attention carries rotary or ALiBi positions where chosen."""
        positions = self.positions if self_attention and self.positions in IN_ATTENTION else None
        return MultiHeadAttention(self.d_model, self.n_heads, self.attention_dropout, self.n_kv_heads, positions,
                                  self.max_positions)


class Dropout(nn.Dropout):
    """`nn.Dropout`, with faster masks on the CPU in training: each mask element is a 16-bit slice of a 64-bit
    random word from torch's generator, kept when at or above the drop probability (rounded to a multiple of
    2^-16). Forward and backward take about 0.4x the time of torch's (whose CPU masks cost one draw per element:
    20% of a training step of the small preset); the mask it keeps for backward is in the input's dtype, not bool
    (so under bf16 autocast the 1 / (1 - p) scale is rounded to bf16, within 2^-9). Elsewhere (GPUs, compiled
    graphs, with their own fused dropout) it is `nn.Dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.p) or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        if self.p == 1:
            return x * 0
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, (-(-n // 4),), dtype=torch.int64)  # four 16-bit draws each
        keep = words.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))


class FeedForward(nn.Module):
    """Position-wise FFN(x) = W2 · act(W1 · x + b1) + b2."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.w1, self.w2 = Linear(spec.d_model, spec.d_ff), Linear(spec.d_ff, spec.d_model)
        self.act, self.dropout = ACTIVATIONS[spec.activation], Dropout(spec.activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.act(self.w1(x))))


class _Sublayers(nn.Module):
    """Residual Add & Norm around each sublayer: post-norm `norm(x + f(x))` or pre-norm `x + f(norm(x))`."""

    def __init__(self, spec: ModelSpec, n: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(spec.d_model) for _ in range(n))
        self.drop, self.norm_first = Dropout(spec.dropout), spec.norm_first

    def residual(self, i: int, x: Tensor, f) -> Tensor:
        if self.norm_first:
            return x + self.drop(f(self.norms[i](x)))
        return self.norms[i](x + self.drop(f(x)))


class EncoderLayer(_Sublayers):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec, 2)
        self.self_attn = spec.attention(self_attention=True)
        self.ff = FeedForward(spec)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x (B, S, D); keep (B, 1, 1, S)."""
        x = self.residual(0, x, lambda h: self.self_attn(h, keep=keep))
        return self.residual(1, x, self.ff)


class DecoderLayer(_Sublayers):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec, 3)
        self.self_attn = spec.attention(self_attention=True)
        self.cross_attn = spec.attention()
        self.ff = FeedForward(spec)

    def forward(self, y: Tensor, memory: Tensor, self_keep: Tensor, memory_keep: Tensor) -> Tensor:
        """y (B, T, D); memory (B, S, D); self_keep (B, 1, T, T); memory_keep (B, 1, 1, S)."""
        y = self.residual(0, y, lambda h: self.self_attn(h, keep=self_keep))
        y = self.residual(1, y, lambda h: self.cross_attn(h, memory, keep=memory_keep))
        return self.residual(2, y, self.ff)

    def step(self, y: Tensor, self_cache: KVCache, memory_kv: tuple[Tensor, Tensor], memory_keep: Tensor) -> Tensor:
        """One new position y (B, 1, D) through the self-attention cache and the memory's keys and values."""
        y = self.residual(0, y, lambda h: self.self_attn.step(h, self_cache))
        y = self.residual(1, y, lambda h: self.cross_attn.step_memory(h, memory_kv, memory_keep))
        return self.residual(2, y, self.ff)


@dataclass
class DecoderState:
    """What incremental decoding carries between steps: per-layer caches and the next position.

    Self-attention caches hold one row per hypothesis (B · beam); the memory's keys and values and the source mask
    one row per source (B), shared by its beams.
    """

    memory_keep: Tensor  # (B, 1, 1, S)
    self_caches: list[KVCache]
    memory_kvs: list[tuple[Tensor, Tensor]]  # per layer, (B, H, S, Dh) each
    position: int = 0
    future: Tensor | None = None  # (B · beam, future_steps, D) known-future covariates, added at their positions

    def reorder(self, index: Tensor) -> None:
        """Beam search: hypothesis row i continues row index[i] (B · beam,), a row of the same source."""
        # Copying only the rows that move: 1.12-1.19x beam-4 tokens/s on the CPU (benchmarks/decode_fast_paths.py).
        # Elsewhere finding them would wait on the device every step, so every row is copied.
        moved = None
        if index.device.type == "cpu":
            moved = (index != torch.arange(len(index), device=index.device)).nonzero()[:, 0]  # (M,)
            if not len(moved):
                return
        for cache in self.self_caches:
            cache.reorder(index, moved)


class EncoderDecoder(nn.Module):
    """embed -> add positions -> encoder layers -> (norm); embed -> add positions -> decoder layers -> head."""

    def __init__(self, spec: ModelSpec, src_embed: nn.Module, tgt_embed: nn.Module, head: nn.Module,
                 future_steps: int = 0, n_features: int = 0) -> None:
        super().__init__()
        self.spec, self.future_steps = spec, future_steps
        self.future_embed = Linear(n_features, spec.d_model) if future_steps else None
        self.src_embed, self.tgt_embed, self.head = src_embed, tgt_embed, head
        positions = POSITIONS[spec.positions]
        self.src_pos, self.tgt_pos = (positions(spec.d_model, spec.max_positions, spec.sinusoid, spec.position_offset)
                                      for _ in range(2))
        self.drop = Dropout(spec.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.n_decoder_layers))
        # Pre-norm stacks end with a norm; post-norm layers already end in one.
        final_norm = nn.LayerNorm if spec.norm_first else (lambda d: nn.Identity())
        self.encoder_norm, self.decoder_norm = final_norm(spec.d_model), final_norm(spec.d_model)

    def compile_layers(self, hooks_eager: bool = False) -> None:
        """Compile each layer's forward (training and teacher-forced scoring) in place, with dynamic batch and
        length dimensions: one graph per layer type serves every layer and batch shape. Incremental decoding
        (`decode_step`) stays eager. With `hooks_eager` (layers FSDP2 will shard), only the `forward` method is
        compiled, and the module's hooks (FSDP2's gathering and freeing) run eagerly around it; its shapes are
        static until one changes (marking every dimension dynamic up front makes inductor fail on the gathered
        weights under FSDP2, torch 2.13)."""
        # Without this, sizes that happen to be equal share one symbol (or take a weight's static size: a batch of
        # d_model rows), and a later batch where they differ compiles again.
        from torch.fx.experimental import _config as shape_config  # (no public switch)

        shape_config.use_duck_shape = False
        for layer in [*self.encoder, *self.decoder]:
            if hooks_eager:
                layer.forward = torch.compile(layer.forward)
            else:
                layer.compile(dynamic=True)

    def _layer(self, layer: nn.Module, *args: Tensor) -> Tensor:
        """One layer; with `checkpoint_activations` in training, its activations are recomputed in backward
        (the same dropout masks: the RNG state is restored for the recomputation)."""
        if self.spec.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    @property
    def device(self) -> torch.device:
        """Where the weights are (and where inputs must be)."""
        return next(self.parameters()).device

    def _future_rows(self, src_keep: Tensor) -> Tensor:
        """(B, H) indices of each source's known-future rows: its last `future_steps` real positions (a source
        holds at least one position before them: the encoder declaring them encodes it so)."""
        first = src_keep.sum(1, keepdim=True) - self.future_steps  # (B, 1)
        return first + torch.arange(self.future_steps, device=src_keep.device)  # (B, H)

    def memory_keep(self, src_keep: Tensor) -> Tensor:
        """(B, S) the memory positions cross-attention reads: the real source positions, less known-future rows."""
        if not self.future_steps:
            return src_keep
        first = self._future_rows(src_keep)[:, :1]  # (B, 1)
        return torch.arange(src_keep.shape[1], device=src_keep.device)[None] < first

    def future_vectors(self, memory: Tensor, src_keep: Tensor) -> Tensor | None:
        """(B, H, D) the known-future covariates' vectors, from their rows of the memory."""
        if not self.future_steps:
            return None
        rows = self._future_rows(src_keep)[..., None].expand(-1, -1, memory.shape[-1])  # (B, H, D)
        return memory.gather(1, rows)

    def _embed_target(self, tokens: Tensor, future: Tensor | None, offset: int = 0) -> Tensor:
        """tokens (B, T) from position `offset` -> decoder inputs (B, T, D), known-future covariates added."""
        y = self.tgt_embed(tokens)  # (B, T, D)
        if future is not None and offset < future.shape[1]:
            ahead = future[:, offset : offset + y.shape[1]]  # (B, <=T, D)
            y = torch.cat([y[:, : ahead.shape[1]] + ahead, y[:, ahead.shape[1] :]], dim=1)
        return self.drop(self.tgt_pos(y, offset=offset))

    def encode(self, src: Tensor, src_keep: Tensor) -> Tensor:
        """src (B, S) ids or (B, S, F) values; src_keep (B, S) -> memory (B, S, D)."""
        x = self.drop(self.src_pos(self.src_embed(src)))  # (B, S, D)
        past = self.memory_keep(src_keep)  # (B, S)
        keep = padding_keep(past)  # (B, 1, 1, S)
        for layer in self.encoder:
            x = self._layer(layer, x, keep)
        x = self.encoder_norm(x)
        if self.future_embed is not None:  # known-future rows: their own linear map, not the encoder
            x = torch.where((src_keep & ~past)[..., None], self.future_embed(src), x)
        return x

    def decode(self, tgt_in: Tensor, memory: Tensor, src_keep: Tensor, tgt_keep: Tensor) -> Tensor:
        """Teacher-forced decoder: tgt_in (B, T), memory (B, S, D) -> hidden states (B, T, D), before the head."""
        y = self._embed_target(tgt_in, self.future_vectors(memory, src_keep))  # (B, T, D)
        self_keep = causal_keep(tgt_keep)  # (B, 1, T, T)
        memory_keep = padding_keep(self.memory_keep(src_keep))  # (B, 1, 1, S)
        for layer in self.decoder:
            y = self._layer(layer, y, memory, self_keep, memory_keep)
        return self.decoder_norm(y)

    def forward(self, src: Tensor, src_keep: Tensor, tgt_in: Tensor, tgt_keep: Tensor,
                select: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, T, V); with `select` (B, T) bool, only those positions' logits (N, V).

        Training goes through here (one call of the module), so wrappers that act on its forward (DDP, FSDP2's
        parameter gathering) see the whole step. Adapted weights (LoRA) are computed once for the pass, however
        often it reads them."""
        with parametrize.cached():
            hidden = self.decode(tgt_in, self.encode(src, src_keep), src_keep, tgt_keep)  # (B, T, D)
            return self.head(hidden if select is None else hidden[select])

    @torch.no_grad()
    def cross_attention(self, src: Tensor, src_keep: Tensor, tgt_in: Tensor) -> Tensor:
        """Last decoder layer's cross-attention probabilities (B, H, T, S) on a teacher-forced pass."""
        seen: dict[str, Tensor] = {}
        layer = self.decoder[-1].cross_attn

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["x"], seen["memory"], seen["keep"] = args[0], args[1], kwargs["keep"]

        handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self(src, src_keep, tgt_in, torch.ones_like(tgt_in, dtype=torch.bool))
        finally:
            handle.remove()
        return layer.weights(seen["x"], seen["memory"], seen["keep"])

    def start_decoding(self, memory: Tensor, src_keep: Tensor, max_len: int, beam: int = 1) -> DecoderState:
        """Caches for up to `max_len` decoding steps of `beam` hypotheses per source over memory (B, S, D)."""
        rows = memory.shape[0] * beam
        future = self.future_vectors(memory, src_keep)
        return DecoderState(
            memory_keep=padding_keep(self.memory_keep(src_keep)),
            self_caches=[layer.self_attn.empty_cache(rows, max_len, memory) for layer in self.decoder],
            memory_kvs=[layer.cross_attn.memory_keys_values(memory) for layer in self.decoder],
            future=None if future is None else future.repeat_interleave(beam, dim=0),
        )

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed the newest tokens (B,) and return next-token logits (B, V); advances `state`."""
        y = self._embed_target(tokens[:, None], state.future, offset=state.position)  # (B, 1, D)
        for layer, self_cache, memory_kv in zip(self.decoder, state.self_caches, state.memory_kvs, strict=True):
            y = layer.step(y, self_cache, memory_kv, state.memory_keep)
        state.position += 1
        return self.head(self.decoder_norm(y))[:, 0]  # (B, V)
