"""The process reward model: scores a completion +1 (the developer would keep it), -1 (would not) or 0
(no verdict), voting ``m`` times and reducing the votes with :func:`majority` (ties and failures count 0).

:class:`PRMJudge` is a small classifier head on the *frozen* base model. Features are the mean of the
base model's last hidden layer over the completion's tokens (the prompt is context only). The ``m`` votes
are MC-dropout passes of the head over features computed once. It is **synchronous** (plain torch on the
caller's thread); code on an event loop should call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kernel.files import fsync_replace

__all__ = [
    "HEAD_CONFIG_FILE",
    "HEAD_WEIGHTS_FILE",
    "MIN_FIT_EXAMPLES",
    "PRMExample",
    "PRMHead",
    "PRMJudge",
    "PRMReport",
    "majority",
    "mc_dropout_votes",
    "mc_dropout_votes_many",
]

log = logging.getLogger(__name__)

HEAD_WEIGHTS_FILE = "prm_head.safetensors"
HEAD_CONFIG_FILE = "prm_head.json"
HEAD_FORMAT = 1
MIN_FIT_EXAMPLES = 16
DEFAULT_HEAD_WIDTH = 64


def majority(votes: Sequence[int | None]) -> int:
    """The majority verdict of ``m`` votes: +1, -1, or 0 when there is none.

    Each vote is +1, -1, or ``None`` for a vote that failed (an exception, a non-finite score, an answer
    that was neither yes nor no). Failed votes are not counted; of the valid votes, the sign with more
    votes wins. A tie (including ``[1, -1]`` and ``[1, None, -1, None, None]``) and an all-failed or empty
    list give 0, which the learning loop treats as "no signal". So ``[None, None, -1]`` is -1: one valid
    vote is a majority of the valid votes.

    Raises ``ValueError`` for a vote that is not +1, -1 or ``None``.
    """
    pos = neg = 0
    for vote in votes:
        if vote is None:
            continue
        if vote == 1:
            pos += 1
        elif vote == -1:
            neg += 1
        else:
            raise ValueError(f"a vote must be +1, -1 or None (failed), got {vote!r}")
    if pos > neg:
        return 1
    if neg > pos:
        return -1
    return 0


def _sign_vote(logit: float) -> int | None:
    """+1 for a positive logit, -1 for a negative one; ``None`` for 0 (no opinion) or a non-finite one."""
    if not math.isfinite(logit) or logit == 0.0:
        return None
    return 1 if logit > 0 else -1


@dataclass(slots=True)
class PRMExample:
    """One labelled outcome: ``label`` is +1 (the developer kept ``completion``) or -1 (did not)."""

    prompt: str
    completion: str
    label: int


@dataclass(slots=True)
class PRMReport:
    """What :meth:`PRMJudge.fit` did.

    Accuracies are majority-of-``m``-MC-dropout-votes accuracies (a tie counts as wrong);
    ``held_out_accuracy`` is ``None`` when ``val_fraction`` was 0.
    """

    examples: int
    positives: int
    negatives: int
    train_count: int
    held_out_count: int
    epochs: int
    train_accuracy: float
    held_out_accuracy: float | None
    final_loss: float
    seconds: float


class PRMHead(nn.Module):
    """The classifier head: standardise -> Dropout(p) -> Linear(hidden, width) -> GELU -> Dropout(p) ->
    Linear(width, 1). Returns one logit per feature row (``[..., hidden] -> [...]``).

    ``feature_mean``/``feature_std`` are buffers set from the training features by :meth:`PRMJudge.fit`
    (LLM hidden states have a few very large dimensions; standardising keeps them from dominating).
    """

    feature_mean: Tensor
    feature_std: Tensor

    def __init__(self, hidden_size: int, *, width: int = DEFAULT_HEAD_WIDTH, dropout: float = 0.1) -> None:
        super().__init__()
        if hidden_size < 1 or width < 1:
            raise ValueError(f"hidden_size and width must be >= 1, got {hidden_size} and {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.hidden_size = hidden_size
        self.width = width
        self.dropout = dropout
        self.register_buffer("feature_mean", torch.zeros(hidden_size))
        self.register_buffer("feature_std", torch.ones(hidden_size))
        self.input_dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(hidden_size, width)
        self.act = nn.GELU()
        self.hidden_dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, 1)

    def forward(self, features: Tensor) -> Tensor:
        x = (features - self.feature_mean) / self.feature_std
        x = self.input_dropout(x)
        x = self.hidden_dropout(self.act(self.fc1(x)))
        out: Tensor = self.fc2(x).squeeze(-1)
        return out


def mc_dropout_votes(head: nn.Module, features: Tensor, m: int = 5, *, mc_dropout: bool = True) -> list[int | None]:
    """``m`` votes of ``head`` on one feature vector ``[hidden]``: the sign of each pass's logit.

    With ``mc_dropout`` the head runs in training mode, so its dropout layers draw a fresh mask for each
    pass (Monte Carlo dropout, using torch's global RNG); with it off (or with p = 0) all ``m`` votes are
    the same deterministic vote. The ``m`` passes run as the ``m`` rows of one batch (each row gets its own
    dropout mask, so this is the same as ``m`` separate passes, only cheaper). A pass whose logit is
    non-finite (or exactly zero) votes ``None``; if the head raises, all ``m`` votes are ``None``. The
    head's previous train/eval mode is restored.
    """
    return mc_dropout_votes_many(head, features.unsqueeze(0), m, mc_dropout=mc_dropout)[0]


def mc_dropout_votes_many(
    head: nn.Module, features: Tensor, m: int = 5, *, mc_dropout: bool = True
) -> list[list[int | None]]:
    """:func:`mc_dropout_votes` for each row of ``features`` ``[n, hidden]``, in one batched head call."""
    if m < 1:
        raise ValueError(f"m (the number of votes) must be >= 1, got {m}")
    if features.dim() != 2:
        raise ValueError(f"features must be [n, hidden], got shape {tuple(features.shape)}")
    n = features.shape[0]
    was_training = head.training
    head.train(mc_dropout)
    try:
        with torch.no_grad():
            logits = head(features.repeat_interleave(m, dim=0)).reshape(n, m).tolist()
    except Exception as exc:  # a failed pass is a failed vote, never a crash
        log.warning("PRM votes failed: %s", exc)
        return [[None] * m for _ in range(n)]
    finally:
        head.train(was_training)
    return [[_sign_vote(float(v)) for v in row] for row in logits]


def _feature_key(prompt: str, completion: str) -> str:
    h = hashlib.sha256()
    h.update(f"{len(prompt)}:".encode())
    h.update(prompt.encode("utf-8", "surrogatepass"))
    h.update(completion.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class PRMJudge:
    """The process reward model: an MC-dropout classifier head on the frozen base model's hidden states.

    Build it from a Hugging Face model folder (``PRMJudge(path)``: loaded in float32 on CPU, eval mode,
    gradients off), or share an already-loaded model (``PRMJudge(model=..., tokenizer=...)``: used as is,
    under ``torch.no_grad``; it must be in eval mode and is not modified). Only the head is trained.

    Features of a (prompt, completion) pair: the token ids of the prompt followed by those of the completion,
    cut to the last ``max_context_tokens``; the mean of the last hidden layer over the completion's tokens
    (those left after the cut). They are cached per (prompt, completion) in this object (LRU, up to
    ``cache_size`` entries), so training epochs and repeated votes do not re-run the base model.

    Synchronous: call it through ``asyncio.to_thread`` from an event loop.
    """

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        hidden_dropout: float = 0.1,
        seed: int = 0,
        max_context_tokens: int = 256,
        head_width: int = DEFAULT_HEAD_WIDTH,
        cache_size: int = 4096,
    ) -> None:
        if max_context_tokens < 1:
            raise ValueError(f"max_context_tokens must be >= 1, got {max_context_tokens}")
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer to share a loaded model, or neither and a model_path")
        if model is None:
            if model_path is None:
                raise ValueError("PRMJudge needs a model_path (a Hugging Face model folder) or a model and tokenizer")
            model, tokenizer = _load_base(Path(model_path))
        elif getattr(model, "training", False):
            raise ValueError(
                "the shared base model is in training mode (dropout active): call model.eval() first; "
                "PRMJudge does not change a model it did not load"
            )
        self._model = model
        self._backbone = getattr(model, "base_model", model)
        self._tokenizer = tokenizer
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError("the base model's config has no integer hidden_size; is this a transformers model?")
        self.hidden_size: int = hidden
        self.base_model_name: str = str(
            getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or (model_path or "")
        )
        self.max_context_tokens = max_context_tokens
        self.seed = seed
        self.hidden_dropout = hidden_dropout
        self.head_width = head_width
        self.trained_on = 0
        self.held_out_accuracy: float | None = None
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._cache_size = cache_size
        self.head = self._new_head()

    # --- features ------------------------------------------------------------------------------------

    def _new_head(self) -> PRMHead:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = PRMHead(self.hidden_size, width=self.head_width, dropout=self.hidden_dropout)
        head.eval()
        return head

    def features(self, prompt: str, completion: str) -> Tensor:
        """The ``[hidden_size]`` feature vector of ``completion`` after ``prompt`` (cached).

        Raises ``ValueError`` for an empty completion (it has no tokens to average over).
        """
        return self.features_many([(prompt, completion)])[0]

    def features_many(self, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8) -> list[Tensor]:
        """Feature vectors of many (prompt, completion) pairs; the uncached ones run through the base model
        in right-padded batches of ``batch_size`` (similar lengths together), which on CPU is several times
        faster than one at a time. Batched and single runs agree up to float rounding.

        Raises ``ValueError`` for an empty completion.
        """
        keys = [_feature_key(p, c) for p, c in pairs]
        todo: dict[str, tuple[list[int], int]] = {}
        for key, (prompt, completion) in zip(keys, pairs, strict=True):
            if key in self._cache or key in todo:
                continue
            completion_ids = self._encode(completion)
            if not completion_ids:
                raise ValueError("the completion is empty: there are no completion tokens to judge")
            ids = (self._encode(prompt) + completion_ids)[-self.max_context_tokens :]
            todo[key] = (ids, min(len(completion_ids), len(ids)))
        computed: dict[str, Tensor] = {}
        order = sorted(todo, key=lambda k: len(todo[k][0]))
        for start in range(0, len(order), max(1, batch_size)):
            batch = order[start : start + max(1, batch_size)]
            width = max(len(todo[k][0]) for k in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, k in enumerate(batch):
                ids = todo[k][0]
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            with torch.no_grad():
                out = self._backbone(input_ids=input_ids, attention_mask=mask)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                for row, k in enumerate(batch):
                    ids, n_completion = todo[k]
                    span = hidden[row, len(ids) - n_completion : len(ids), :]
                    computed[k] = span.float().mean(dim=0).detach().clone()
        result: list[Tensor] = []
        for key in keys:
            feats = computed.get(key)
            if feats is None:
                feats = self._cache[key]
                self._cache.move_to_end(key)
            result.append(feats)
        for key, feats in computed.items():
            self._cache[key] = feats
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids]

    # --- training --------------------------------------------------------------------------------------

    def fit(
        self,
        examples: Sequence[PRMExample],
        *,
        epochs: int = 100,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        val_fraction: float = 0.2,
        batch_size: int = 128,
        m: int = 5,
    ) -> PRMReport:
        """Train a fresh head on ``examples`` (the base model stays frozen) and report its accuracy.

        A stratified, seeded split holds out ``val_fraction`` of each class (at least one example of each
        when ``val_fraction > 0``). Training is AdamW on BCE-with-logits, each example weighted
        ``n / (2 * n_class)`` so both classes count equally. Accuracies use majority-of-``m`` MC-dropout
        votes. Deterministic for a given ``seed`` (the global torch RNG is left as it was).

        Raises ``ValueError`` for fewer than ``MIN_FIT_EXAMPLES`` examples, labels other than +1/-1, fewer
        than two examples of either class, an empty completion, or bad hyper-parameters.
        """
        if len(examples) < MIN_FIT_EXAMPLES:
            raise ValueError(
                f"the PRM needs at least {MIN_FIT_EXAMPLES} labelled examples to train, got {len(examples)}; "
                "collect more outcomes first"
            )
        bad = [e.label for e in examples if e.label not in (1, -1)]
        if bad:
            raise ValueError(f"labels must be +1 or -1, got {sorted(set(bad))!r}")
        pos = [e for e in examples if e.label == 1]
        neg = [e for e in examples if e.label == -1]
        if len(pos) < 2 or len(neg) < 2:
            raise ValueError(
                f"the PRM needs at least 2 examples of each class, got {len(pos)} positive and {len(neg)} "
                "negative; a judge trained on one class can only ever give that verdict"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if epochs < 1 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)) or weight_decay < 0:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0; got {epochs}, {batch_size}, "
                f"{lr}, {weight_decay}"
            )
        started = time.perf_counter()
        rng = random.Random(self.seed)
        train: list[PRMExample] = []
        held_out: list[PRMExample] = []
        for group in (pos, neg):
            order = list(group)
            rng.shuffle(order)
            n_val = 0
            if val_fraction > 0:
                n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
            held_out.extend(order[:n_val])
            train.extend(order[n_val:])

        x = torch.stack(self.features_many([(e.prompt, e.completion) for e in train]))
        self.features_many([(e.prompt, e.completion) for e in held_out])  # cache them for the accuracy below
        y = torch.tensor([1.0 if e.label == 1 else 0.0 for e in train])
        n_pos = float(y.sum())
        n_neg = float(len(train)) - n_pos
        weights = torch.where(y > 0.5, len(train) / (2.0 * n_pos), len(train) / (2.0 * n_neg))

        self.head = self._new_head()
        self.head.feature_mean.copy_(x.mean(dim=0))
        self.head.feature_std.copy_(x.std(dim=0, unbiased=False).clamp_min(1e-6))
        optimiser = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        gen = torch.Generator().manual_seed(self.seed)
        final_loss = float("nan")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.head.train()
            for _ in range(epochs):
                perm = torch.randperm(len(train), generator=gen)
                total = 0.0
                for start in range(0, len(train), batch_size):
                    idx = perm[start : start + batch_size]
                    logits = self.head(x[idx])
                    loss = (loss_fn(logits, y[idx]) * weights[idx]).sum() / weights[idx].sum()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    total += float(loss.detach()) * len(idx)
                final_loss = total / len(train)
            self.head.eval()
        if not math.isfinite(final_loss):
            raise ValueError(f"PRM training diverged (loss {final_loss}); lower lr")

        self.trained_on = len(train)
        train_acc = self.accuracy(train, m=m)
        self.held_out_accuracy = self.accuracy(held_out, m=m) if held_out else None
        return PRMReport(
            examples=len(examples),
            positives=len(pos),
            negatives=len(neg),
            train_count=len(train),
            held_out_count=len(held_out),
            epochs=epochs,
            train_accuracy=train_acc,
            held_out_accuracy=self.held_out_accuracy,
            final_loss=final_loss,
            seconds=time.perf_counter() - started,
        )

    # --- judging ---------------------------------------------------------------------------------------

    def logit(self, prompt: str, completion: str) -> float:
        """The head's deterministic logit (dropout off): > 0 leans +1, < 0 leans -1."""
        self.head.eval()
        with torch.no_grad():
            return float(self.head(self.features(prompt, completion).unsqueeze(0))[0])

    def votes(self, prompt: str, completion: str, m: int = 5, *, mc_dropout: bool = True) -> list[int | None]:
        """``m`` MC-dropout votes (+1, -1, or ``None`` for a failed pass) on one completion.

        The base model runs once (features are cached); each vote is one head pass with dropout active.
        An empty completion, or features that cannot be computed, give ``m`` failed votes.
        ``mc_dropout=False`` gives ``m`` copies of the deterministic vote (for diagnostics and tests).
        """
        if m < 1:
            raise ValueError(f"m (the number of votes) must be >= 1, got {m}")
        try:
            feats = self.features(prompt, completion)
        except Exception as exc:
            log.warning("PRM features failed, all %d votes fail: %s", m, exc)
            return [None] * m
        return mc_dropout_votes(self.head, feats, m, mc_dropout=mc_dropout)

    def judge(self, prompt: str, completion: str, m: int = 5) -> tuple[int, list[int | None]]:
        """The majority verdict in {-1, 0, +1} of ``m`` MC-dropout votes, and the votes."""
        v = self.votes(prompt, completion, m)
        return majority(v), v

    def accuracy(self, examples: Sequence[PRMExample], m: int = 5) -> float:
        """Fraction of ``examples`` whose majority verdict equals the label (a tie, 0, counts as wrong)."""
        if not examples:
            raise ValueError("accuracy needs at least one example")
        judged = [e for e in examples if e.completion]  # an empty completion gets no verdict: wrong
        if not judged:
            return 0.0
        feats = torch.stack(self.features_many([(e.prompt, e.completion) for e in judged]))
        votes = mc_dropout_votes_many(self.head, feats, m)
        correct = sum(1 for e, v in zip(judged, votes, strict=True) if majority(v) == e.label)
        return correct / len(examples)

    # --- persistence -----------------------------------------------------------------------------------

    def save(self, directory: Path) -> Path:
        """Write the head (safetensors) and its config (json) into ``directory``; returns it.

        Each file is written to a temporary name, fsynced and renamed, the config last.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().clone() for k, v in self.head.state_dict().items()}
        tmp_weights = directory / (HEAD_WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp_weights), metadata={"format": str(HEAD_FORMAT)})
        fsync_replace(tmp_weights, directory / HEAD_WEIGHTS_FILE)
        config = {
            "format": HEAD_FORMAT,
            "hidden_size": self.hidden_size,
            "head_width": self.head_width,
            "hidden_dropout": self.hidden_dropout,
            "max_context_tokens": self.max_context_tokens,
            "seed": self.seed,
            "base_model": self.base_model_name,
            "trained_on": self.trained_on,
            "accuracy": self.held_out_accuracy,
        }
        tmp_config = directory / (HEAD_CONFIG_FILE + ".tmp")
        tmp_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        fsync_replace(tmp_config, directory / HEAD_CONFIG_FILE)
        return directory

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        model_path: Path | None = None,
        model: Any = None,
        tokenizer: Any = None,
        cache_size: int = 4096,
    ) -> PRMJudge:
        """A judge with the head saved in ``directory`` on the given base model (a folder, or a loaded model
        and tokenizer; with neither, the ``base_model`` recorded at save time is loaded).

        Raises ``ValueError`` when the directory holds no head, or the head was trained for a different
        hidden size than the base model's.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_file = directory / HEAD_CONFIG_FILE
        weights_file = directory / HEAD_WEIGHTS_FILE
        if not config_file.is_file() or not weights_file.is_file():
            raise ValueError(f"{directory} holds no PRM head: expected {HEAD_CONFIG_FILE} and {HEAD_WEIGHTS_FILE}")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("format") != HEAD_FORMAT:
            raise ValueError(f"{config_file} has format {config.get('format')!r}; this version reads {HEAD_FORMAT}")
        if model is None and model_path is None:
            model_path = Path(config["base_model"])
        if model is None and model_path is not None:
            model, tokenizer = _load_base(Path(model_path))
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden != config["hidden_size"]:
            raise ValueError(
                f"the PRM head in {directory} was trained on a base model with hidden size {config['hidden_size']} "
                f"({config.get('base_model') or 'unknown model'}), but this base model has hidden size {hidden}; "
                "retrain the PRM on this base model"
            )
        judge = cls(
            model=model,
            tokenizer=tokenizer,
            hidden_dropout=float(config["hidden_dropout"]),
            seed=int(config["seed"]),
            max_context_tokens=int(config["max_context_tokens"]),
            head_width=int(config["head_width"]),
            cache_size=cache_size,
        )
        state = load_file(str(weights_file))
        try:
            judge.head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{weights_file} does not match its config: {exc}") from exc
        judge.head.eval()
        judge.trained_on = int(config.get("trained_on", 0))
        acc = config.get("accuracy")
        judge.held_out_accuracy = float(acc) if acc is not None else None
        return judge


def _load_base(path: Path) -> tuple[Any, Any]:
    """The frozen base model (no LM head: only hidden states are needed) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    if not path.is_dir():
        raise ValueError(f"{path} is not a model folder; pass the prepared Hugging Face model directory")
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
