"""The built-in trainers: fedfuse's seeded AdamW loop for classification and LM, transformers' Trainer for SFT.

Classification and LM keep the hand-written loop: its batches come from one generator seeded by
(run seed, round, node), which the published benchmark figures and the resume test rely on. SFT uses
the maintained ``transformers.Trainer`` (mixed precision, gradient checkpointing and device placement
are its job); fedfuse hands it the tokenized conversations with labels only on assistant tokens.

A short ``max-length`` can cut every assistant token out of a batch. Such a batch carries no loss
(transformers gives NaN), so the SFT trainer counts it, takes no optimizer step for it, leaves it out
of the reported mean loss (NaN when no batch had an assistant token, never 0.0), reports the count
as metric ``empty-batches`` and warns once per round.
"""

from __future__ import annotations

import functools
import math
import tempfile
import types
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import torch
from flwr.common.logger import log
from torch.utils.data import Dataset

from fedfuse.training.client_datasets import ClientDatasets
from fedfuse.training.federated_dataset import Tokenized
from fedfuse.training.loop import train
from fedfuse.training.tasks import IGNORE
from fedfuse.training.trainers.protocol import TrainerSettings, TrainingRound, TrainResult

EMPTY_BATCHES = "empty-batches"
"""The SFT trainer's metric: batches of the round without a single assistant token (skipped)."""


def loop_trainer(
    model: torch.nn.Module, data: ClientDatasets, settings: TrainerSettings, round: TrainingRound
) -> TrainResult:
    """fedfuse's seeded AdamW loop (classification and LM)."""
    loss = train(
        model,
        data.train,
        steps=round.steps,
        batch_size=settings.training.batch_size,
        learning_rate=settings.training.lr,
        seed=round.seed,
        dtype=round.dtype,
    )
    return TrainResult(loss)


class _TokenizedRows(Dataset):
    """A :class:`Tokenized` as the dict-per-example dataset ``transformers.Trainer`` expects."""

    def __init__(self, tokens: Tokenized) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        t = self.tokens
        return {"input_ids": t.input_ids[index], "attention_mask": t.attention_mask[index], "labels": t.labels[index]}


def trim_padding(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack right-padded examples and drop the padding columns no example of the batch uses.

    SFT chats are padded to ``max-length``; most are far shorter, and every dropped column is
    compute saved, with the same loss (the dropped positions are padding, labelled -100).
    """
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    width = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
    return {key: value[:, :width] for key, value in batch.items()}


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens of a causal-LM batch that carry loss: labels other than -100 after the next-token shift."""
    return int((labels[..., 1:] != IGNORE).sum())


@dataclass
class BatchTally:
    """One round's batches: the loss of each batch with assistant tokens, and how many had none."""

    losses: list[torch.Tensor] = field(default_factory=list)
    empty: int = 0
    skip_step: bool = False
    """Set by an empty batch: the optimizer step that follows it does nothing."""

    @property
    def batches(self) -> int:
        """All batches of the round, empty or not."""
        return len(self.losses) + self.empty

    def mean_loss(self) -> float:
        """The mean loss of the batches with assistant tokens; NaN if there were none (not a 0.0 loss)."""
        if not self.losses:
            return math.nan
        return float(torch.stack([loss.float().cpu() for loss in self.losses]).mean())


def warn_empty_batches(tally: BatchTally, max_length: int, round: TrainingRound) -> None:
    """Log once per round how many batches had no assistant token, and what to change."""
    if tally.empty:
        log(
            WARNING,
            "round %s, %s: %d of %d SFT batches held no assistant token (max-length %d cuts the answers off); "
            "they were skipped and carry no loss; raise max-length",
            round.round_number,
            round.node,
            tally.empty,
            tally.batches,
            max_length,
        )


def _zero_missing_grads(model: torch.nn.Module) -> None:
    # A skipped batch still meets the clipping and (fp16) the grad scaler, which want gradients to look at.
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)


@functools.cache
def _skipping_trainer() -> type:
    """``transformers.Trainer`` that skips batches without assistant tokens (see the module docstring)."""
    from transformers import Trainer

    class SkippingTrainer(Trainer):
        """Counts each batch without assistant tokens in ``tally`` and skips it: no forward, no step."""

        tally: BatchTally

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
            if supervised_tokens(inputs["labels"]) == 0:
                self.tally.empty += 1
                self.tally.skip_step = True
                _zero_missing_grads(model)
                return torch.zeros((), device=self.args.device)
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.tally.losses.append(loss.detach())
            return loss

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            optimizer = super().create_optimizer(model)
            guarded = types.MethodType(_guarded_step(optimizer.step, self.tally), optimizer)
            optimizer.step = guarded  # type: ignore[method-assign]
            return optimizer

    return SkippingTrainer


def _guarded_step(step: Any, tally: BatchTally) -> Any:
    # A bound method again (torch's LR scheduler wraps ``step.__func__``); skips the step after an empty batch.
    def guarded(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if tally.skip_step:
            tally.skip_step = False
            return None
        return step(*args, **kwargs)

    return guarded


def sft_trainer(
    model: torch.nn.Module, data: ClientDatasets, settings: TrainerSettings, round: TrainingRound
) -> TrainResult:
    """``transformers.Trainer`` on the chat examples (loss on assistant tokens only), constant AdamW lr.

    The loss is the mean over batches with assistant tokens; batches without are counted and skipped.
    """
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if len(data.train) == 0:
        raise ValueError("no local training examples")
    with tempfile.TemporaryDirectory(prefix="fedfuse-sft-") as scratch:
        arguments = TrainingArguments(
            output_dir=scratch,
            max_steps=round.steps,
            per_device_train_batch_size=settings.training.batch_size,
            learning_rate=settings.training.lr,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            seed=round.seed % 2**31,
            data_seed=round.seed % 2**31,
            bf16=round.dtype == torch.bfloat16,
            fp16=round.dtype == torch.float16,
            use_cpu=round.device.type == "cpu",
            gradient_checkpointing=settings.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False}
            if settings.training.gradient_checkpointing
            else None,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        trainer = _skipping_trainer()(
            model=model, args=arguments, train_dataset=_TokenizedRows(data.train), data_collator=trim_padding
        )
        trainer.tally = tally = BatchTally()
        trainer.train()
    model.eval()
    warn_empty_batches(tally, int(data.train.input_ids.shape[-1]), round)
    return TrainResult(tally.mean_loss(), {EMPTY_BATCHES: float(tally.empty)})
