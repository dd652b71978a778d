"""Shared-base drafts: one base draft per replica, one small LoRA adapter per query cluster.

With a full draft per cluster a replica's memory grows by a whole draft per cluster. In
shared-base mode the clusters differ only by peft LoRA adapters (the distiller's
mode='lora'), so a replica holds ONE base draft plus ~0.5 % of it per cluster (SmolLM2's
2-layer self-draft at rank 8). The base weights are never changed and nothing is merged:
an ``AdapterDraft`` activates its own adapter on the shared base for each forward.

What travels is ``adapter_state_dict``: only the lora_A / lora_B tensors of one adapter,
named as in ``draft.model.state_dict()`` with the peft adapter name dropped
(``model.layers.0.self_attn.q_proj.lora_A.weight``), so what the trainer exports (its
adapter is called "default") loads into a replica that calls it "a12_code_v7". The shapes
fix rank and targets but not alpha, so the manifest carries an ``AdapterSpec`` in ``meta``.

Concurrency (``SharedBaseDrafts``). peft's active adapter is global state of the module
tree: every LoRA layer reads it in its forward. So "activate X, then run the base" must not
interleave with another thread's activation, and adding or deleting an adapter edits the
dicts those forwards read. One re-entrant lock covers each call into the shared model (a
draft forward, ~ms) and each add/remove, so a swap waits for at most one forward and a
forward for at most one add. The lock is per forward, not per request: requests interleave
between forwards, and each forward sets its own adapter again (a pointer per LoRA layer).
Cost to know: peft's add_adapter walks every module, every resident adapter's included, so
an add holds the lock ~20 ms + ~2-4 ms per resident adapter on SmolLM2's 2-layer draft
(~0.2 s with 50 adapters): a swap stalls the draft forwards that long, once.

Lifetime: Python's reference count is the use count. A request holds its ``AdapterDraft``
from start to end (``engine.generate`` reads the draft once; the ``Drafter`` keeps it), so
it runs the same adapter throughout even if its cluster was swapped meanwhile.
``remove(d)`` only drops the registry's own reference; when the last reference to ``d``
goes, a ``weakref.finalize`` queues its adapter name (an append: no lock, so it is safe in
whatever thread or GC pass it runs), and the queue is emptied under the lock by the next
add, remove or ``collect()`` (never by a forward: deleting costs ~15 ms on a 2-layer
SmolLM2 draft holding 50 adapters, which a request should not pay). An adapter is
therefore never deleted while anything can still call it, and the request path needs no
release call.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import re
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from osd.models.drafts import DraftModel
from osd.registry import DraftMismatchError, TensorSpecs, spec_diff, tensor_specs

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

__all__ = ["AdapterDraft", "AdapterSpec", "SharedBaseDrafts", "adapter_state_dict", "load_adapter_state_dict"]

ADAPTER_FORMAT = "lora-v1"  # meta["adapter_format"]: marks a registry version as an adapter, not a full draft
_TEMPLATE = "shape_template"  # adapter built once at construction to learn the expected specs, then deleted


class AdapterSpec(BaseModel):
    """What a replica needs to build a LoRA config compatible with the trainer's adapters.

    Rank and targets also show in the tensor names and shapes; alpha does not (the update
    is scaled by alpha / rank at run time), which is why the manifest must carry it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(gt=0.0, description="LoRA alpha; the update is scaled by alpha / rank.")
    targets: str | tuple[str, ...] = Field(
        "all-linear", description="peft target_modules: 'all-linear' (every linear but the LM head) or module names.")

    @field_validator("targets", mode="before")
    @classmethod
    def _normalise_targets(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            v = tuple(sorted(set(v)))
            if not v or not all(isinstance(t, str) and t and "," not in t for t in v):
                raise ValueError("targets must be 'all-linear' or non-empty module names without commas")
        elif isinstance(v, str) and v != "all-linear":
            raise ValueError(f"targets {v!r}: use 'all-linear' or a list of module names, e.g. ['q_proj', 'v_proj']")
        return v

    @classmethod
    def from_distill_config(cls, config: Any) -> AdapterSpec:
        """The spec of a ``trainers.config.DistillConfig`` in mode='lora' (duck-typed: osd does not import trainers)."""
        return cls(rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets)

    def lora_config(self) -> LoraConfig:
        """The peft config for serving: no dropout, adapters frozen (inference_mode)."""
        from peft import LoraConfig

        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0,
                          bias="none", inference_mode=True)

    def to_meta(self) -> dict[str, str | int | float]:
        """For ``DraftRegistry.publish(meta=...)``: str/int/float values only."""
        targets = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
        return {"adapter_format": ADAPTER_FORMAT, "lora_rank": self.rank, "lora_alpha": float(self.alpha),
                "lora_targets": targets}

    @classmethod
    def from_meta(cls, meta: Mapping[str, str | int | float]) -> AdapterSpec | None:
        """The spec a manifest's ``meta`` describes; None when the version is a full draft, not an adapter."""
        if "adapter_format" not in meta:
            return None
        if meta["adapter_format"] != ADAPTER_FORMAT:
            raise DraftMismatchError(f"adapter format {meta['adapter_format']!r} is not {ADAPTER_FORMAT!r}; "
                                     "upgrade this replica or republish the adapter")
        targets = str(meta["lora_targets"])
        return cls(rank=int(meta["lora_rank"]), alpha=float(meta["lora_alpha"]),
                   targets=targets if targets == "all-linear" else tuple(targets.split(",")))


# --------------------------------------------------------------------------- adapter tensors


def _hf_root(model: nn.Module) -> nn.Module:
    """The HF model inside a PeftModel / LoraModel (whose names match ``draft.model.state_dict()``)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    return model.model if isinstance(model, BaseTuner) else model


def _lora_layers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in root.named_modules() if isinstance(m, BaseTunerLayer)]


def _adapter_params(root: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """Stable name -> the live parameter of ``adapter``: peft's name with the adapter segment dropped."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    out: dict[str, nn.Parameter] = {}
    for mod_name, layer in _lora_layers(root):
        for kind in layer.adapter_layer_names:  # lora_A, lora_B (+ embedding / DoRA variants)
            container = getattr(layer, kind, None)
            if container is None or adapter not in container:
                continue
            prefix = f"{mod_name}.{kind}" if mod_name else kind
            item = container[adapter]
            if isinstance(item, nn.Module):
                out.update({f"{prefix}.{p}": t for p, t in item.named_parameters()})
            else:  # a bare Parameter (lora_embedding_A/B)
                out[prefix] = item
    for name, m in root.named_modules():
        if isinstance(m, AuxiliaryTrainingWrapper) and adapter in getattr(m, "_adapters", ()):
            raise ValueError(f"adapter {adapter!r} also trains {name!r} whole (modules_to_save); shared-base mode "
                             "carries LoRA tensors only: drop modules_to_save from the LoRA config")
    return out


def _single_active(model: nn.Module) -> str:
    from peft import PeftModel

    active = model.active_adapters if isinstance(model, PeftModel) else sorted(
        {a for _, layer in _lora_layers(_hf_root(model)) for a in layer.active_adapters})
    if len(active) != 1:
        raise ValueError(f"expected exactly one active adapter, found {list(active)}; pass adapter= to pick one")
    return active[0]


def adapter_state_dict(peft_model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """The tensors of one adapter (default: the active one), detached, names free of the adapter name.

    ``peft_model``: a PeftModel, a LoraModel or an HF model with LoRA layers injected.
    Returns views of the live parameters, like ``state_dict()``: clone before training on.
    """
    adapter = adapter or _single_active(peft_model)
    params = _adapter_params(_hf_root(peft_model), adapter)
    if not params:
        raise ValueError(f"model has no adapter named {adapter!r}")
    return {k: p.detach() for k, p in params.items()}


def load_adapter_state_dict(peft_model: nn.Module, state: Mapping[str, Tensor], adapter: str | None = None) -> None:
    """Copy ``state`` (``adapter_state_dict`` names) into an existing adapter, e.g. to resume training.

    Checks names, shapes, dtypes and finiteness first: on a mismatch nothing is written.
    """
    adapter = adapter or _single_active(peft_model)
    params = _adapter_params(_hf_root(peft_model), adapter)
    _check_adapter_state(state, tensor_specs(params), where=f"adapter {adapter!r}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def _check_adapter_state(state: Mapping[str, Tensor], want: TensorSpecs, where: str) -> None:
    bad_type = [k for k, t in state.items() if not isinstance(t, Tensor)]
    if bad_type:
        raise DraftMismatchError(f"{where}: entries {bad_type[:5]} are not tensors")
    if problems := spec_diff(tensor_specs(state), want):
        raise DraftMismatchError(f"{where} does not fit the shared base: {'; '.join(problems)}. Was it trained on "
                                 "another base draft, or with another LoRA rank / targets?")
    # NaN weights would make q NaN: the draft's proposals are then garbage and sampled
    # verification would divide by nothing. Refuse them here, where it is cheap.
    nonfinite = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if nonfinite:
        raise DraftMismatchError(f"{where}: tensor(s) {nonfinite[:5]} hold NaN or inf values; republish the adapter")


# --------------------------------------------------------------------------- serving


class _Handle:
    """Names one adapter; it lives as long as anything that can run the adapter (see Lifetime above).

    Held by the AdapterDraft and by every ``_Bound`` taken from it, so keeping only
    ``draft.model`` around still keeps the adapter. Refers to nothing, so it is never in a cycle.
    """

    __slots__ = ("name", "__weakref__")

    def __init__(self, name: str | None):
        self.name = name


class _Bound:
    """A module of the shared model that runs with one adapter active, under the shared lock.

    What an ``AdapterDraft`` exposes as ``.model``, so code that calls ``draft.model(...)``,
    ``draft.model.model(...)`` or ``draft.model.get_decoder()(...)`` directly (the tree
    engine, the distiller's student_logits, the gate) gets the right adapter too. Other
    attributes (config, dtype, device, ...) are read through; only calls are locked.
    """

    __slots__ = ("_owner", "_handle", "_module")

    def __init__(self, owner: SharedBaseDrafts, handle: _Handle, module: nn.Module):
        self._owner, self._handle, self._module = owner, handle, module

    def __call__(self, *args, **kwargs):
        with self._owner._using(self._handle.name):
            return self._module(*args, **kwargs)

    forward = __call__

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def _bind(self, module: nn.Module | None):
        return None if module is None else _Bound(self._owner, self._handle, module)

    @property
    def model(self) -> _Bound:  # LlamaForCausalLM.model: the decoder
        return self._bind(self._module.model)

    def get_decoder(self) -> _Bound:
        return self._bind(self._module.get_decoder())

    def get_output_embeddings(self):
        head = self._module.get_output_embeddings()
        return self._bind(head) if self._owner._is_adapted(head) else head  # a plain head stays an nn.Linear

    def get_input_embeddings(self):
        emb = self._module.get_input_embeddings()
        return self._bind(emb) if self._owner._is_adapted(emb) else emb

    def __deepcopy__(self, memo):
        raise TypeError("an AdapterDraft's model is shared with every other cluster; it cannot be deep-copied. "
                        "Add another adapter with SharedBaseDrafts.add instead")

    def __repr__(self) -> str:
        return f"_Bound(adapter={self._handle.name!r}, {type(self._module).__name__})"


class AdapterDraft(DraftModel):
    """A DraftModel view of the shared base with one adapter (None: the plain base).

    Same call signature and attributes the engines, drafters, gate and distiller use:
    ``forward(input_ids, past_key_values, logits_to_keep)``, ``.model``, ``.config``,
    ``.shortlist``, ``.vocab_size``, ``_shortlist_head()``, ``parameters()`` (for the device).
    Holds no weights of its own; build it with ``SharedBaseDrafts.add`` / ``base_draft``.
    """

    def __init__(self, owner: SharedBaseDrafts, handle: _Handle, cluster: str, version: int):
        nn.Module.__init__(self)  # not DraftModel.__init__: the weights are the owner's
        self._owner = owner
        self._handle = handle
        self.cluster = cluster
        self.version = version
        self.model = _Bound(owner, handle, owner._hf)  # a plain attribute, not a submodule
        self.vocab_size = owner.base.vocab_size
        self.register_buffer("shortlist", owner.base.shortlist, persistent=False)
        self._head_cache = None

    @property
    def adapter(self) -> str | None:
        """The peft adapter name, unique per ``add``; None for the base draft."""
        return self._handle.name

    def forward(self, input_ids: Tensor, past_key_values=None, logits_to_keep: int = 0,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """input_ids: [B, S] → logits [B, S or logits_to_keep, V] fp32, as DraftModel.forward, with this adapter."""
        with self._owner._using(self.adapter):  # held across the body and the shortlist head
            return super().forward(input_ids, past_key_values, logits_to_keep, return_hidden)

    def _shortlist_head(self) -> Tensor:
        # The head is never adapted when there is a shortlist (checked at construction), so
        # every cluster shares the base's one cached [K, H] gather instead of one each.
        with self._owner._lock:
            return self._owner.base._shortlist_head()

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self._owner.base.parameters(recurse)  # what `next(draft.parameters()).device` reads

    def __deepcopy__(self, memo):
        raise TypeError("an AdapterDraft shares its base with every other cluster and cannot be deep-copied; "
                        "use SharedBaseDrafts.add for another cluster's adapter")

    def extra_repr(self) -> str:
        return f"cluster={self.cluster!r}, version={self.version}, adapter={self.adapter!r}"


class SharedBaseDrafts:
    """One base draft, many named LoRA adapters, hot-swapped atomically; see the module docstring.

    ``base`` is adapted in place (peft injects LoRA layers into ``base.model``) but its
    weights are never written. After wrapping, call the base only through ``base_draft()``:
    ``base`` itself would run whichever adapter happens to be active.
    """

    def __init__(self, base: DraftModel, spec: AdapterSpec):
        if isinstance(base, AdapterDraft):
            raise TypeError("wrap a plain DraftModel; this one is already an AdapterDraft")
        from peft import get_peft_model

        self.base = base
        self.spec = spec
        self._lock = threading.RLock()  # see the module docstring: one forward or one add/remove at a time
        self._depth = 0  # nesting of _using in the lock holder (a draft forward calling its .model)
        self._active: object = _UNSET  # what the LoRA layers run now; _UNSET forces the next forward to set it
        self._counter = itertools.count(1)
        self._held: dict[str, AdapterDraft] = {}  # added and not removed: our own strong references
        self._present: dict[str, tuple[str, int]] = {}  # adapter name -> (cluster, version), until deleted
        self._doomed: collections.deque[str] = collections.deque()  # unreferenced, delete under the lock
        # get_peft_model wants an adapter: a template one, used to learn the exact tensor
        # names/shapes/dtypes an adapter must have on this base, then deleted.
        self.peft_model: PeftModel = get_peft_model(base.model, spec.lora_config(), adapter_name=_TEMPLATE,
                                                    autocast_adapter_dtype=False)
        self._tuner = self.peft_model.base_model  # LoraModel: add/delete go through it
        self._hf = self._tuner.model  # == base.model, now with LoRA layers
        assert self._hf is base.model
        self._specs = tensor_specs(_adapter_params(self._hf, _TEMPLATE))
        self._layers = [layer for _, layer in _lora_layers(self._hf)]
        self._set_active(None)
        self._tuner.delete_adapter(_TEMPLATE)
        if base.shortlist is not None and self._is_adapted(self._hf.get_output_embeddings()):
            raise ValueError("a shortlist draft's LM head is served as a gather of its base rows, so it cannot carry "
                             "an adapter; leave the LM head out of the LoRA targets ('all-linear' does)")
        self._base_draft = AdapterDraft(self, _Handle(None), "global", 0)

    # -- the lock and the active adapter -----------------------------------------------------

    @contextlib.contextmanager
    def _using(self, adapter: str | None) -> Iterator[None]:
        with self._lock:
            if self._depth and self._active != adapter:
                raise RuntimeError(f"nested draft calls with different adapters ({self._active!r} inside, "
                                   f"{adapter!r} asked); call one AdapterDraft at a time")
            if self._active != adapter:
                self._set_active(adapter)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1

    def _set_active(self, adapter: str | None) -> None:
        """Point every LoRA layer at ``adapter`` (None: none, i.e. the plain base). Lock held.

        peft's public set_adapter also re-sets requires_grad on every adapter of every
        layer: ~40 ms with 50 adapters on a tiny 2-layer draft, on each cluster change. The
        served adapters are frozen once (inference_mode), so only the pointer is needed.
        """
        if adapter is not None and adapter not in self._present:
            # A LoRA layer skips an unknown active adapter and would silently run the base.
            raise RuntimeError(f"adapter {adapter!r} was deleted while still referenced; this is a bug")
        names = [] if adapter is None else [adapter]
        for layer in self._layers:
            layer._active_adapter = names
        self._active = adapter

    def _is_adapted(self, module: nn.Module | None) -> bool:
        return any(module is layer for layer in self._layers)

    # -- adding and removing -----------------------------------------------------------------

    def adapter_specs(self) -> TensorSpecs:
        """name -> (shape, dtype) every adapter must match: pass to ``registry.load_validated``."""
        return {k: (list(shape), dtype) for k, (shape, dtype) in self._specs.items()}

    def base_draft(self) -> AdapterDraft:
        """The plain base draft (no adapter): what "global v0" serves. Always the same object."""
        return self._base_draft

    def add(self, cluster: str, version: int, adapter_state: Mapping[str, Tensor],
            meta: Mapping[str, str | int | float] | None = None) -> AdapterDraft:
        """Load ``adapter_state`` (``adapter_state_dict`` names) as a new adapter for ``cluster`` v``version``.

        ``meta``: the manifest's meta, checked against this replica's spec when given.
        Raises DraftMismatchError naming what does not fit; nothing changes on failure.
        """
        where = f"adapter for cluster {cluster!r} v{version}"
        if meta is not None:
            got = AdapterSpec.from_meta(meta)
            if got is None:
                raise DraftMismatchError(f"{where} is a full draft (its meta has no adapter_format), but this replica "
                                         "serves shared-base adapters; publish export_adapter_state_dict() instead")
            if (got.rank, got.alpha) != (self.spec.rank, self.spec.alpha):
                raise DraftMismatchError(f"{where} was trained with rank {got.rank}, alpha {got.alpha}; this replica "
                                         f"serves rank {self.spec.rank}, alpha {self.spec.alpha}. Keep the live draft "
                                         "and align DistillConfig.lora_rank/lora_alpha with the replica's spec")
        _check_adapter_state(adapter_state, self._specs, where)  # before touching the model
        name = f"a{next(self._counter)}_{re.sub(r'[^A-Za-z0-9_]', '_', cluster)}_v{version}"
        with self._lock:
            try:
                self.peft_model.add_adapter(name, self.spec.lora_config(), autocast_adapter_dtype=False)
                params = _adapter_params(self._hf, name)
                assert tensor_specs(params) == self._specs, "peft built a different adapter than the template"
                with torch.no_grad():
                    for k, p in params.items():
                        p.copy_(adapter_state[k])
            except BaseException:
                if name in self._tuner.peft_config:
                    self._set_active(None)
                    self._tuner.delete_adapter(name)
                raise
            finally:
                self._active = _UNSET  # peft's add re-points the layers at its own notion of "active"
            handle = _Handle(name)
            draft = AdapterDraft(self, handle, cluster, version)
            self._present[name] = (cluster, version)
            self._held[name] = draft
            weakref.finalize(handle, self._doomed.append, name).atexit = False
            self._reap()
        return draft

    def remove(self, draft: AdapterDraft) -> bool:
        """Give up this registry's reference to ``draft``; its weights go once nothing else holds it.

        Requests still running with it keep working; the adapter is deleted by the first
        add/remove/collect after the last reference is dropped. Returns False if it was
        already removed.
        """
        if draft is self._base_draft:
            raise ValueError("the base draft is shared by every adapter and cannot be removed")
        if draft._owner is not self:
            raise ValueError(f"{draft!r} belongs to another SharedBaseDrafts")
        with self._lock:
            removed = self._held.pop(draft.adapter, None) is not None
            self._reap()
        return removed

    def collect(self) -> list[str]:
        """Delete now every adapter nothing references any more; returns their names."""
        with self._lock:
            return self._reap()

    def _reap(self) -> list[str]:
        """Delete the queued adapters (nothing references them). Lock held."""
        gone = []
        while self._doomed:
            name = self._doomed.popleft()
            if name in self._tuner.peft_config:
                self._set_active(None)  # so peft's delete does not pick a new active adapter itself
                self._tuner.delete_adapter(name)
                self._active = _UNSET
            self._present.pop(name, None)
            gone.append(name)
        return gone

    # -- inspection --------------------------------------------------------------------------

    def adapters(self) -> dict[str, tuple[str, int]]:
        """Adapter name -> (cluster, version) of every adapter still in memory (retired ones in use included)."""
        with self._lock:
            return dict(self._present)

    def memory_bytes(self) -> dict[str, Any]:
        """{"base": bytes of the base draft, "adapters": {adapter name: bytes}} (after collecting)."""
        with self._lock:
            self._reap()
            adapters = {name: sum(p.nbytes for p in _adapter_params(self._hf, name).values())
                        for name in self._present}
            lora_ids = {id(p) for _, layer in _lora_layers(self._hf) for kind in layer.adapter_layer_names
                        if isinstance(getattr(layer, kind, None), nn.Module)
                        for p in getattr(layer, kind).parameters()}
            seen, base = set(), 0
            for t in itertools.chain(self._hf.parameters(), self._hf.buffers()):
                key = (t.untyped_storage().data_ptr(), t.data_ptr())  # tied weights count once
                if id(t) not in lora_ids and key not in seen:
                    seen.add(key)
                    base += t.nbytes
            return {"base": base, "adapters": adapters}


_UNSET = object()
