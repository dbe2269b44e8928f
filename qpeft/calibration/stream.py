"""A causal or masked LM run one layer at a time, its weights streamed from safetensors.

Calibration needs forward passes (the input Gram matrices) and backward passes (the
Fisher) through the whole model, but never all of its weights at once. The hidden
states of all calibration sequences are kept at every layer boundary, so each
decoder layer is loaded once for the forward sweep and once for the backward sweep,
which recomputes its forward from the stored input and turns the gradient at its
output into the gradient at its input (layer-sequential, as GPTQ runs its forward).

On the device: one decoder layer, the embeddings, final norm and LM head, and one
batch of activations. On the CPU: the hidden states, (layers + 1) × sequences ×
seqlen × hidden in the calibration dtype (SmolLM2, 32 × 512 tokens: 1.2 GB in fp32;
LLaMA-2-70B: 43 GB). Compute is a third more than one whole-model forward and
backward, for the recomputed forward.

Supported: LLaMA-style decoders (`model.embed_tokens`, `model.layers`, `model.norm`,
`model.rotary_emb`, `lm_head`: LLaMA, Mistral, Qwen2, ...) with their next-token
loss, and BERT-style encoders with a masked-LM head (`LayerwiseMaskedLM`: BERT,
RoBERTa) with BERT's masked-LM loss. Attention runs through SDPA without a mask,
causal where the model's attention is, which is exact for the unpadded full-length
windows that calibration uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from tqdm.auto import tqdm

from qpeft.distributed import is_main_process
from qpeft.errors import QpeftError


class LayerwiseLM:
    """A model directory's causal LM with parameters on the meta device except the
    ones outside the decoder layers; `loaded(i)` materialises decoder layer i.
    `layerwise_model` picks this class or `LayerwiseMaskedLM` by the model's task."""

    layers_prefix = "model.layers"

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        from qpeft.models.skeleton import build_skeleton, model_weights

        # SDPA: mask-free attention, causal where the model's attention is (see the module docstring)
        self.model = (
            build_skeleton(model_dir, dtype, attn_implementation="sdpa").requires_grad_(False).eval()
        )  # eval: no dropout (BERT: 0.1)
        self.dtype, self.device = dtype, torch.device(device)
        self.weights = model_weights(model_dir, self.model)
        self.layers: nn.ModuleList = self._check_layout(model_dir)
        tied_to = getattr(self.model, "all_tied_weights_keys", None) or {}  # a tied key → its source
        tied = {}
        for key, _ in self.model.named_parameters():  # everything outside the layers stays on the device
            if key.startswith(f"{self.layers_prefix}."):
                continue
            if key in self.weights.weight_map:
                self._set(key, self.weights.tensor(key).to(self.dtype))
            elif key in tied_to:
                tied[key] = tied_to[key]
            else:
                raise QpeftError(f"{model_dir}: {key} is not in the weights and is tied to no other tensor")
        for key, source in tied.items():  # a tied head: the very tensor it is tied to
            parent, _, attr = key.rpartition(".")
            setattr(self.model.get_submodule(parent), attr, self.model.get_parameter(source))

    def _check_layout(self, model_dir: Path) -> nn.ModuleList:
        from qpeft.models.skeleton import model_task

        self.base = getattr(self.model, "model", None)
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        if self.base is None or not all(hasattr(self.base, p) for p in parts) or not hasattr(self.model, "lm_head"):
            if hasattr(self.model.base_model, "encoder"):  # an encoder without its masked-LM head
                raise QpeftError(
                    f"{type(self.model).__name__} ({model_task(model_dir)}) has no masked-LM head, whose loss "
                    "calibration (Fisher, GPTQ, activations) needs: use the checkpoint with its head (…ForMaskedLM), "
                    "or --no-fisher and --rounding nearest"
                )
            raise QpeftError(
                f"{type(self.model).__name__} ({model_task(model_dir)}): calibration (Fisher, GPTQ, activations) "
                "runs layer by layer through LLaMA-style causal LMs (model.embed_tokens, model.layers, model.norm, "
                "model.rotary_emb, lm_head) and BERT-style masked LMs, and needs their loss: use --no-fisher and "
                "--rounding nearest"
            )
        self.base.rotary_emb.to(self.device)
        return self.base.layers

    def _set(self, key: str, value: torch.Tensor | None) -> None:
        set_module_tensor_to_device(self.model, key, self.device if value is not None else "meta", value=value)

    @contextlib.contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Layer `index` with its weights on the device; back to meta after."""
        prefix = f"{self.layers_prefix}.{index}"
        for name, _ in self.layers[index].named_parameters():
            self._set(f"{prefix}.{name}", self.weights.tensor(f"{prefix}.{name}").to(self.dtype))
        try:
            yield self.layers[index]
        finally:
            for name, _ in self.layers[index].named_parameters():
                self._set(f"{prefix}.{name}", None)

    def linear_names(self, index: int, names: list[str]) -> list[str]:
        """Those of `names` that belong to layer `index`."""
        prefix = f"{self.layers_prefix}.{index}."
        return [n for n in names if n.startswith(prefix)]

    def _inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """What the layers see of token ids (sequences × seqlen): a causal LM all of
        them, a masked LM its masked copy."""
        return ids

    def _targets(self, ids: torch.Tensor) -> torch.Tensor:
        """The token each position of `_logits` predicts (-100: none)."""
        return ids[:, 1:]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.base.norm(hidden))[:, :-1]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(ids)

    def _run_layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
        rotary = self.base.rotary_emb(hidden, position_ids=positions)
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        return out[0] if isinstance(out, tuple) else out

    def _batches(self, count: int, batch_size: int) -> list[slice]:
        return [slice(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]

    @torch.no_grad()
    def forward_sweep(
        self,
        ids: torch.Tensor,
        batch_size: int = 1,
        keep: bool = False,
        on_layer: Callable[[int], None] | None = None,
        progress: str | None = None,
    ) -> list[torch.Tensor]:
        """Hidden states at the layer boundaries for token ids (sequences × seqlen):
        all of them (entering layer 0 … leaving the last) with `keep`, else only the
        last. `on_layer(i)` runs after layer i has seen every sequence."""
        batches, ids = self._batches(ids.shape[0], batch_size), self._inputs(ids)
        hidden = torch.cat([self._embed(ids[b].to(self.device)).cpu() for b in batches])
        states = [hidden]
        for index in tqdm(
            range(len(self.layers)), desc=progress, unit="layer", disable=progress is None or not is_main_process()
        ):
            with self.loaded(index) as layer:
                hidden = torch.cat([self._run_layer(layer, hidden[b].to(self.device)).cpu() for b in batches])
            if on_layer is not None:
                on_layer(index)
            states = [*states, hidden] if keep else [hidden]
        return states

    def sequence_loss_grad(self, last: torch.Tensor, ids: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
        """∂/∂h of Σ_s (mean NLL of sequence s's predicted tokens: the next token of a
        causal LM, the masked ones of a masked LM), h the last layer's output: each
        sequence's own loss gradient, unscaled by the others."""
        grads, all_targets = [], self._targets(ids)
        for b in self._batches(ids.shape[0], batch_size):
            hidden = last[b].to(self.device).requires_grad_(True)
            logits, targets = self._logits(hidden), all_targets[b].to(self.device)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
            nll = nll.view(hidden.shape[0], -1)
            predicted = (targets != -100).sum(dim=1).clamp(min=1)
            (nll.sum(dim=1) / predicted).sum().backward()
            grads.append(hidden.grad.cpu())
        return torch.cat(grads)

    def backward_sweep(
        self, states: list[torch.Tensor], grad: torch.Tensor, batch_size: int = 1, progress: str | None = None
    ) -> None:
        """Backpropagate `grad` (at the last layer's output) through every layer, last
        first, from the stored inputs `states` (consumed): module hooks on the layers'
        linear maps see the same activations and output gradients as in a whole-model
        backward."""
        batches = self._batches(grad.shape[0], batch_size)
        order = reversed(range(len(self.layers)))
        for index in tqdm(
            order,
            total=len(self.layers),
            desc=progress,
            unit="layer",
            disable=progress is None or not is_main_process(),
        ):
            inputs = states.pop(index)
            del states[index:]  # the layer's output is not needed any more
            with self.loaded(index) as layer:
                next_grad = []
                for b in batches:
                    hidden = inputs[b].to(self.device).requires_grad_(True)
                    self._run_layer(layer, hidden).backward(grad[b].to(self.device))
                    next_grad.append(hidden.grad.cpu())
            grad = torch.cat(next_grad)


class LayerwiseMaskedLM(LayerwiseLM):
    """A BERT-style masked LM (`<prefix>.embeddings`, `<prefix>.encoder.layer`, one
    head module beside the base: BERT's `cls`, RoBERTa's `lm_head`) run layer by
    layer. Its loss is BERT's masked-LM objective (Devlin et al. 2019, §3.1): 15% of
    the positions, at least one per sequence, are predicted; of those 80% are
    replaced by the mask token, 10% by a random token, 10% left as they are. The
    choice is drawn from a fixed seed over all the sequences at once, so the forward
    sweep (and the input Grams it collects) and the loss agree."""

    mask_rate, seed = 0.15, 0

    def _check_layout(self, model_dir: Path) -> nn.ModuleList:
        from transformers import AutoTokenizer

        prefix = self.model.base_model_prefix
        self.base = getattr(self.model, prefix, None)
        heads = [module for name, module in self.model.named_children() if name != prefix]
        encoder = getattr(self.base, "encoder", None)
        if (
            self.base is None
            or not hasattr(self.base, "embeddings")
            or not hasattr(encoder, "layer")
            or len(heads) != 1
        ):
            raise QpeftError(
                f"{type(self.model).__name__}: layer-wise masked-LM calibration needs BERT's layout "
                f"({prefix}.embeddings, {prefix}.encoder.layer, one head)"
            )
        self.head = heads[0]
        self.layers_prefix = f"{prefix}.encoder.layer"
        self.mask_token_id = AutoTokenizer.from_pretrained(model_dir).mask_token_id
        if self.mask_token_id is None:
            raise QpeftError(f"{model_dir}: the tokenizer has no mask token, which the masked-LM loss needs")
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        for name, buffer in self.base.embeddings.named_buffers():  # position and token-type ids
            set_module_tensor_to_device(self.base.embeddings, name, self.device, value=buffer)
        return encoder.layer

    def _draw(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the masked copy of `ids`, which positions are predicted)."""
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise QpeftError(
                f"--calib-seqlen {ids.shape[1]} is longer than the model's context "
                f"(max_position_embeddings {self.max_positions})"
            )
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(ids.shape, generator=generator)
        predicted = scores < self.mask_rate
        predicted[torch.arange(ids.shape[0]), scores.argmin(dim=1)] = True  # at least one per sequence
        how = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(0, self.model.config.vocab_size, ids.shape, generator=generator)
        masked = ids.clone()
        masked[predicted & (how < 0.8)] = self.mask_token_id
        swap = predicted & (how >= 0.8) & (how < 0.9)
        masked[swap] = random_ids[swap]
        return masked, predicted

    def _inputs(self, ids: torch.Tensor) -> torch.Tensor:
        return self._draw(ids)[0]

    def _targets(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where(self._draw(ids)[1], ids, -100)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embeddings(input_ids=ids)

    def _run_layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out


def layerwise_model(
    model_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LayerwiseLM:
    """The layer-wise runner of the model's task: `LayerwiseMaskedLM` for a masked
    LM, `LayerwiseLM` (which names what it supports) for anything else."""
    from qpeft.models.skeleton import model_task

    runner = LayerwiseMaskedLM if model_task(model_dir) == "masked-lm" else LayerwiseLM
    return runner(model_dir, dtype, device)
