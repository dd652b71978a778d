"""The online distiller: trains a copy of the draft on training records as they arrive.

Each record teaches one row per emitted token: row i is the target's next-token
distribution given ``prompt + output[:i]``, so the draft is fed
``prompt + output[:-1]`` and its logits at positions ``len(prompt) - 1 + i`` are the
student side of row i. No generation and no target forward happen here: the teacher is
the sparse top-k rows the engine stored while verifying (DESIGN.md § Distillation).

Records are split as they arrive: a fixed share goes to a held-out window the gate judges
candidates on (never trained on, so the gate's α̂ is an honest estimate), the rest waits
for the next update. Every ``update_interval`` training records, ``steps_per_update``
optimizer steps run over them.

The distiller owns its draft: a deep copy of the live one, so serving (which reads the
live draft) never sees half-trained weights. What leaves it is a plain state dict or a
fresh plain DraftModel, in the live draft's layout even in LoRA mode.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from osd.data.records import TrainingRecord
from osd.models.drafts import ACCEPTANCE_HEAD_PREFIX, SHORTLIST_KEY, DraftModel
from trainers.config import DistillConfig
from trainers.losses import distillation_loss
from trainers.shortlist import TokenTally, coverage, grown_shortlist

log = logging.getLogger(__name__)

_DEDUPE_WINDOW = 4096  # request ids remembered: the buffer delivers at least once


@dataclass
class Batch:
    """Records collated for one draft forward. N = teacher rows over all records."""

    input_ids: Tensor  # [B, S] int64: prompt + output[:-1], right-padded with 0
    attention_mask: Tensor  # [B, S] int64: 1 on real tokens
    row_batch: Tensor  # [N] int64: which sequence each teacher row belongs to
    row_pos: Tensor  # [N] int64: the position whose logits predict that row
    teacher_ids: Tensor  # [N, k] int32
    teacher_logprobs: Tensor  # [N, k] float16
    teacher_logsumexp: Tensor  # [N] float32
    on_policy: Tensor  # [N] bool: the draft proposed here (TrainingRecord.on_policy_mask)

    @property
    def num_rows(self) -> int:
        return int(self.row_pos.shape[0])


def has_rows(record: TrainingRecord, max_seq_len: int) -> bool:
    """Whether collate keeps ``record``: it has a teacher row and a prompt token before it."""
    return min(record.num_positions, max_seq_len) > 0 and bool(record.prompt_ids)


def collate(records: Sequence[TrainingRecord], max_seq_len: int, device: str | torch.device = "cpu") -> Batch | None:
    """Right-pad records into one batch; None when no record has an output row.

    A record longer than ``max_seq_len`` keeps its first T' = min(T, max_seq_len) rows and
    the last P' prompt tokens that still fit (at least one: row 0 needs a context).
    """
    seqs, rb, rp, ids, lps, lses, pol = [], [], [], [], [], [], []
    top_k = None
    for rec in records:
        if not has_rows(rec, max_seq_len):
            continue
        rows = min(rec.num_positions, max_seq_len)
        if top_k is None:
            top_k = rec.top_k
        elif rec.top_k != top_k:
            raise ValueError(f"records in one batch must share teacher_top_k; got {top_k} and {rec.top_k}. "
                             "Train records from differently configured engines separately.")
        prompt = rec.prompt_ids[-min(len(rec.prompt_ids), max_seq_len - rows + 1):]
        b = len(seqs)
        seqs.append(prompt + rec.output_ids[: rows - 1])
        rb.append(torch.full((rows,), b, dtype=torch.long))
        rp.append(torch.arange(rows, dtype=torch.long) + len(prompt) - 1)
        ids.append(rec.teacher_token_ids[:rows])
        lps.append(rec.teacher_logprobs[:rows])
        lses.append(rec.teacher_logsumexp[:rows])
        pol.append(rec.on_policy_mask()[:rows])
    if not seqs:
        return None
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, : len(s)] = 1
    cat = lambda xs: torch.cat(xs).to(device)  # noqa: E731
    return Batch(input_ids.to(device), attention_mask.to(device), cat(rb), cat(rp), cat(ids), cat(lps), cat(lses),
                 cat(pol))


def student_hidden(draft: DraftModel, batch: Batch) -> Tensor:
    """The draft's final-norm hidden states [N, H] at the batch's teacher rows."""
    # A LoRA draft's linears are adapted in place, so this runs the adapters too.
    hidden = draft.model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return hidden[batch.row_batch, batch.row_pos]


def student_logits(draft: DraftModel, batch: Batch, use_shortlist: bool = True) -> Tensor:
    """The draft's logits [N, V] (fp32) at the batch's teacher rows.

    Training passes use_shortlist=False: the shortlist is a serving-time saving, and
    training the full head keeps forward KL finite when the teacher's top-k reaches
    outside the shortlist (q = 0 there would make the loss infinite). The gate scores
    the draft as it is served, shortlist included.

    The LM head runs on those N positions only, not on all B·S (the prompt positions are
    most of them, and a 49152-row head is most of a small draft's cost). A shortlist
    draft gets -inf outside its shortlist, exactly as DraftModel.forward serves it.
    """
    hf = draft.model
    hidden = student_hidden(draft, batch)  # [N, H]
    head = hf.get_output_embeddings()
    if draft.shortlist is None or not use_shortlist:
        return head(hidden).float()
    if isinstance(head, nn.Linear) and head.bias is None:
        short = (hidden @ head.weight[draft.shortlist].T).float()  # [N, K]
    else:  # an adapted or biased head: run it whole, then keep the shortlist
        short = head(hidden)[:, draft.shortlist].float()
    logits = short.new_full((short.shape[0], draft.vocab_size), float("-inf"))
    logits[:, draft.shortlist] = short
    return logits


def needs_master(param: Tensor) -> bool:
    """Whether a trainable parameter steps through an fp32 master copy: a half-precision one."""
    return param.dtype in (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class UpdateResult:
    """What one update did. ``loss`` is the mean mixed loss over the steps taken."""

    update: int  # 1-based count of updates so far
    loss: float  # 0.0 when no step had a weighted row
    steps: int  # optimizer steps taken
    skipped_steps: int  # steps with nothing weighted or a non-finite gradient
    records: int  # records trained on in this update
    rows: int  # teacher rows those records hold
    on_policy_rows: int
    records_seen: int  # every record added so far, held-out ones included
    seconds: float
    shortlist_size: int = 0  # ids in the draft's shortlist head after this update; 0 = the full head


class OnlineDistiller:
    """Trains a private copy of ``draft``; see the module docstring."""

    def __init__(self, draft: DraftModel, config: DistillConfig | None = None):
        self.config = cfg = config or DistillConfig()
        self._shortlist = None if draft.shortlist is None else draft.shortlist.detach().clone()
        self._peft = None
        self.draft = self._student(draft).train()
        params = [p for p in self.draft.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every draft parameter is frozen; unset freeze_embeddings/freeze_head/"
                             "freeze_layers or use mode='lora'")
        # A bf16/fp16 draft trains through fp32 master copies: the optimizer steps on them and the
        # draft's own weights are their rounding. Stepped in bf16 directly, an AdamW step of ~lr = 1e-4
        # is below half an ulp of most weights (bf16 keeps 8 mantissa bits) and is lost.
        self._masters = [(p, p.detach().float().requires_grad_(True)) for p in params if needs_master(p)]
        master_of = {id(p): m for p, m in self._masters}
        stepped = [master_of.get(id(p), p) for p in params]
        self.optimizer = (torch.optim.AdamW(stepped, lr=cfg.lr, weight_decay=cfg.weight_decay)
                          if cfg.optimizer == "adamw" else torch.optim.SGD(stepped, lr=cfg.lr, weight_decay=cfg.weight_decay))
        self._params = params
        self._stepped = stepped
        self._pending: list[TrainingRecord] = []
        self.holdout: deque[TrainingRecord] = deque(maxlen=cfg.holdout_size)
        self._holdout_arrivals: deque[int] = deque(maxlen=cfg.holdout_size)  # records_seen when each arrived
        self._holdout_credit = 1.0 - cfg.holdout_fraction if cfg.holdout_fraction > 0 else 0.0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._generator = torch.Generator().manual_seed(cfg.seed)
        self.records_seen = 0
        self.updates = 0
        self.acceptance_head = None  # osd.decoding.stopping.AcceptanceHead once config.acceptance_head is on and it trained
        self.tally = TokenTally(draft.vocab_size)  # target mass per token over the training records
        self.duplicates = 0

    def _student(self, draft: DraftModel) -> DraftModel:
        """The private copy of ``draft`` that trains, on the trainer device."""
        cfg = self.config
        hf = copy.deepcopy(draft.model).to(cfg.device)
        if cfg.mode == "lora":
            from peft import LoraConfig, get_peft_model  # local: full mode must not need peft

            # get_peft_model adapts `hf`'s linears in place and freezes everything else.
            self._peft = get_peft_model(hf, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                       target_modules=cfg.lora_targets, lora_dropout=0.0))
        else:
            self._freeze(hf)
        return DraftModel(hf, self._shortlist)

    def _freeze(self, hf: nn.Module) -> None:
        """Full mode: freeze embeddings / head / layers by parameter identity, so a tied pair stays consistent."""
        frozen = set()
        if self.config.freeze_layers:
            layers = hf.get_decoder().layers
            if max(self.config.freeze_layers) >= len(layers):
                raise ValueError(f"freeze_layers {self.config.freeze_layers} names a layer the draft lacks: it has "
                                 f"{len(layers)} decoder layers, indexed from 0")
            for i in self.config.freeze_layers:
                frozen |= {id(p) for p in layers[i].parameters()}
        if self.config.freeze_embeddings:
            frozen |= {id(p) for p in hf.get_input_embeddings().parameters()}
        if self.config.freeze_head:
            frozen |= {id(p) for p in hf.get_output_embeddings().parameters()}
        for p in hf.parameters():
            p.requires_grad_(id(p) not in frozen)

    # -- feeding -----------------------------------------------------------------------------

    @property
    def pending_records(self) -> tuple[TrainingRecord, ...]:
        """Training records waiting for the next update (not yet trained on)."""
        return tuple(self._pending)

    def add(self, records: TrainingRecord | Iterable[TrainingRecord]) -> list[UpdateResult]:
        """Take records; run an update each time ``update_interval`` training records are waiting.

        Returns the updates run (usually none or one). A record whose request_id was seen
        recently is dropped: the buffer may redeliver.
        """
        if isinstance(records, TrainingRecord):
            records = [records]
        results = []
        for rec in records:
            if rec.request_id in self._seen:
                self.duplicates += 1
                continue
            self._seen[rec.request_id] = None
            if len(self._seen) > _DEDUPE_WINDOW:
                self._seen.popitem(last=False)
            self.records_seen += 1
            # Deterministic split: every 1/fraction-th record, starting with the first, so the
            # gate has something to judge by the first update.
            self._holdout_credit += self.config.holdout_fraction
            if self._holdout_credit >= 1.0 - 1e-9:
                self._holdout_credit -= 1.0
                self.holdout.append(rec)
                self._holdout_arrivals.append(self.records_seen)
                continue
            self.tally.add(rec)
            self._pending.append(rec)
            if len(self._pending) >= self.config.update_interval:
                results.append(self.update())
        return results

    def holdout_ages(self) -> list[int]:
        """Per held-out record (in ``holdout`` order), the records taken in since it arrived: the gate's recency."""
        return [self.records_seen - arrived for arrived in self._holdout_arrivals]

    def maybe_update(self, force: bool = False) -> UpdateResult | None:
        """Update if ``update_interval`` records wait, or (``force``) if any do."""
        if len(self._pending) >= self.config.update_interval or (force and self._pending):
            return self.update()
        return None

    # -- training ----------------------------------------------------------------------------

    def update(self) -> UpdateResult:
        """Optimizer steps over the pending records, which are then dropped: ``steps_per_update`` for a
        full update, a proportional share (at least one) for a partial one forced at low traffic."""
        start = time.perf_counter()
        cfg = self.config
        records, self._pending = self._pending, []
        order = torch.randperm(len(records), generator=self._generator).tolist() if records else []
        losses, skipped = [], 0
        self.draft.train()
        for step in range(self._steps_for(len(records))):
            chosen = [records[order[(step * cfg.batch_size + j) % len(order)]]
                      for j in range(min(cfg.batch_size, len(order)))]
            loss = self._step(chosen)
            if loss is None:
                skipped += 1
            else:
                losses.append(loss)
        self.updates += 1
        if cfg.acceptance_head != "off" and records:
            self._train_acceptance_head(records)
        self._grow_shortlist()
        rows = sum(min(r.num_positions, cfg.max_seq_len) for r in records)
        on_policy = sum(int(r.on_policy_mask()[: cfg.max_seq_len].sum()) for r in records)
        return UpdateResult(self.updates, sum(losses) / len(losses) if losses else 0.0, len(losses), skipped,
                            len(records), rows, on_policy, self.records_seen, time.perf_counter() - start,
                            0 if self._shortlist is None else self._shortlist.numel())

    def _grow_shortlist(self) -> None:
        """Serve (and gate) the draft through the tally's shortlist once it qualifies (trainers.shortlist)."""
        grown = grown_shortlist(self.tally, self._shortlist, self.holdout, self.config.shortlist_size,
                                self.config.shortlist_coverage)
        if grown is not self._shortlist:
            log.info("distiller: shortlist head %s -> %d ids from %d records (held-out coverage %.3f)",
                     "full" if self._shortlist is None else self._shortlist.numel(), grown.numel(),
                     self.tally.records, coverage(grown, self.holdout))
            self._shortlist = grown
            self.draft.set_shortlist(grown)

    def _steps_for(self, n: int) -> int:
        """Steps for an update of n records. A full update's steps repeated on one or two records
        over-fit them: in the drift bench (a forced update per record at ~1 request per 15 s) the
        draft got worse on a new kind of traffic with every update."""
        cfg = self.config
        if n >= cfg.update_interval:
            return cfg.steps_per_update
        return max(1, math.ceil(cfg.steps_per_update * n / cfg.update_interval))

    def _train_acceptance_head(self, records: list[TrainingRecord]) -> None:
        """Refit SpecDec++'s head to the draft as it now is, warm-started, on the records just trained on."""
        from trainers.acceptance_head import train_acceptance_head  # it builds on this module

        self.acceptance_head = train_acceptance_head(
            self.draft, records, greedy=self.config.acceptance_head == "greedy", head=self.acceptance_head,
            steps=self.config.acceptance_head_steps, seed=self.config.seed + self.updates)

    def _loss(self, records: list[TrainingRecord]) -> Tensor | None:
        """The batch's distillation loss; None when nothing in it would carry weight."""
        cfg = self.config
        batch = collate(records, cfg.max_seq_len, cfg.device)
        r = cfg.on_policy_ratio
        if batch is None or (r == 1.0 and not batch.on_policy.any()):
            return None  # no forward at all: nothing would carry weight
        logits = student_logits(self.draft, batch, use_shortlist=False)  # [N, V], full head
        teacher = (batch.teacher_ids, batch.teacher_logprobs, batch.teacher_logsumexp)
        kw = dict(beta=cfg.jsd_beta, temperature=cfg.distill_temperature)
        loss = logits.new_zeros(())
        if r < 1.0:
            loss = loss + (1.0 - r) * distillation_loss(cfg.loss, logits, *teacher, None, **kw)
        if r > 0.0:
            # Each term is a mean over its own rows, so r really is the on-policy share of the loss.
            loss = loss + r * distillation_loss(cfg.loss, logits, *teacher, batch.on_policy, **kw)
        return loss

    def _step(self, records: list[TrainingRecord]) -> float | None:
        """One optimizer step; None when skipped (nothing weighted, or a non-finite gradient)."""
        cfg = self.config
        loss = self._loss(records)
        if loss is None:
            return None
        self.optimizer.zero_grad(set_to_none=True)
        for p, _ in self._masters:
            p.grad = None
        loss.backward()
        for p, master in self._masters:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        norm = torch.nn.utils.clip_grad_norm_(self._stepped, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm):
            # e.g. a shortlist draft whose shortlist misses a teacher token under reverse KL;
            # stepping would write NaN into the weights.
            log.warning("skipping a distillation step with a non-finite gradient norm (%s)", float(norm))
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, master in self._masters:
                p.copy_(master)  # the draft's dtype: what is served, gated and exported
        return float(loss.detach())

    # -- export ------------------------------------------------------------------------------

    def _plain_model(self) -> nn.Module:
        """A fresh HF model copy in the live draft's layout (LoRA merged in), on the trainer device."""
        if self._peft is None:
            return copy.deepcopy(self.draft.model)
        # merge_and_unload folds W + (alpha/r)·B·A into each base weight and drops the peft
        # wrappers; on a copy, so training can go on with the adapters unmerged.
        return copy.deepcopy(self._peft).merge_and_unload()

    def export_state_dict(self) -> dict[str, Tensor]:
        """The current weights with the live draft's names and shapes (``draft.model.state_dict()``), plus
        the shortlist under ``shortlist`` when the draft has one and the acceptance head's under
        ``acceptance_head.`` once it trains (osd.models.drafts.published_state_dict)."""
        if self._peft is None:
            state = {k: v.detach().clone() for k, v in self.draft.published_module.state_dict().items()}
        else:
            state = self._plain_model().state_dict()
        if self._shortlist is not None:
            state[SHORTLIST_KEY] = self._shortlist.detach().cpu().clone()
        if self.acceptance_head is not None:
            state |= {ACCEPTANCE_HEAD_PREFIX + k: v.detach().clone() for k, v in self.acceptance_head.state_dict().items()}
        return state

    def export_adapter_state_dict(self) -> dict[str, Tensor]:
        """mode='lora' only: just the LoRA tensors, for shared-base replicas (``osd.models.adapters.SharedBaseDrafts.add``).

        Names as ``osd.models.adapters.adapter_state_dict`` (no peft adapter name); CPU copies in
        the draft's dtype (peft may keep fp16/bf16 adapters in fp32 while training). Publish
        with ``meta=AdapterSpec.from_distill_config(config).to_meta()``. Only valid against
        the base this distiller started from: the adapters are a delta on it.
        """
        if self._peft is None:
            raise ValueError("export_adapter_state_dict needs DistillConfig(mode='lora'): in mode='full' there is no "
                             "adapter, only whole weights; publish export_state_dict() instead")
        from osd.models.adapters import adapter_state_dict  # local: full mode must not need peft

        dtype = self._peft.get_base_model().get_input_embeddings().weight.dtype  # base weights keep the draft dtype
        return {k: v.detach().to("cpu", dtype, copy=True) for k, v in adapter_state_dict(self._peft).items()}

    @property
    def trainable_parameters(self) -> int:
        """How many parameters the optimizer updates."""
        return sum(p.numel() for p in self._params)

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """mode='lora' only: continue training from a published adapter (names as export_adapter_state_dict)."""
        if self._peft is None:
            raise ValueError("load_adapter_state_dict needs DistillConfig(mode='lora')")
        from osd.models.adapters import load_adapter_state_dict  # local: full mode must not need peft

        load_adapter_state_dict(self._peft, state)
        with torch.no_grad():
            for p, master in self._masters:
                master.copy_(p)

    def candidate(self) -> DraftModel:
        """A plain, eval-mode DraftModel with the current weights, independent of further training."""
        model = self._plain_model().eval()
        model.requires_grad_(False)
        return DraftModel(model, self._shortlist, acceptance_head=copy.deepcopy(self.acceptance_head)).eval()
