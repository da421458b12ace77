"""`gcvm render --runtime pods`: write the manifests, print the initdata digest."""

from __future__ import annotations

from pathlib import Path

from orchestrator import ui
from orchestrator.errors import GcvmError, UsageError
from orchestrator.pods.manifests import (
    Manifests,
    PodsSpec,
    Target,
    documents,
    play_argv,
    render,
)

IMAGE_REPO = "localhost/gcvm-guest"


def default_image() -> str:
    """The container image `gcvm up --runtime pods` makes from the guest image (its tag is the
    image recipe's hash); a Kubernetes cluster needs it pushed to a registry it pulls from."""
    from orchestrator import image

    try:
        return f"{IMAGE_REPO}:{image.recipe_hash()}"
    except (GcvmError, OSError):
        return f"{IMAGE_REPO}:latest"


def write(manifests: Manifests, out: Path) -> list[Path]:
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, text in manifests.files.items():
            (out / name).write_text(text)
            written.append(out / name)
    except OSError as exc:
        raise UsageError(
            f"cannot write --out {out}: {exc.strerror or exc}",
            hint="choose a folder you can write to",
        ) from None
    return written


SCHEMA_VERSION = "1.31"


def validate(manifests: Manifests) -> None:
    """Every object against the Kubernetes schema, strictly (an unknown field fails): a
    template override that breaks an object is refused before anything is written."""
    import kubernetes_validate  # only rendering pods needs the schemas (slow to import)

    for doc in documents(manifests):
        try:
            kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise GcvmError(
                f"{doc.get('kind')} {doc.get('metadata', {}).get('name')} is not a valid "
                f"Kubernetes {SCHEMA_VERSION} object at {where or '/'}: {exc.message}"
            ) from None


def render_pods(spec: PodsSpec, out: Path) -> Manifests:
    manifests = render(spec)
    validate(manifests)
    for path in write(manifests, out):
        ui.out.print(str(path))
    if spec.runtime_class:
        ui.info(f"masters: runtimeClassName {spec.runtime_class}; workers: the default runtime")
    else:
        ui.info("masters and workers: the default runtime (no TEE, no Kata)")
    if manifests.initdata is not None:
        for line in manifests.initdata.describe():
            ui.info(line)
    if spec.target is Target.podman:
        argv = play_argv(manifests, f"gcvm-{spec.name}", str(out / "play.yaml"))
        ui.info(f"run with: {' '.join(argv)}  (podman ignores runtime classes and Services)")
    return manifests
