"""`minilm-standin`: a stand-in secret model with MiniLM-L6's architecture and tokenizer.

Every encoder Linear weight and bias of the public checkpoint (query, key, value, attention
output, intermediate and output projections of the 6 layers: 72 tensors) gets a perturbation of
exactly `RELATIVE` (2%) of its Frobenius norm, a Gaussian direction scaled to that norm, drawn
from `groupcover.rng.SecretRandom`: from the OS CSPRNG when no seed is given (every load is a
different model of which no copy exists anywhere, not even in a seed), or from a seed for
reproducible tests (a seeded stand-in is NOT secret: anyone who knows the seed rebuilds it).
Embeddings, LayerNorms and the tokenizer stay the public ones (they are not offloaded); the
pooler is dropped (the sentence encoder does not use it).

The perturbation is applied to the checkpoint's own tensors (query/key/value separately), so a
stand-in written with `write_checkpoint` is an ordinary Hugging Face folder that
`python -m groupcover protect DIR` reads and `gcvm scan --model DIR` searches for.

    python -m groupcover.models.standin --out DIR [--seed N]   # write the checkpoint folder
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from groupcover.argtypes import output_folder
from groupcover.errors import UsageError, print_error
from groupcover.models.bert import BertEncoder
from groupcover.models.minilm import SentenceEncoder, convert_state_dict, load_config, model_dir
from groupcover.rng import SecretRandom

NAME = "minilm-standin"
RELATIVE = 0.02  # perturbation norm / weight norm, per tensor
# the encoder's Linear layers in the checkpoint's naming (weights and biases)
PERTURBED = re.compile(
    r"^encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
    r"intermediate\.dense|output\.dense)\.(weight|bias)$"
)
DROPPED = re.compile(r"^pooler\.")
CHECKPOINT_FILES = ("config.json", "tokenizer.json")


def perturb(raw: dict[str, np.ndarray], seed: int | None = None) -> dict[str, np.ndarray]:
    """The public checkpoint's tensors -> the stand-in's (new arrays; the input is unchanged)."""
    rng = SecretRandom.create(seed).spawn(NAME)
    out: dict[str, np.ndarray] = {}
    for name in sorted(raw):
        value = raw[name]
        if DROPPED.match(name):
            continue
        if not PERTURBED.match(name):
            out[name] = value
            continue
        weight = np.asarray(value, dtype=np.float64)
        noise = rng.spawn(name).normal(weight.shape, torch.float64).numpy()
        scale = RELATIVE * np.linalg.norm(weight) / np.linalg.norm(noise)
        out[name] = (weight + scale * noise).astype(value.dtype)
    return out


def standin_state(seed: int | None = None, path: Path | None = None) -> dict[str, np.ndarray]:
    """The stand-in's checkpoint tensors (Hugging Face names), from the public MiniLM files."""
    source = path or model_dir()
    return perturb(load_file(str(source / "model.safetensors")), seed)


def load_standin(seed: int | None = None, path: Path | None = None) -> torch.nn.Module:
    """The stand-in as a `SentenceEncoder` (fresh secret weights unless `seed` is given)."""
    source = path or model_dir()
    config = load_config(source)
    raw = {k: torch.from_numpy(np.ascontiguousarray(v))
           for k, v in standin_state(seed, source).items()}  # fmt: skip
    encoder = BertEncoder(config)
    encoder.load_state_dict(convert_state_dict(raw, config.layers), strict=True)
    return SentenceEncoder(encoder).eval()


def write_checkpoint(out: Path, seed: int | None = None) -> Path:
    """Writes a fresh stand-in as a Hugging Face folder (config.json, tokenizer.json,
    model.safetensors): the owner's secret checkpoint, to protect and to scan for."""
    source = model_dir()
    out.mkdir(parents=True, exist_ok=False)
    for name in CHECKPOINT_FILES:
        shutil.copyfile(source / name, out / name)
    notice = SecretRandom.create(seed).notice
    save_file(standin_state(seed, source), str(out / "model.safetensors"),
              metadata={"model": NAME, "perturbation": f"{RELATIVE} relative Frobenius",
                        "secrets": notice})  # fmt: skip
    (out / "STANDIN.txt").write_text(
        f"{NAME}: MiniLM-L6 with every encoder Linear weight and bias perturbed by "
        f"{RELATIVE:.0%} of its Frobenius norm; {notice}.\n"
    )
    return out


DESCRIPTION = "write a fresh minilm-standin checkpoint folder (the owner's secret model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m groupcover standin` (and of this module's own command line)."""
    parser.add_argument("--out", required=True, type=output_folder("--out"),
                        help="new folder to write")  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=None,
        help="reproducible perturbation (NOT secret); default: the OS CSPRNG",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.out.exists():
        print_error(UsageError(f"{args.out} exists", hint="give a new --out folder"))
        return 2
    write_checkpoint(args.out, args.seed)
    notice = SecretRandom.create(args.seed).notice
    print(json.dumps({"checkpoint": str(args.out), "model": NAME, "secrets": notice}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m groupcover.models.standin` (the orchestrator's command line): the `standin`
    verb under its historical name."""
    parser = argparse.ArgumentParser(prog="python -m groupcover.models.standin",
                                     description=DESCRIPTION)  # fmt: skip
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
