"""The student: any ``AutoModelForCausalLM`` (a directory, a hub id, or a model-config YAML trained from
scratch), checked against the store's vocabulary and split into a body (hidden states) and the LM
head's weight, so the loss can compute log-probs a chunk of positions at a time instead of
materializing [B, L, V] fp32 logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chorus.distill.losses import chunked_distill_loss, distill_loss_from_logits
from chorus.distill.sparse import SparseDist
from chorus.errors import ChorusError
from chorus.store import tokenizer_vocabulary

YAML_SUFFIXES = (".yaml", ".yml")


def _read_model_yaml(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ChorusError(f"student config '{path}' could not be read: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ChorusError(f"student config '{path}': expected a mapping with 'model_type' (e.g. llama) and config keys")
    return data


def load_student(spec: str, *, vocab_size: int, seq_len: int, seed: int = 0, trust_remote_code: bool = False,
                 tokenizer_fingerprint: str | None = None, store_tokens: dict[str, int] | None = None) -> nn.Module:
    """A causal LM from a directory / hub id (pretrained) or a model-config YAML (random init, seeded).

    The model must have at least ``vocab_size`` embedding rows (padded rows are cut from the softmax)
    and room for ``seq_len`` positions; a YAML without ``vocab_size`` gets the store's. A chorus model
    directory recording another ``tokenizer_fingerprint`` than the store's is refused, and so is any model directory
    whose ``tokenizer.json`` maps a token to another id than the store's tokenizer (``store_tokens``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.endswith(YAML_SUFFIXES):
        if not os.path.isfile(spec):
            raise ChorusError(f"student config '{spec}' not found")
        data = _read_model_yaml(spec)
        model_type = data.pop("model_type")
        data.setdefault("vocab_size", vocab_size)
        _check_heads(spec, data.get("hidden_size"), data.get("num_attention_heads"), "head_dim" in data)
        try:
            config = AutoConfig.for_model(model_type, **data)
        except Exception as e:  # ValueError, TypeError, KeyError, transformers' strict-dataclass validation errors
            raise ChorusError(f"student config '{spec}': {str(e).splitlines()[0]}") from None
        _check_config_keys(spec, model_type, data, config)
        _check_vocab(spec, config.vocab_size, vocab_size)
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ChorusError(f"student config '{spec}' does not build a model: {str(e).splitlines()[0]}") from None
    else:
        if spec.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(spec)):
            raise ChorusError(f"student '{spec}' not found: no such directory or model-config YAML")
        _check_tokenizer(spec, tokenizer_fingerprint)
        _check_tokens(spec, store_tokens)
        try:
            model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(spec), trust_remote_code=trust_remote_code)
        except Exception as e:  # OSError, hub errors, unknown architectures
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ChorusError(f"student '{spec}' could not be loaded ({first}); pass a model directory, hub id or "
                              "a model-config YAML") from None
    _check_vocab(spec, model.get_input_embeddings().num_embeddings, vocab_size)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos < seq_len:
        raise ChorusError(f"student '{spec}' handles {max_pos} positions but the store's rows have {seq_len} tokens")
    return model


def _check_config_keys(spec: str, model_type: str, data: dict, config: Any) -> None:
    """Refuse keys the model's config class does not know (a typo such as ``num_hiden_layers`` would be
    kept as an inert attribute and the model built with the default) and widths the heads cannot split.
    A key is known when a default config has it or the class consumed it (legacy names such as rope_theta)."""
    import difflib

    try:
        known = set(type(config)().to_dict())
    except Exception:  # a config class without defaults: nothing to compare with
        return
    unknown = sorted(k for k in data if k in set(config.to_dict()) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ChorusError(f"student config '{spec}': unknown key '{unknown[0]}' for model_type {model_type}{hint}")
    _check_heads(spec, getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None),
                 "head_dim" in data)


def _check_heads(spec: str, hidden: Any, heads: Any, has_head_dim: bool) -> None:
    """Before transformers' own validation, whose message is many lines: the widths the heads must split."""
    if isinstance(hidden, int) and isinstance(heads, int) and not has_head_dim:
        if heads < 1 or hidden < 1 or hidden % heads:
            raise ChorusError(f"student config '{spec}': hidden_size {hidden} is not a positive multiple of "
                              f"num_attention_heads {heads}")


def _check_tokenizer(spec: str, fingerprint: str | None) -> None:
    """A model directory written by chorus records the tokenizer it was trained with (``chorus.json``);
    a model trained on another tokenizer's ids would be silently wrong on this store's."""
    info_path = Path(os.path.expanduser(spec)) / "chorus.json"
    if fingerprint is None or not info_path.is_file():
        return
    import json

    try:
        recorded = json.loads(info_path.read_text()).get("tokenizer", {}).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        raise ChorusError(f"'{info_path}' is unreadable; restore it or delete it") from None
    if recorded is not None and recorded != fingerprint:
        raise ChorusError(f"student '{spec}' was trained with another tokenizer (fingerprint {recorded}, the store's "
                          f"is {fingerprint}); use a model trained on this store's tokenizer")


def _check_tokens(spec: str, store_tokens: dict[str, int] | None) -> None:
    """A model directory that ships a tokenizer (a plain Hugging Face checkpoint, no ``chorus.json``) must map every
    token to the store's id: the same fingerprint is not needed, the same vocabulary is."""
    path = Path(os.path.expanduser(spec)) / "tokenizer.json"
    if store_tokens is None or not path.is_file():
        return
    try:
        mine = tokenizer_vocabulary(path.read_bytes())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ChorusError(f"student '{spec}': its tokenizer.json is unreadable; restore it or remove it") from None
    if mine != store_tokens:
        diff = sorted(set(mine.items()) ^ set(store_tokens.items()), key=lambda kv: (kv[1], kv[0]))
        token, _ = diff[0]
        raise ChorusError(f"student '{spec}' has another tokenizer than the store's (token {token!r} is id "
                          f"{mine.get(token)} in the student's, {store_tokens.get(token)} in the store's; "
                          f"{len(mine)} and {len(store_tokens)} tokens); student and store must share the tokenizer")


def _check_vocab(spec: str, rows: int, vocab_size: int) -> None:
    if rows < vocab_size:
        raise ChorusError(f"student '{spec}' has {rows} vocabulary rows but the store's tokenizer has {vocab_size} ids; "
                          "student and store must share the tokenizer (set vocab_size in the model config)")


class Student(nn.Module):
    """A causal LM seen as body + LM head. ``forward`` returns the training loss, so DDP wraps the whole
    computation; ``log_probs_chunks`` serves evaluation.

    ``vocab_size`` is the store's: LM-head rows past it (padding of the embedding matrix) are dropped
    before the softmax, so every distribution is over the tokenizer's ids."""

    def __init__(self, model: nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.model, self.vocab_size = model, vocab_size
        self.split = self._can_split()

    # ------------------------------------------------------------------ structure
    def _body(self) -> nn.Module:
        get = getattr(self.model, "get_decoder", None)
        body = get() if callable(get) else None
        return body if body is not None else getattr(self.model, self.model.base_model_prefix)

    def _head(self) -> nn.Linear | None:
        head = self.model.get_output_embeddings()
        return head if isinstance(head, nn.Linear) else None

    @torch.no_grad()
    def _can_split(self) -> bool:
        """Body + head reproduce the model's logits (no soft-capping, logit scaling or extra projection)?
        Checked once on a tiny input; otherwise the loss falls back to the model's own logits."""
        if self._head() is None:
            return False
        was_training = self.model.training
        self.model.eval()
        try:
            ids = torch.arange(4, device=self.device)[None] % self.vocab_size
            full = self.model(input_ids=ids).logits.float()
            h = self._body()(input_ids=ids).last_hidden_state
            head = self._head()
            split = F.linear(h, head.weight, head.bias).float()
            return full.shape == split.shape and torch.allclose(full, split, atol=1e-4, rtol=1e-4)
        except Exception:
            return False
        finally:
            self.model.train(was_training)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def head_params(self) -> tuple[Tensor, Tensor | None]:
        head = self._head()
        w, b = head.weight[: self.vocab_size], head.bias
        return w, (b[: self.vocab_size] if b is not None else None)

    # ------------------------------------------------------------------ compute
    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, H) final hidden states (after the final norm)."""
        return self._body()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor, select: Tensor, gold: Tensor,
                targets: SparseDist | None, *, loss_fn: Any, kd_weight: float, temperature: float = 1.0,
                chunk_size: int | None = None, divergence_kwargs: dict | None = None,
                fused: bool = True) -> tuple[Tensor, dict]:
        """Loss over the N selected next-token positions. ``select`` (N,) indexes the flattened
        (B·(L-1)) positions that predict a real token, ``gold`` (N,) their tokens, ``targets`` a
        SparseDist over the same N positions (None: hard-label CE only)."""
        kw = dict(loss_fn=loss_fn, kd_weight=kd_weight, temperature=temperature, divergence_kwargs=divergence_kwargs)
        if self.split:
            h = self.hidden(input_ids, attention_mask)
            h = h[:, :-1].reshape(-1, h.shape[-1])[select]
            w, b = self.head_params()
            return chunked_distill_loss(h, w, gold, targets, chunk_size=chunk_size, lm_head_bias=b, fused=fused, **kw)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits[:, :-1, : self.vocab_size].reshape(-1, self.vocab_size)[select]
        return distill_loss_from_logits(logits, gold, targets, **kw)

    def log_probs_chunks(self, input_ids: Tensor, attention_mask: Tensor, select: Tensor, chunk_size: int = 1024):
        """Yields (slice, (n, V) fp32 log-probs) over the N selected positions, chunk by chunk."""
        if self.split:
            h = self.hidden(input_ids, attention_mask)
            h = h[:, :-1].reshape(-1, h.shape[-1])[select]
            w, b = self.head_params()
            for start in range(0, h.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                yield sl, F.log_softmax(F.linear(h[sl], w, b).float(), dim=-1)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits[:, :-1, : self.vocab_size].reshape(-1, self.vocab_size)[select]
            for start in range(0, logits.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                yield sl, F.log_softmax(logits[sl].float(), dim=-1)


LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


def with_lora(model: nn.Module, lora: dict, *, seed: int = 0) -> nn.Module:
    """``model`` with LoRA adapters (peft) on ``lora["target_modules"]`` (default every linear layer but the LM
    head); only the adapters train. Their init is seeded, so a run and its resumption build the same adapters."""
    if not lora:
        return model
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ChorusError(f"train key 'lora': unknown setting '{unknown[0]}'; expected some of: {', '.join(LORA_KEYS)}")
    r, alpha, dropout = lora.get("r", 16), lora.get("alpha", 2 * lora.get("r", 16)), lora.get("dropout", 0.0)
    if not (isinstance(r, int) and r >= 1) or not isinstance(alpha, (int, float)) or not 0 <= dropout < 1:
        raise ChorusError(f"train key 'lora': expected r a positive integer, alpha a number, dropout in [0, 1); got {lora}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ChorusError("train key 'lora' needs peft: pip install 'chorus[lora]'") from None
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                        target_modules=lora.get("target_modules", "all-linear"))
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ChorusError(f"train key 'lora': {str(e).splitlines()[0]}") from None


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")
