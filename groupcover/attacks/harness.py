"""The security evaluation: every attack against every scheme on the fine-tuned victim.

Per scheme (and group size, for schemes that take one): the victim's encoder is protected with
the scheme twice through `groupcover.master.protect` over an `InProcessTransport`, unmasked and
masked; an observer records what the worker receives (published weights, payloads) while the
protected model serves the deployment texts. Each attack gets, per layer, the public weight, the
published weight, the scheme's public parameters and the payloads; its reconstruction is scored
against the victim (36 per-matrix rows for MiniLM: the fused qkv layer is scored as q, k and v).
Then the stealing stage: the scheme's best reconstruction per layer over all attacks becomes an
encoder, which the thief fine-tunes (every layer, with a head) on a query budget of victim labels;
its test accuracy is compared with the same fine-tuning from the public weights (black box) over
a few seeds. `steal="head"` trains only a linear head on frozen features (fast, for tests).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from groupcover.attacks import core
from groupcover.attacks.methods import default_suite
from groupcover.attacks.victim import (
    Classifier,
    TopicTask,
    VictimSettings,
    accuracy,
    load_victim,
    public_encoder,
)
from groupcover.inprocess import InProcessTransport
from groupcover.master import protect
from groupcover.models.bert import BertEncoder
from groupcover.schemes import SCHEMES, Scheme, make_scheme

Log = Callable[[str], None]


@dataclass(frozen=True)
class EvalSettings:
    victim: VictimSettings = field(default_factory=VictimSettings)
    schemes: tuple[str, ...] = ("all",)
    ks: tuple[int, ...] = (4, 8)
    layers: tuple[int, ...] | None = None  # encoder blocks to evaluate (None: all)
    deployment_samples: int = 96  # texts the protected model serves while the worker watches
    attacker_samples: int = 96  # the attacker's own texts through the public model
    queries: int = 200  # victim labels the thief buys
    test_samples: int = 512
    steal_seeds: tuple[int, ...] = (0, 1, 2)
    steal: str = "finetune"  # "finetune": every layer and a head; "head": a head on frozen features
    steal_steps: int = 24  # AdamW steps of the fine-tune
    steal_batch: int = 16
    seed: int = 1  # obfuscation secrets (reproducible: an evaluation, not a deployment)
    attacks: tuple[str, ...] | None = None  # names from the suite (None: all)


@dataclass
class SchemeRun:
    label: str
    scheme: str
    source: str
    k: int | None
    layers: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    best: dict[str, str] = field(default_factory=dict)
    stolen: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def scheme_labels(settings: EvalSettings) -> list[tuple[str, str, int | None]]:
    """(label, registered name, k) for every scheme entry to evaluate."""
    names = list(SCHEMES) if "all" in settings.schemes else list(settings.schemes)
    entries: list[tuple[str, str, int | None]] = []
    for name in names:
        cls = SCHEMES.get(name)
        if cls is None:
            make_scheme(name)  # raises the registry's UsageError
        if cls is not None and cls.takes_k:
            entries += [(f"{name} k={k}", name, k) for k in settings.ks]
        else:
            entries.append((name, name, None))
    return entries


def linear_names(encoder: nn.Module, blocks: Sequence[int] | None) -> list[str]:
    names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    if blocks is None:
        return names
    return [n for n in names if int(n.split(".")[1]) in blocks]


def matrices(name: str, out_features: int, hidden: int) -> list[tuple[str, slice]]:
    """The named weight matrices inside one offloaded layer (q, k, v of a fused qkv)."""
    if name.endswith("attention.qkv") and out_features == 3 * hidden:
        base = name.rsplit(".", 1)[0]
        return [(f"{base}.{p}", slice(i * hidden, (i + 1) * hidden)) for i, p in enumerate("qkv")]
    return [(name, slice(0, out_features))]


class Recorder:
    """Transport observer: the published weights and every payload, by layer."""

    def __init__(self) -> None:
        self.published: dict[str, torch.Tensor] = {}
        self.payloads: dict[str, list[torch.Tensor]] = {}

    def __call__(self, event: str, layer_id: str, tensor: torch.Tensor) -> None:
        if event == "publish":
            self.published[layer_id] = tensor.detach().to(torch.float64).clone()
        elif event == "run":
            flat = tensor.detach().reshape(-1, tensor.shape[-1]).to(torch.float64)
            self.payloads.setdefault(layer_id, []).append(flat.clone())

    def inputs(self, layer_id: str) -> torch.Tensor | None:
        chunks = self.payloads.get(layer_id)
        return None if not chunks else torch.cat(chunks)


def capture_inputs(encoder: nn.Module, names: Sequence[str], ids: torch.Tensor,
                   mask: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
    """Each named Linear's input rows when `encoder` runs on (ids, mask)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        module = encoder.get_submodule(name)

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            encoder(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


def observe(encoder: nn.Module, scheme: Scheme, masked: bool, seed: int, ids: torch.Tensor,
            mask: torch.Tensor) -> tuple[Recorder, dict[str, Any]]:  # fmt: skip
    """Protect the encoder with the scheme, serve (ids, mask), record what the worker sees."""
    transport = InProcessTransport()
    recorder = Recorder()
    transport.add_observer(recorder)
    protected = protect(encoder, transport, scheme=scheme, masked=masked, seed=seed)
    with torch.no_grad():
        out = protected(ids, mask)
        ref = encoder(ids, mask)
    exact = float((out - ref).norm() / ref.norm())
    secrets = {name: layer.secret for name, layer in protected.layers.items()}
    transport.close()
    return recorder, {"secrets": secrets, "relative_error": exact}


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    assert isinstance(module, nn.Linear)
    return module.weight.detach().to(torch.float64)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return None if not kept else float(sum(kept) / len(kept))


def evaluate_scheme(
    label: str,
    name: str,
    k: int | None,
    settings: EvalSettings,
    victim: Classifier,
    public: nn.Module,
    names: list[str],
    texts: dict[str, Any],
    log: Log,
) -> SchemeRun:
    start = time.monotonic()
    scheme = make_scheme(name, k or 4)
    run = SchemeRun(label, name, str(getattr(scheme, "source", "") or name), k)
    hidden = victim.encoder.config.hidden
    suite = default_suite()
    if settings.attacks is not None:
        suite = [a for a in suite if a.name in settings.attacks]
    ids, mask = texts["deploy"]
    recorders = {}
    for masked in (False, True):
        recorders[masked] = observe(victim.encoder, scheme, masked, settings.seed, ids, mask)
    run.stolen["relative_error_unmasked"] = recorders[False][1]["relative_error"]
    recs: dict[str, dict[str, torch.Tensor]] = {}
    for layer in names:
        w_vic = _weight(victim.encoder, layer)
        w_pub = _weight(public, layer)
        results: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for masked in (True, False):
            recorder, info = recorders[masked]
            view = core.LayerView(
                name=layer,
                public=w_pub,
                published=recorder.published[layer],
                k=k or 4,
                scheme=name,
                payloads=recorder.inputs(layer),
                public_inputs=texts["public_own"][layer],
                public_same_inputs=texts["public_same"][layer],
            )
            truth = getattr(info["secrets"][layer], "in_perm", None)
            for attack in suite:
                if not attack.uses_payloads and not masked:
                    continue  # weight-only attacks: once, on the masked mode's weights
                key = attack.name + ("" if not attack.uses_payloads else
                                     (" (masked)" if masked else " (unmasked)"))  # fmt: skip
                try:
                    rec = attack.run(view)
                except (RuntimeError, ValueError, torch.linalg.LinAlgError) as exc:
                    log(f"  {label} {layer} {key}: failed ({exc})")
                    rec = None
                weight = w_pub if rec is None else core.anchor(rec.weight, w_pub)
                raw = w_pub if rec is None else rec.weight
                estimate = None if rec is None else rec.in_perm
                results[key] = (weight, estimate)
                row_metrics = run.layers.setdefault(layer, {})
                row_metrics[key] = {
                    "raw_error_ratio": core.error_ratio(raw, w_vic, w_pub),
                    "error_ratio": core.error_ratio(weight, w_vic, w_pub),
                    "delta_cos": core.delta_cosine(weight, w_vic, w_pub),
                    "perm_acc": core.perm_accuracy(estimate, truth),
                }
                for sub, rows in matrices(layer, w_vic.shape[0], hidden):
                    if sub == layer:
                        continue
                    run.layers.setdefault(sub, {})[key] = {
                        "raw_error_ratio": core.error_ratio(raw[rows], w_vic[rows], w_pub[rows]),
                        "error_ratio": core.error_ratio(weight[rows], w_vic[rows], w_pub[rows]),
                        "delta_cos": core.delta_cosine(weight[rows], w_vic[rows], w_pub[rows]),
                        "perm_acc": core.perm_accuracy(estimate, truth),
                    }
        best = min(results, key=lambda a: run.layers[layer][a]["error_ratio"] or 0.0)
        run.best[layer] = best
        log(f"  {layer}: best {best} {run.layers[layer][best]['error_ratio']:.3f} "
            f"({time.monotonic() - start:.0f} s)")  # fmt: skip
        recs[layer] = {"weight": results[best][0]}
    run.stolen.update(steal(victim, public, recs, settings, texts))
    run.seconds = time.monotonic() - start
    return run


# ---- model stealing --------------------------------------------------------------------------


def encoder_with(public: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The public encoder with some Linear weights replaced (biases stay public: never sent)."""
    model = copy.deepcopy(public)
    with torch.no_grad():
        for name, weight in weights.items():
            module = model.get_submodule(name)
            assert isinstance(module, nn.Linear)
            module.weight.copy_(weight.to(torch.float32))
    return model.eval()


def pooled(encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 128
           ) -> torch.Tensor:  # fmt: skip
    assert isinstance(encoder, BertEncoder)
    clf = Classifier(encoder, 2)  # head unused
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), batch):
            out.append(clf.features(ids[s : s + batch], mask[s : s + batch]))
    return torch.cat(out)


def train_head(feats: torch.Tensor, labels: torch.Tensor, classes: int, seed: int) -> nn.Linear:
    """A linear head on frozen features: the thief's fine-tuning on its query budget."""
    torch.manual_seed(seed)
    mu, sd = feats.mean(0), feats.std(0).clamp(min=1e-6)
    head = nn.Linear(feats.shape[1], classes)
    x = (feats - mu) / sd
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), labels) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardization into the head
        head.bias.sub_((head.weight / sd * mu).sum(1))
        head.weight.div_(sd)
    return head


STEAL_LR = 5e-5  # the victim's own fine-tuning rate (victim.VictimSettings.lr)
STEAL_HEAD_LR = 3e-3


def fine_tune(encoder: nn.Module, head: nn.Linear, ids: torch.Tensor, mask: torch.Tensor,
              labels: torch.Tensor, steps: int, batch: int, seed: int) -> Classifier:  # fmt: skip
    """The thief's fine-tuning: every layer of a copy of `encoder` and the head, AdamW with the
    victim's learning rates, `steps` batches drawn from its queries."""
    assert isinstance(encoder, BertEncoder)
    model = Classifier(copy.deepcopy(encoder), head.out_features)
    model.head.load_state_dict(head.state_dict())
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    optim = torch.optim.AdamW(
        [
            {"params": body, "lr": STEAL_LR},
            {"params": model.head.parameters(), "lr": STEAL_HEAD_LR},
        ],
        weight_decay=0.0,
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(labels), (min(batch, len(labels)),), generator=gen)
        loss = nn.functional.cross_entropy(model(ids[pick], mask[pick]), labels[pick])
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model.eval()


def stolen_accuracy(encoder: nn.Module, settings: EvalSettings, texts: dict[str, Any]
                    ) -> dict[str, Any]:  # fmt: skip
    """Test accuracy of what the thief builds from `encoder` and its queries, per seed."""
    if settings.steal not in ("finetune", "head"):
        raise ValueError(f"unknown stealing method {settings.steal!r} (finetune or head)")
    classes = settings.victim.task.classes
    q_ids, q_mask = texts["queries_cat"]
    t_ids, t_mask, t_labels = texts["test"]
    feats = pooled(encoder, torch.cat([q_ids, t_ids]), torch.cat([q_mask, t_mask]))
    q_feats, t_feats = feats[: len(q_ids)], feats[len(q_ids) :]
    accs = []
    for i, seed in enumerate(settings.steal_seeds):
        rows = slice(i * settings.queries, (i + 1) * settings.queries)
        head = train_head(q_feats[rows], texts["query_labels"][rows], classes, seed)
        if settings.steal == "head":
            with torch.no_grad():
                accs.append(float((head(t_feats).argmax(1) == t_labels).double().mean()))
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout, if the encoder has any
            thief = fine_tune(encoder, head, q_ids[rows], q_mask[rows],
                              texts["query_labels"][rows], settings.steal_steps,
                              settings.steal_batch, seed)  # fmt: skip
        accs.append(accuracy(thief, t_ids, t_mask, t_labels))
    spread = statistics.pstdev(accs) if len(accs) > 1 else 0.0
    return {"accuracy": statistics.mean(accs), "std": spread, "per_seed": accs,
            "method": settings.steal}  # fmt: skip


def steal(victim: Classifier, public: nn.Module, recs: dict[str, dict[str, torch.Tensor]],
          settings: EvalSettings, texts: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    encoder = encoder_with(public, {name: r["weight"] for name, r in recs.items()})
    return stolen_accuracy(encoder, settings, texts)


# ---- the whole evaluation --------------------------------------------------------------------


def prepare_texts(settings: EvalSettings, victim: Classifier, public: nn.Module,
                  names: list[str]) -> dict[str, Any]:  # fmt: skip
    task = TopicTask(settings.victim.task)
    deploy = task.sample(settings.deployment_samples, "deployment")[:2]
    own = task.sample(settings.attacker_samples, "attacker-texts")[:2]
    queries = [task.sample(settings.queries, f"queries-{s}") for s in settings.steal_seeds]
    q_ids = torch.cat([q[0] for q in queries])
    q_mask = torch.cat([q[1] for q in queries])
    with torch.no_grad():
        labels = torch.cat([victim(q_ids[s : s + 128], q_mask[s : s + 128]).argmax(1)
                            for s in range(0, len(q_ids), 128)])  # fmt: skip
    return {
        "deploy": deploy,
        "public_own": capture_inputs(public, names, *own),
        "public_same": capture_inputs(public, names, *deploy),
        "queries_cat": (q_ids, q_mask),
        "query_labels": labels,
        "test": task.sample(settings.test_samples, "test"),
    }


def evaluate(
    settings: EvalSettings,
    log: Log = print,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The whole evaluation; `partial` gets the result so far after every scheme."""
    torch.set_num_threads(1)
    start = time.monotonic()
    victim, info = load_victim(settings.victim, log=True)
    public = public_encoder().eval()
    names = linear_names(victim.encoder, settings.layers)
    texts = prepare_texts(settings, victim, public, names)
    log(f"victim: test accuracy {info['test_accuracy']:.3f}; {len(names)} offloaded layers")
    baselines = {
        "black-box (public weights)": stolen_accuracy(public, settings, texts),
        "white-box (victim weights)": stolen_accuracy(victim.encoder, settings, texts),
    }
    result: dict[str, Any] = {
        "settings": asdict(settings),
        "victim": info,
        "layers": names,
        "stealing": baselines,
        "schemes": [],
        "seconds": 0.0,
    }
    for label, name, k in scheme_labels(settings):
        log(f"scheme {label} ...")
        run = evaluate_scheme(label, name, k, settings, victim, public, names, texts, log)
        result["schemes"].append(asdict(run))
        result["seconds"] = time.monotonic() - start
        log(f"  done in {run.seconds:.0f} s; stolen accuracy {run.stolen['accuracy']:.3f}")
        if partial is not None:
            partial(result)
    return result
