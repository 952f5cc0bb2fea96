"""Parameter and checkpoint key names under megatron's two layer specs, and spec-tolerant loading.

This module owns the mapping between the **local** layer spec (torch norms, megatron's own
linear layers; CPU and TE-less GPUs) and the **transformer-engine** spec (TE modules, GPU nodes),
so that a checkpoint written under one loads under the other (convert on a login node, train on
GPU nodes, and back).

State-dict (``named_parameters``) names differ only in the two pre-linear RMSNorms, which TE fuses
into the following linear layer (names below follow ``decoder.layers.N.``):

=============================  ================================================
local spec                     transformer-engine spec
=============================  ================================================
``input_layernorm.weight``     ``self_attention.linear_qkv.layer_norm_weight``
``pre_mlp_layernorm.weight``   ``mlp.linear_fc1.layer_norm_weight``
=============================  ================================================

Checkpoint (``ShardedTensor.key``) names use the TE form under both specs: megatron's local spec
maps its norms through ``sharded_state_dict_keys_map``; :func:`checkpoint_key` applies the same
rule to any key, so a custom local spec without that map still writes and reads TE-form keys.

``_extra_state`` entries are module-private blobs that differ between the specs: megatron's own
linear layers store ``None`` and ignore what they are given, TE modules store FP8 metadata (linear
layers, norms, ``TEDotProductAttention``; a TE-spec model whose core attention is not TE's has
none there). They are therefore the only keys allowed to be missing or extra on load:

* :func:`drop_unneeded_extra_state` removes from a load request the ``_extra_state`` objects
  that cannot or need not be restored (the live module stores ``None``, or the checkpoint was
  written under the other spec, whose blobs mean nothing to this one);
* :func:`check_key_mismatch` accepts checkpoint/request differences in ``_extra_state`` keys only
  and names anything else;
* :func:`load_model_state` is ``load_state_dict`` that tolerates missing ``_extra_state`` entries
  and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

LOCAL = "local"
TRANSFORMER_ENGINE = "transformer_engine"
LAYER_SPECS = (LOCAL, TRANSFORMER_ENGINE)

EXTRA_STATE = "_extra_state"

LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
"""Per-layer name suffixes of the two fused RMSNorms: local spec -> transformer-engine spec."""
TE_TO_LOCAL = {te: local for local, te in LOCAL_TO_TE.items()}

MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
"""Checkpoint keys of the model itself (optimizer keys start ``optimizer.``, EMA ``ema.``)."""


class LayerKeyError(ValueError):
    """A checkpoint and a model whose keys differ in more than ``_extra_state`` entries."""


def _replace_suffix(name: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if name == old or name.endswith("." + old):
            return name[: len(name) - len(old)] + new
    return name


def local_name(name: str) -> str:
    """Local-spec name of a parameter / state-dict name (TE fused-norm names mapped back)."""
    return _replace_suffix(name, TE_TO_LOCAL)


def te_name(name: str) -> str:
    """Transformer-engine-spec name of a parameter / state-dict name."""
    return _replace_suffix(name, LOCAL_TO_TE)


def checkpoint_key(key: str) -> str:
    """The spec-independent checkpoint form of a sharded key (TE naming of the fused norms).

    Works on bare keys (``decoder.layers.input_layernorm.weight``), per-layer state-dict names
    and keys with an optimizer / EMA prefix (``optimizer.state.exp_avg.decoder.layers...``).
    """
    return _replace_suffix(key, LOCAL_TO_TE)


def is_extra_state(key: str) -> bool:
    return key == EXTRA_STATE or key.endswith("." + EXTRA_STATE)


def is_model_key(key: str) -> bool:
    """True for a checkpoint key of the model's own state (not optimizer or EMA)."""
    return key.startswith(MODEL_KEY_PREFIXES)


def layer_spec_of(model: torch.nn.Module) -> str:
    """``"transformer_engine"`` when any submodule comes from transformer-engine (or megatron's
    TE extension), else ``"local"``."""
    for module in model.modules():
        origin = type(module).__module__
        if origin.startswith(("transformer_engine", "megatron.core.extensions.transformer_engine")):
            return TRANSFORMER_ENGINE
    return LOCAL


# ------------------------------------------------------------------------------ sharded requests


def _sharded_leaves(tree: Any) -> Iterable[tuple[Any, Any, Any]]:
    """``(container, key, value)`` for every leaf of a nested dict/list state dict."""
    if isinstance(tree, dict):
        items: Iterable[tuple[Any, Any]] = list(tree.items())
    elif isinstance(tree, list):
        items = list(enumerate(tree))
    else:
        return
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from _sharded_leaves(v)
        else:
            yield tree, k, v


def canonicalise_keys(sharded_state_dict: Any) -> int:
    """Rewrite the ``.key`` of every sharded entry (ShardedTensor, ShardedObject, factory) into
    :func:`checkpoint_key` form, in place; returns how many changed (0 with megatron's own local
    and TE specs, whose keys are already in that form)."""
    changed = 0
    for _, _, value in _sharded_leaves(sharded_state_dict):
        key = getattr(value, "key", None)
        if isinstance(key, str):
            new = checkpoint_key(key)
            if new != key:
                value.key = new
                changed += 1
    return changed


def drop_unneeded_extra_state(model_sharded_state_dict: dict[str, Any], *, same_spec: bool) -> int:
    """Remove ``_extra_state`` objects that must not be loaded from a model's load request.

    Dropped: all of them when the checkpoint was written under the other layer spec
    (``same_spec=False``), and those whose live value is ``None`` (megatron's local linear layers,
    which ignore what they are given). Returns how many were dropped.
    """
    doomed = [
        name
        for name, value in model_sharded_state_dict.items()
        if is_extra_state(name) and (not same_spec or getattr(value, "data", None) is None)
    ]
    for name in doomed:
        del model_sharded_state_dict[name]
    return len(doomed)


def check_key_mismatch(
    not_in_checkpoint: Iterable[str], not_requested: Iterable[str], *, where: str
) -> None:
    """Raise :class:`LayerKeyError` unless the differences are ``_extra_state`` keys only.

    ``not_in_checkpoint``: keys the load requested that the checkpoint lacks (megatron's
    "unexpected" keys); ``not_requested``: model keys the checkpoint has that the load did not
    request (megatron's "missing" keys; optimizer and EMA keys are ignored).
    """
    absent = sorted(k for k in not_in_checkpoint if not is_extra_state(k))
    unused = sorted(k for k in not_requested if is_model_key(k) and not is_extra_state(k))
    problems = []
    if absent:
        problems.append(f"the checkpoint lacks {absent[:6]}")
    if unused:
        problems.append(f"the model has no place for checkpoint tensors {unused[:6]}")
    if problems:
        raise LayerKeyError(f"{where}: " + "; ".join(problems))


def reconcile_request(
    sharded_state_dict: Any, checkpoint_keys: Iterable[str], *, where: str
) -> list[str]:
    """Fit a load request to what a checkpoint holds, in place, before megatron loads it.

    Requested ``_extra_state`` objects the checkpoint lacks are removed (returned); any other
    requested key the checkpoint lacks, and any model tensor of the checkpoint the request does
    not cover, raise :class:`LayerKeyError` (:func:`check_key_mismatch`). ``checkpoint_keys``:
    the checkpoint's sharded keys (``dist_checkpointing.load_sharded_metadata``).
    """
    available = set(checkpoint_keys)
    requested: set[str] = set()
    absent: list[tuple[Any, Any, str]] = []
    for container, name, leaf in list(_sharded_leaves(sharded_state_dict)):
        key = getattr(leaf, "key", None)
        if not isinstance(key, str):
            continue
        requested.add(key)
        if key not in available:
            absent.append((container, name, key))
    check_key_mismatch([k for *_, k in absent], available - requested, where=where)
    for container, name, _ in absent:  # only _extra_state left here
        if isinstance(container, dict):
            del container[name]
    return [k for *_, k in absent]


def load_model_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """``model.load_state_dict(state)`` where only ``_extra_state`` entries may be missing or
    extra; any other difference raises :class:`LayerKeyError`."""
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state(k)]
    unexpected = [k for k in result.unexpected_keys if not is_extra_state(k)]
    if missing or unexpected:
        raise LayerKeyError(
            f"state dict does not fit the model: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
