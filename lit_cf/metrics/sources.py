"""Classifiers of ``lit-cf evaluate`` from any source, and feature layers of any module.

* :func:`run_classifier` rebuilds the classifier an explain run recorded (a lit-cf ``.ckpt``,
  a TorchScript file with its recorded normalisation, the TorchScript copy the Python API
  saved) or builds the ``--classifier`` the user gives, and checks that its weights are the
  ones the run explained. A run made from a module mapping is never rebuilt from the run's
  files (that would let a file name the code to import): the mapping must be given again.
* :func:`auto_feature_layers` picks one layer per resolution stage of any ``nn.Module``;
  :class:`PenultimateFeatures` gives the input of its last linear layer (FID features).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_cf.errors import UserError
from lit_cf.models.base import ImageClassifier
from lit_cf.models.external import ExternalClassifier, classifier_identity, load_classifier
from lit_cf.runs import ExplainRun
from lit_cf.utils.checkpoint import file_sha256


def source_label(source: Any) -> str:
    """A short, JSON-safe name of a classifier source for reports."""
    if isinstance(source, Mapping):
        module = source.get("module")
        if module is not None:
            name = module.get("class_path") if isinstance(module, Mapping) else getattr(module, "class_path", None)
            name = name or f"{type(module).__module__}.{type(module).__qualname__}"
            return f"{name} + {source.get('weights')}"
        return str(source.get("path"))
    return str(source)


def load_source(source: Any, example: Tensor, device: torch.device) -> tuple[ImageClassifier, dict[str, Any]]:
    """A frozen classifier of any source on ``device`` with its recorded info."""
    model, info = load_classifier(source, example=example)
    return model.to(device), info


def run_classifier(
    run: ExplainRun, name: str, override: Any, device: torch.device
) -> tuple[ImageClassifier, dict[str, Any], str | None]:
    """The classifier ``run`` explained: ``(model, info, identity)``; raises UserError on a mismatch."""
    recorded = dict(run.meta.get("classifier") or {})
    kind = recorded.get("kind", "lit_cf_checkpoint")
    example = run.tensor("query")[:2].float()
    if override is not None:
        model, info = load_source(override, example, device)
        same = (
            info.get("state_sha256") == recorded.get("state_sha256")
            if info.get("state_sha256") and recorded.get("state_sha256")
            else info.get("sha256") is not None and info.get("sha256") == recorded.get("sha256")
        )
        if not same:
            raise UserError(f"run {name} explained a different classifier than {source_label(override)} (checksum differs)")
        return model, info, classifier_identity(recorded)
    if kind == "module":
        raise UserError(
            f"run {name} explained {recorded.get('class_path')} built from a module mapping: pass the same mapping as "
            "--classifier (class paths are only taken from your command line or config, never from a run's files)"
        )
    if kind == "python":
        export = run.meta.get("classifier_export") or {}
        path = run.dir.root / str(export.get("path", ""))
        if not export.get("path") or not path.is_file():
            raise UserError(
                f"run {name} explained an in-memory classifier without a saved copy ({export.get('error', 'none saved')}): "
                "pass it as --classifier"
            )
        if file_sha256(path) != export.get("sha256"):
            raise UserError(f"run {name}: its saved classifier copy {path} was changed (checksum differs)")
        model, info = load_source(str(path), example, device)
        return model, info, classifier_identity(recorded)
    checkpoint = recorded.get("path")
    if not checkpoint or not Path(checkpoint).is_file():
        raise UserError(f"run {name}: its classifier checkpoint {checkpoint} is missing; pass --classifier")
    if file_sha256(checkpoint) != recorded.get("sha256"):
        raise UserError(f"run {name} explained a different classifier than {checkpoint} (checksum differs)")
    source: Any = checkpoint
    if kind == "torchscript":  # normalisation and output kind are data, safe to take from the run
        source = {
            "path": checkpoint,
            **{k: recorded[k] for k in ("input_mean", "input_std", "output", "class_names") if recorded.get(k) is not None},
        }
    model, info = load_source(source, example, device)
    return model, info, classifier_identity(recorded)


# --------------------------------------------------------------------------- feature layers
def _check_hookable(model: nn.Module, what: str) -> None:
    if isinstance(model, ExternalClassifier) and model.scripted:
        raise UserError(
            f"the {what} is a TorchScript module, whose layers cannot be observed: give it as a mapping "
            "{module: {class_path: ...}, weights: <the TorchScript file or a state dict>} instead"
        )


@torch.no_grad()
def auto_feature_layers(model: nn.Module, example: Tensor) -> list[str]:
    """One layer per resolution stage: for each spatial size of a 4-D output, the module that
    finishes last at that size (in a ResNet the stages ``layer1``..``layer4``; with a stem).

    Modules called more than once in a forward pass (a shared ReLU) are left out, since their
    output is not one place in the network.
    """
    _check_hookable(model, "feature network")
    calls: dict[str, int] = {}
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, Tensor):
                order.append((name, tuple(output.shape)))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        param = next(model.parameters(), None)
        model(example.to(param.device) if param is not None else example)
    finally:
        for h in handles:
            h.remove()
    last: dict[tuple[int, int], str] = {}
    for name, shape in order:
        if calls[name] == 1 and len(shape) == 4:
            last.pop(shape[2:], None)  # re-insert: dict order = order of the stage's last module
            last[shape[2:]] = name
    if not last:
        raise UserError("no layer of the feature network outputs feature maps [N, C, H, W]: name them in feature_layers")
    return list(last.values())


class PenultimateFeatures(nn.Module):
    """The input of a classifier's last ``nn.Linear`` (its penultimate features), flattened.

    Without a linear layer, the spatial mean of the last layer :func:`auto_feature_layers` picks.
    """

    def __init__(self, classifier: nn.Module, example: Tensor) -> None:
        super().__init__()
        _check_hookable(classifier, "feature network")
        self.classifier = classifier
        linears = [n for n, m in classifier.named_modules() if isinstance(m, nn.Linear)]
        self.layer = linears[-1] if linears else auto_feature_layers(classifier, example)[-1]
        self.use_input = bool(linears)
        self.num_features = int(self(example.to(next(classifier.parameters()).device)).shape[1])

    def forward(self, x: Tensor) -> Tensor:
        captured: list[Tensor] = []
        module = dict(self.classifier.named_modules())[self.layer]
        if self.use_input:
            handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].flatten(1)))
        else:
            handle = module.register_forward_hook(lambda m, args, out: captured.append(out.float().mean((2, 3))))
        try:
            self.classifier(x)
        finally:
            handle.remove()
        return captured[-1]


def feature_layers_of(model: ImageClassifier, info: Mapping[str, Any], source: Any, example: Tensor) -> tuple[list[str], str]:
    """Layers for ``perceptual_domain`` of an external feature network: given or automatic."""
    given = source.get("feature_layers") if isinstance(source, Mapping) else None
    if given:
        _check_hookable(model, "feature network")
        modules = dict(model.named_modules())
        missing = [n for n in given if n not in modules]
        if missing:
            known = [n for n in modules if n.count(".") <= 1 and n][:20]
            raise UserError(f"feature_layers {missing} are not modules of the feature network; some that are: {known}")
        return list(given), "given"
    return auto_feature_layers(model, example), "chosen automatically"


__all__ = ["PenultimateFeatures", "auto_feature_layers", "feature_layers_of", "load_source", "run_classifier", "source_label"]
