"""The victim: MiniLM-L6 really fine-tuned (every layer trainable) on a task built offline.

The task is topic classification generated from the tokenizer's own vocabulary: each of
`classes` topics owns `topic_words` whole-word tokens; a sample is `seq` tokens, `topic_tokens`
of them drawn from its topic and the rest from a shared background vocabulary (plus one token of
another topic as a distractor). Mean-pooled MiniLM features separate the topics only weakly, so a
head trained on a small query budget over the public encoder is clearly worse than the victim.

`load_victim(settings)` trains once per settings (a few minutes on one CPU thread) and caches the
state dict under `$GCVM_CACHE/victims/<hash of the settings>/` (default `~/.cache/gcvm`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from groupcover.models.bert import BertEncoder
from groupcover.models.minilm import load_minilm, load_tokenizer


@dataclass(frozen=True)
class TaskSettings:
    classes: int = 8
    topic_words: int = 40
    background_words: int = 4000
    seq: int = 24
    topic_tokens: int = 3
    seed: int = 0


@dataclass(frozen=True)
class VictimSettings:
    task: TaskSettings = TaskSettings()
    train_samples: int = 3072
    steps: int = 240
    batch: int = 32
    lr: float = 5e-5
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class TopicTask:
    """Deterministic samples: `sample(n, stream)` gives (ids, mask, labels) for a named stream."""

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings
        vocab = load_tokenizer(settings.seq).get_vocab()
        words = sorted(
            (i for w, i in vocab.items() if w.isascii() and w.isalpha() and w.islower()
             and len(w) >= 4)
        )  # fmt: skip
        order = torch.randperm(len(words), generator=torch.Generator().manual_seed(settings.seed))
        ids = torch.tensor(words)[order]
        n_topic = settings.classes * settings.topic_words
        self.topics = ids[:n_topic].view(settings.classes, settings.topic_words)
        self.background = ids[n_topic : n_topic + settings.background_words]
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]

    def sample(self, n: int, stream: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.settings
        digest = hashlib.sha256(f"{s.seed}/{stream}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        body = s.seq - 2
        labels = torch.randint(0, s.classes, (n,), generator=gen)
        tokens = self.background[torch.randint(0, len(self.background), (n, body), generator=gen)]
        positions = torch.argsort(torch.rand(n, body, generator=gen), dim=1)
        pick = torch.randint(0, s.topic_words, (n, s.topic_tokens + 1), generator=gen)
        rows = torch.arange(n).unsqueeze(1)
        tokens[rows, positions[:, : s.topic_tokens]] = self.topics[
            labels.unsqueeze(1), pick[:, : s.topic_tokens]
        ]
        other = (labels + torch.randint(1, s.classes, (n,), generator=gen)) % s.classes
        tokens[torch.arange(n), positions[:, s.topic_tokens]] = self.topics[other, pick[:, -1]]
        ids = torch.cat(
            [torch.full((n, 1), self.cls_id), tokens, torch.full((n, 1), self.sep_id)], dim=1
        )
        return ids, torch.ones_like(ids), labels


class Classifier(nn.Module):
    """MiniLM encoder, mean pooling, a linear head."""

    def __init__(self, encoder: BertEncoder, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden, classes)

    def features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(ids, mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids, mask))


def public_encoder() -> BertEncoder:
    return load_minilm().encoder


def cache_dir() -> Path:
    root = os.environ.get("GCVM_CACHE") or str(Path.home() / ".cache" / "gcvm")
    return Path(root)


def accuracy(model: Classifier, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
             batch: int = 128) -> float:  # fmt: skip
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            logits = model(ids[start : start + batch], mask[start : start + batch])
            correct += int((logits.argmax(dim=1) == labels[start : start + batch]).sum())
    return correct / max(1, len(labels))


def train_victim(settings: VictimSettings, log: bool = True) -> tuple[Classifier, dict]:
    task = TopicTask(settings.task)
    ids, mask, labels = task.sample(settings.train_samples, "victim-train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = Classifier(public_encoder(), settings.task.classes)
        optim = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
        head_optim = torch.optim.AdamW(model.head.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(settings.seed)
        start = time.monotonic()
        model.train()
        for step in range(settings.steps):
            batch = torch.randint(0, len(labels), (settings.batch,), generator=gen)
            loss = F.cross_entropy(model(ids[batch], mask[batch]), labels[batch])
            optim.zero_grad()
            head_optim.zero_grad()
            loss.backward()
            optim.step()
            head_optim.step()
            if log and (step % 20 == 0 or step == settings.steps - 1):
                print(f"victim step {step:4d} loss {loss.item():.3f} "
                      f"({time.monotonic() - start:.0f} s)", flush=True)  # fmt: skip
    model.eval()
    test = task.sample(1024, "test")
    info = {
        "settings": asdict(settings),
        "train_seconds": time.monotonic() - start,
        "test_accuracy": accuracy(model, *test),
    }
    return model, info


def load_victim(settings: VictimSettings = VictimSettings(), log: bool = True
                ) -> tuple[Classifier, dict]:  # fmt: skip
    """The fine-tuned classifier for these settings, trained once and cached."""
    folder = cache_dir() / "victims" / settings.key()
    weights, meta = folder / "model.safetensors", folder / "info.json"
    if weights.exists() and meta.exists():
        model = Classifier(public_encoder(), settings.task.classes)
        model.load_state_dict(load_file(str(weights)))
        return model.eval(), json.loads(meta.read_text())
    if log:
        print(f"training the victim ({settings.steps} steps; cached in {folder})", flush=True)
    model, info = train_victim(settings, log)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(state, str(weights))
    meta.write_text(json.dumps(info, indent=2))
    return model, info
