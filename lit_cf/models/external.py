"""Classifier sources: turn any classifier a user has into the frozen classifier lit-cf explains.

One adapter, :func:`load_classifier`, accepts

* a path to a lit-cf checkpoint (``.ckpt`` written by ``lit-cf fit``), rebuilt safely with
  :func:`lit_cf.utils.checkpoint.load_module`;
* a path to a TorchScript file (any suffix; recognised from its content, loaded with
  ``torch.jit.load``);
* a mapping (YAML or the command line)::

    module: {class_path: torchvision.models.resnet18, init_args: {num_classes: 3}}
    weights: model.safetensors       # or a weights-only .pt/.pth state dict, or a TorchScript file
    input_mean: [0.485, 0.456, 0.406]
    input_std: [0.229, 0.224, 0.225]
    output: logits                   # logits | probabilities | binary_logit
    class_names: [cat, dog, fox]

  or ``{path: model.ts, input_mean: ..., output: ...}`` for a TorchScript file (or a lit-cf
  checkpoint) that needs normalisation or an output conversion;
* in Python (:func:`lit_cf.explain`), any ``nn.Module`` or callable returning logits.

Every source ends as an :class:`ExternalClassifier` (or the lit-cf classifier itself): images
in ``[0, 1]`` go in, normalisation happens inside, logits ``[N, C]`` come out. A single-logit
binary model (``output: binary_logit``) becomes two classes with logits ``[0, z]`` (so
``softmax`` gives ``[1 - sigmoid(z), sigmoid(z)]``); ``probabilities`` become log-probabilities.
The number of classes is read from the model's output on one example image, which also checks
that the model takes the images and returns ``[N, C]``.

Security: the ``class_path`` of a mapping comes only from the user's own config or command
line; weights are read with safetensors, ``torch.load(weights_only=True)`` or as TorchScript
(whose code is TorchScript, not Python); nothing read from a file names code to import.
"""

from __future__ import annotations

import hashlib
import importlib
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_cf.errors import UserError
from lit_cf.models.base import ImageClassifier, freeze
from lit_cf.utils.checkpoint import file_sha256, load_module

OUTPUTS = ("logits", "probabilities", "binary_logit")
MAPPING_KEYS = ("module", "weights", "path", "input_mean", "input_std", "output", "class_names", "feature_layers")

ClassifierSource = str | Path | Mapping[str, Any] | nn.Module | Callable[[Tensor], Tensor]


class ExternalClassifier(ImageClassifier):
    """A classifier lit-cf did not train, wrapped to the lit-cf classifier contract.

    ``forward(x)`` takes images in ``[0, 1]``, normalises them with ``input_mean`` /
    ``input_std`` and returns logits ``[N, num_classes]`` converted from the network's
    ``output`` kind. The network is exposed as the submodule ``net`` (its layers are named
    ``net.<name>`` in ``named_modules()``, e.g. ``net.layer3`` of a torchvision ResNet).

    Args:
        net: The network (an ``nn.Module``, a TorchScript module, or any callable).
        num_classes: Classes of the wrapped model (2 for ``binary_logit``).
        input_mean: Per-channel mean subtracted inside the wrapper (``None``: none).
        input_std: Per-channel std divided inside the wrapper (``None``: none).
        output: ``logits``, ``probabilities`` or ``binary_logit`` (one logit of class 1).
        class_names: Optional names of the classes.
        source: What the classifier was built from (recorded in explain runs).
    """

    def __init__(
        self,
        net: nn.Module | Callable[[Tensor], Tensor],
        num_classes: int,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        output: str = "logits",
        class_names: Sequence[str] | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes, input_mean, input_std)
        if output not in OUTPUTS:
            raise UserError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        if isinstance(net, nn.Module):
            self.net = net
        else:  # a plain callable: kept as an attribute (it has no parameters to move or freeze)
            self._callable = net
        self.output = output
        self.class_names = list(class_names) if class_names is not None else None
        self.source = dict(source or {})

    @property
    def scripted(self) -> bool:
        """True when the network is TorchScript (no forward hooks: no feature or BatchNorm terms)."""
        return isinstance(getattr(self, "net", None), torch.jit.ScriptModule)

    def _call(self, x: Tensor) -> Tensor:
        net = self.net if "net" in self._modules else self._callable
        return net(x)

    def logits(self, x: Tensor) -> Tensor:
        out = self._call(x)
        return convert_output(out, self.output, len(x))


def convert_output(out: Any, kind: str, batch: int) -> Tensor:
    """Network output -> logits ``[N, C]``; raises UserError for any other shape."""
    if not isinstance(out, Tensor):
        raise UserError(f"the classifier returned a {type(out).__name__}, not a tensor of logits [N, C]")
    if kind == "binary_logit":
        if out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.dim() != 1 or out.shape[0] != batch:
            raise UserError(f"output: binary_logit needs one logit per image ([N] or [N, 1]); got shape {tuple(out.shape)}")
        return torch.stack([torch.zeros_like(out), out], dim=1)
    if out.dim() != 2 or out.shape[0] != batch:
        raise UserError(f"the classifier must return [N, C] ({kind}) for N={batch} images; got shape {tuple(out.shape)}")
    if out.shape[1] < 2:
        raise UserError(
            f"the classifier returns {out.shape[1]} output per image: a single-logit binary model needs output: binary_logit"
        )
    if kind == "probabilities":
        return out.clamp_min(1e-12).log()
    return out


# --------------------------------------------------------------------------- helpers
def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive: a zip file holding compiled ``code/`` and ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    import warnings

    try:
        with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # corrupt archive, unknown operators, truncated file
        raise UserError(f"cannot load TorchScript file {path}: it is corrupt or not TorchScript ({_first_line(err)})") from err


def state_sha256(module: nn.Module | Any) -> str | None:
    """SHA-256 over a module's state dict (dtypes, shapes and values in name order): its weights' identity.

    Names are left out of the hash on purpose: the same weights wrapped differently (a module
    inside ``nn.Sequential`` with a normalisation layer, its TorchScript export) keep their identity.
    """
    if not isinstance(module, nn.Module):
        return None
    digest = hashlib.sha256()
    for _, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _class_path_of(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise UserError(f"module class_path {class_path!r} must be a dotted path such as torchvision.models.resnet18")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import the classifier module {class_path!r}: {_first_line(err)}") from err


def _build_module(spec: Any) -> tuple[nn.Module, str]:
    """The ``module`` entry of a mapping: an instance (built by the CLI) or ``{class_path, init_args}``."""
    if isinstance(spec, nn.Module):
        return spec, _class_path_of(spec)
    if hasattr(spec, "class_path") and not isinstance(spec, Mapping):  # a jsonargparse Namespace
        spec = {"class_path": spec.class_path, "init_args": dict(vars(getattr(spec, "init_args", None) or {}))}
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise UserError("classifier.module must be {class_path: a.b.Class, init_args: {...}}")
    class_path = str(spec["class_path"])
    init_args = dict(spec.get("init_args") or {})
    factory = _import(class_path)
    try:
        module = factory(**init_args)
    except Exception as err:
        raise UserError(f"cannot build {class_path} with init_args {init_args}: {_first_line(err)}") from err
    if not isinstance(module, nn.Module):
        raise UserError(f"{class_path} built a {type(module).__name__}, not a torch.nn.Module")
    return module, class_path


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights from ``.safetensors``, a TorchScript file, or a weights-only ``torch.save`` state dict."""
    if not path.is_file():
        raise UserError(f"classifier weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise UserError(f"cannot read safetensors weights {path}: {_first_line(err)}") from err
    if is_torchscript(path):
        return dict(_load_torchscript(path).state_dict())
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a pickle that needs unsafe globals: never unpickled
        asked = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), "objects other than tensors")
        raise UserError(
            f"refused to read {path}: it is not a weights-only state dict and was not unpickled ({asked}); "
            "save weights with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from err
    except Exception as err:  # truncated or not a torch file
        raise UserError(f"cannot read weights {path}: corrupt, truncated or not a state dict ({_first_line(err)})") from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # a checkpoint-like dict that holds the weights
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return dict(state)


def load_weights(module: nn.Module, state: Mapping[str, Tensor], where: str | Path) -> None:
    """Load ``state`` strictly, naming the first three missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (file vs module, e.g. {shapes[:3]})")
    if problems:
        raise UserError(
            f"weights {where} do not match {type(module).__name__}: {'; '.join(problems)}. "
            "Check module.init_args (e.g. num_classes) against the model the weights were saved from"
        )
    module.load_state_dict(state, strict=True)


def _norm_list(value: Any, name: str) -> list[float] | None:
    if value is None:
        return None
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if not values:
        raise UserError(f"{name} is empty: give one value per image channel")
    if name == "input_std" and any(v <= 0 for v in values):
        raise UserError(f"input_std must be positive, got {values}")
    return values


def _expected_input(net: Any) -> str:
    """What the first layer of ``net`` takes, for error messages."""
    if isinstance(net, nn.Module) and not isinstance(net, torch.jit.ScriptModule):
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                return f"images with {m.in_channels} channel(s)"
            if isinstance(m, nn.Linear):
                return f"{m.in_features} input values per image (C*H*W)"
    return "another input shape"


def probe(net: Any, example: Tensor, mean: list[float] | None, std: list[float] | None, output: str) -> int:
    """Run ``net`` once on ``example`` ``[N, C, H, W]``; the number of classes it returns.

    Checks the normalisation lengths against the channel count, that the network takes the
    images, and that it returns ``[N, C]`` (or one logit per image for ``binary_logit``).
    """
    channels = example.shape[1]
    for name, values in (("input_mean", mean), ("input_std", std)):
        if values is not None and len(values) not in (1, channels):
            raise UserError(f"{name} has {len(values)} values but the images have {channels} channel(s): give {channels}")
    x = example
    if mean is not None:
        x = x - torch.tensor(mean).view(1, -1, 1, 1)
    if std is not None:
        x = x / torch.tensor(std).view(1, -1, 1, 1)
    if isinstance(net, nn.Module):
        param = next(net.parameters(), None)
        if param is not None:
            x = x.to(param.device)
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as err:  # a wrong input shape surfaces as a RuntimeError from the first layer
        raise UserError(
            f"the classifier cannot take images of shape {tuple(example.shape[1:])} (it expects {_expected_input(net)}): "
            f"{_first_line(err)}"
        ) from err
    return int(convert_output(out, output, len(example)).shape[1])


# --------------------------------------------------------------------------- the adapter
def load_classifier(source: ClassifierSource, example: Tensor | None = None) -> tuple[ImageClassifier, dict[str, Any]]:
    """Build the frozen, eval-mode classifier of ``source`` and describe where it came from.

    Args:
        source: A lit-cf ``.ckpt`` path, a TorchScript path, a mapping (see the module
            docstring), an ``nn.Module`` or a callable returning logits.
        example: One or a few images ``[N, C, H, W]`` in ``[0, 1]``: non-lit-cf sources are run
            on them once to read the number of classes and check shapes (required for them).

    Returns:
        ``(classifier, info)``; ``info`` holds ``kind`` (``lit_cf_checkpoint``,
        ``torchscript``, ``module`` or ``python``), ``path`` and ``sha256`` of the file that
        holds the weights, ``class_path``, ``state_sha256`` (hash of the loaded weights) and
        the normalisation and output settings.
    """
    if isinstance(source, (str, Path)):
        source = {"path": str(source)}
    if isinstance(source, ImageClassifier):
        info = {"kind": "python", "class_path": _class_path_of(source), "state_sha256": state_sha256(source)}
        return freeze(source), info
    if isinstance(source, nn.Module) or (callable(source) and not isinstance(source, Mapping)):
        return _wrap(source, {}, example, {"kind": "python", "class_path": _class_path_of(source)})
    if not isinstance(source, Mapping):
        raise UserError(f"classifier must be a path or a mapping, got {type(source).__name__}")
    spec = dict(source)
    unknown = sorted(set(spec) - set(MAPPING_KEYS))
    if unknown:
        raise UserError(f"unknown classifier keys {unknown}; known: {list(MAPPING_KEYS)}")
    if ("module" in spec) == ("path" in spec):
        raise UserError(
            "a classifier mapping needs exactly one of `path` (a .ckpt or TorchScript file) or `module` (+ `weights`)"
        )
    if "path" in spec:
        path = Path(str(spec["path"]))
        if not path.is_file():
            raise UserError(
                f"classifier checkpoint not found: {path} "
                "(give a lit-cf .ckpt, a TorchScript file, or a mapping with module + weights)"
            )
        info = {"kind": "torchscript", "path": str(path.resolve()), "sha256": file_sha256(path)}
        if is_torchscript(path):
            net = _load_torchscript(path)
            return _wrap(net, spec, example, {**info, "class_path": getattr(net, "original_name", "torchscript")})
        if set(spec) - {"path", "feature_layers"}:
            raise UserError(f"{path} is a lit-cf checkpoint: it carries its own normalisation; give it as a plain path")
        model = load_module(path, ImageClassifier)
        info = {
            "kind": "lit_cf_checkpoint",
            "path": info["path"],
            "sha256": info["sha256"],
            "class_path": _class_path_of(model),
        }
        return freeze(model), info
    if spec.get("weights") in (None, ""):
        raise UserError(
            "a classifier mapping with `module` needs `weights` (.safetensors, a weights-only .pt/.pth, or TorchScript)"
        )
    module, class_path = _build_module(spec["module"])
    weights = Path(str(spec["weights"]))
    load_weights(module, read_state_dict(weights), weights)
    info = {"kind": "module", "class_path": class_path, "path": str(weights.resolve()), "sha256": file_sha256(weights)}
    return _wrap(module, spec, example, info)


def _wrap(
    net: Any, spec: Mapping[str, Any], example: Tensor | None, info: dict[str, Any]
) -> tuple[ExternalClassifier, dict[str, Any]]:
    output = str(spec.get("output") or "logits")
    if output not in OUTPUTS:
        raise UserError(f"classifier output must be one of {list(OUTPUTS)}, got {output!r}")
    mean, std = _norm_list(spec.get("input_mean"), "input_mean"), _norm_list(spec.get("input_std"), "input_std")
    if mean is not None and std is not None and len(mean) != len(std):
        raise UserError(f"input_mean has {len(mean)} values and input_std {len(std)}: give one per channel in both")
    if isinstance(net, nn.Module):
        freeze(net)
    if example is None:
        raise UserError("an example image is needed to check a classifier that lit-cf did not train")
    num_classes = probe(net, example.float(), mean, std, output)
    names = spec.get("class_names")
    if names is not None and len(names) != num_classes:
        raise UserError(f"class_names has {len(names)} names but the classifier returns {num_classes} classes")
    info = {
        **info,
        "state_sha256": state_sha256(net),
        "num_classes": num_classes,
        "input_mean": mean,
        "input_std": std,
        "output": output,
        "class_names": list(names) if names is not None else None,
    }
    model = ExternalClassifier(net, num_classes, mean, std, output, names, info)
    return freeze(model), info


def classifier_identity(info: Mapping[str, Any]) -> str | None:
    """What identifies a classifier's weights: the state hash when known, else the file's SHA-256."""
    return info.get("state_sha256") or info.get("sha256")


__all__ = [
    "ClassifierSource",
    "ExternalClassifier",
    "classifier_identity",
    "export_classifier",
    "is_torchscript",
    "load_classifier",
    "load_weights",
    "read_state_dict",
    "state_sha256",
]


EXPORT_NAME = "classifier.ts"


class _Exportable(nn.Module):
    """Plain-module view of a classifier for tracing: ``logits(normalize(x))`` without the
    LightningModule around it (tracing a LightningModule touches its trainer properties)."""

    mean: Tensor  # buffers, registered in __init__
    std: Tensor
    _fn: Callable[[Tensor], Tensor] | None
    _model: ImageClassifier | None

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        inner = model.net if isinstance(model, ExternalClassifier) and "net" in model._modules else None
        self.net = inner
        # the rest is kept outside the module tree (not a submodule): only its forward is traced,
        # its weights become constants of the traced graph
        object.__setattr__(self, "_fn", model._callable if inner is None and isinstance(model, ExternalClassifier) else None)
        object.__setattr__(self, "_model", model if inner is None else None)
        self.register_buffer("mean", model.input_mean.detach().clone())
        self.register_buffer("std", model.input_std.detach().clone())
        self.kind = model.output if isinstance(model, ExternalClassifier) else "logits"

    def forward(self, x: Tensor) -> Tensor:
        if self.net is not None:
            return convert_output(self.net((x - self.mean) / self.std), self.kind, len(x))
        if self._fn is not None:  # an ExternalClassifier around a plain callable
            return convert_output(self._fn((x - self.mean) / self.std), self.kind, len(x))
        assert self._model is not None  # set whenever net is None
        return self._model.logits(self._model.normalize(x))


def export_classifier(model: ImageClassifier, rundir: Any, example: Tensor) -> dict[str, Any]:
    """Save a traced TorchScript copy of an in-memory classifier into an explain run directory.

    ``lit-cf evaluate`` reads a run's classifier from a file; a model given in Python has none,
    so its wrapper (normalisation and output conversion included) is traced on ``example`` and
    saved as ``classifier.ts``, checked to reproduce the model's logits. A model that cannot be
    traced (data-dependent control flow, a non-tensor callable) gets no copy and a warning:
    evaluate then needs ``--classifier`` (whose weights must hash to the recorded
    ``state_sha256``). The outcome is recorded in ``run.json`` under ``classifier_export``.
    """
    import warnings

    from lit_cf.runs import atomic_write_bytes

    example = example.float()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            device = next(model.parameters(), torch.empty(0)).device
            example = example.to(device)
            traced = torch.jit.trace(_Exportable(model), example, check_trace=False)
            if not torch.allclose(traced(example), model(example), atol=1e-5, rtol=1e-4):
                raise RuntimeError("the traced copy does not reproduce the model's logits")
            import io

            buffer = io.BytesIO()
            torch.jit.save(traced.cpu() if device.type != "cpu" else traced, buffer)
        path = Path(rundir.root) / EXPORT_NAME
        atomic_write_bytes(path, buffer.getvalue())
        record = {"path": EXPORT_NAME, "sha256": file_sha256(path)}
    except Exception as err:  # tracing is best effort: the explanation itself does not need it
        warnings.warn(
            f"could not save a TorchScript copy of the classifier ({_first_line(err)}): "
            "`lit-cf evaluate` on this run will need --classifier",
            stacklevel=2,
        )
        record = {"error": _first_line(err)}
    meta = rundir.read_meta() or {}
    meta["classifier_export"] = record
    rundir.write_meta(meta)
    return record
