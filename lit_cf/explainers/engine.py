"""``lit-cf explain``: plan the records, run the method through ``Trainer.predict``, merge.

Steps: load the classifier safely; select the queries; one batched no-grad pass over them
(checks images, records the original prediction, resolves target rules); plan fixed chunks of
records; skip the chunks a previous run already committed; optimise the rest in Lightning's
predict loop (each rank takes every ``world_size``-th pending chunk); merge on rank 0.

Chunks are a fixed partition of the record list, so a resumed or multi-device run optimises
exactly the same batches as an uninterrupted single-device run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_cf import __version__
from lit_cf.errors import UserError
from lit_cf.explainers.base import CounterfactualMethod
from lit_cf.explainers.grids import write_grids
from lit_cf.explainers.targets import resolve_targets
from lit_cf.models.base import ImageClassifier
from lit_cf.models.external import ClassifierSource, export_classifier, load_classifier
from lit_cf.runs import RunDir, atomic_write_text, check_output_dir

SELECT = ("all", "correct", "misclassified")


def record_seed(seed: int, index: int, target: int) -> int:
    """Seed of one (image, target) record: independent of chunking and devices."""
    return ((seed * 1_000_003 + index) * 1_009 + target) % (2**62)


class ChunkDataset(Dataset):
    """Item ``k`` is the whole collated chunk ``k`` of the record list."""

    def __init__(self, data: Dataset, records: list[dict[str, Any]], chunk_size: int) -> None:
        self.data, self.records, self.chunk_size = data, records, chunk_size

    def __len__(self) -> int:
        return -(-len(self.records) // self.chunk_size)

    def __getitem__(self, chunk: int) -> dict[str, Tensor]:
        recs = self.records[chunk * self.chunk_size : (chunk + 1) * self.chunk_size]
        # explain data is read once per chunk; the hot loop is the optimisation, not this
        images = torch.stack([self.data[r["index"]]["image"] for r in recs])
        batch = {"image": images, "chunk": torch.tensor(chunk)}
        for key in ("record", "index", "target", "source_label", "orig_pred", "seed"):
            batch[key] = torch.tensor([r[key] for r in recs], dtype=torch.long)
        return batch


class RankChunkSampler(Sampler[int]):
    """This rank's share (every ``world_size``-th) of the chunks not yet committed.

    Resolved lazily, on first use inside the predict loop: by then every rank has joined the
    process group, which happens after rank 0 prepared (or cleared) the run directory.
    """

    def __init__(self, rundir: RunDir, num_chunks: int) -> None:
        self.rundir, self.num_chunks = rundir, num_chunks
        self._ids: list[int] | None = None

    def _mine(self) -> list[int]:
        if self._ids is None:
            done = self.rundir.done_chunks()
            pending = [c for c in range(self.num_chunks) if c not in done]
            if dist.is_available() and dist.is_initialized():
                pending = pending[dist.get_rank() :: dist.get_world_size()]
            self._ids = pending
        return self._ids

    def __iter__(self):
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


class ChunkWriter(BasePredictionWriter):
    """Commits each optimised chunk to the run directory as soon as it is done."""

    def __init__(self, rundir: RunDir, records: list[dict[str, Any]]) -> None:
        super().__init__(write_interval="batch")
        self.rundir, self.records = rundir, records

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        chunk = int(batch["chunk"])
        n = len(batch["record"])
        probs = prediction["final_probs"].cpu()
        target = batch["target"].cpu()
        final_pred = probs.argmax(-1)
        tensors = {"counterfactual": prediction["counterfactual"], "query": batch["image"], "final_probs": probs}
        per_record: dict[str, Tensor] = {}
        for key, value in prediction.items():
            if key in ("counterfactual", "final_probs") or not isinstance(value, Tensor) or value.dim() == 0:
                continue
            if key == "steps" or value.shape[0] != n:
                continue
            if value.dim() == 1:
                per_record[key] = value.cpu()
            else:
                tensors[key] = value
        seconds = float(prediction["chunk_seconds"]) / n
        rows = []
        for i in range(n):
            rec = dict(self.records[int(batch["record"][i])])
            t = int(target[i])
            rec.update(
                final_pred=int(final_pred[i]),
                final_target_prob=float(probs[i, t]),
                success=bool(final_pred[i] == t),
                steps=int(prediction["steps"][i]),
                seconds=seconds,
                chunk=chunk,
                chunk_seconds=float(prediction["chunk_seconds"]),
            )
            if "peak_memory_mb" in prediction:
                rec["peak_memory_mb"] = float(prediction["peak_memory_mb"])
            for key, value in per_record.items():
                rec[key] = value[i].item()
            rows.append(rec)
        self.rundir.write_chunk(chunk, tensors, rows)


def _first_conv_channels(model: torch.nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    return None


@torch.no_grad()
def predict_queries(
    classifier: ImageClassifier, data: Dataset, indices: Sequence[int], batch_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Original probabilities and labels of the queries; checks every image on the way."""
    classifier = classifier.to(device).eval()
    expected_c = _first_conv_channels(classifier)
    probs, labels = [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        samples = [data[i] for i in idx]
        images = torch.stack([s["image"] for s in samples])
        if images.dim() != 4:
            raise UserError(f"query images must be [C, H, W]; got a batch of shape {tuple(images.shape)}")
        if expected_c is not None and images.shape[1] != expected_c:
            raise UserError(
                f"images have {images.shape[1]} channel(s) but the classifier expects {expected_c}: "
                "use data that matches the classifier"
            )
        finite = torch.isfinite(images.flatten(1)).all(1)
        if not finite.all():
            bad = [int(i) for i, ok in zip(idx, finite) if not ok]
            raise UserError(f"images contain NaN or inf at dataset indices {bad[:10]}: fix or exclude them")
        try:
            p = classifier.probabilities(images.to(device)).float().cpu()
        except RuntimeError as err:
            raise UserError(
                f"the classifier cannot process images of shape {tuple(images.shape[1:])}: {str(err).splitlines()[0]}"
            ) from err
        probs.append(p)
        labels.append(torch.tensor([int(s["label"]) for s in samples]))
    return torch.cat(probs), torch.cat(labels)


def select_queries(
    data: Dataset,
    indices: Sequence[int] | None,
    num_queries: int | None,
    source_class: int | None,
) -> list[int]:
    n = len(data)
    if indices is not None:
        bad = [i for i in indices if not 0 <= int(i) < n]
        if bad:
            raise UserError(f"query indices {bad[:10]} are out of range for a split of {n} images")
        chosen = [int(i) for i in indices]
    else:
        chosen = list(range(n))
    if source_class is not None:
        if chosen and int(data[chosen[0]]["label"]) < 0:
            raise UserError("source_class needs labelled images, but these have none (a flat image folder)")
        # label filtering reads samples one by one: cheap next to the optimisation that follows
        chosen = [i for i in chosen if int(data[i]["label"]) == source_class]
    if num_queries is not None:
        if num_queries < 1:
            raise UserError(f"num_queries must be >= 1, got {num_queries}")
        chosen = chosen[:num_queries]
    return chosen


def run_explain(
    trainer: L.Trainer,
    method: CounterfactualMethod,
    datamodule: L.LightningDataModule,
    classifier: ClassifierSource,
    output_dir: str,
    split: str = "test",
    indices: list[int] | None = None,
    num_queries: int | None = None,
    source_class: int | None = None,
    select: str = "all",
    target: int | list[int] | str = "most_likely_other",
    target_file: str | None = None,
    on_source_equals_target: str = "error",
    chunk_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    num_grid_images: int = 32,
    config_yaml: str | None = None,
) -> Path:
    """See :meth:`lit_cf.trainer.LitCFTrainer.explain` for the arguments."""
    if not isinstance(method, CounterfactualMethod):
        raise UserError(
            f"explain needs a counterfactual method as --model (e.g. lit_cf.explainers.PixelCounterfactual), "
            f"got {type(method).__name__}"
        )
    if select not in SELECT:
        raise UserError(f"select must be one of {list(SELECT)}, got {select!r}")
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_queries is not None and num_queries < 1:
        raise UserError(f"num_queries must be >= 1, got {num_queries}")
    if num_grid_images < 0:
        raise UserError(f"num_grid_images must be >= 0, got {num_grid_images}")
    if source_class is not None and source_class < 0:
        raise UserError(f"source_class must be a class index >= 0, got {source_class}")
    limit = trainer.limit_predict_batches
    if trainer.fast_dev_run or (limit is not None and (isinstance(limit, int) or limit < 1.0)):
        raise UserError(
            "explain runs every query: remove fast_dev_run / limit_predict_batches from the trainer settings "
            "(select fewer queries with num_queries or indices instead)"
        )
    check_output_dir(output_dir)  # before any work: refuses "", files, and folders that are not lit-cf runs
    rundir = RunDir(Path(output_dir))

    if not hasattr(datamodule, "dataset"):
        raise UserError(f"{type(datamodule).__name__} is not a lit-cf datamodule (it has no dataset(split))")
    try:
        data = datamodule.dataset(split)
    except ValueError as err:
        raise UserError(str(err)) from err
    data_classes = getattr(datamodule, "num_classes", None)
    if source_class is not None and data_classes and source_class >= data_classes:
        raise UserError(f"source_class {source_class} is out of range: the data has classes 0..{data_classes - 1}")
    chosen = select_queries(data, indices, None if select != "all" else num_queries, source_class)
    if not chosen:
        raise UserError(f"the query selection is empty (split {split!r}, indices {indices}, source_class {source_class})")
    # any classifier source (lit-cf .ckpt, TorchScript, module mapping, Python module), checked on two queries
    model, source_info = load_classifier(classifier, example=torch.stack([data[i]["image"] for i in chosen[:2]]))
    if data_classes and data_classes != model.num_classes:
        raise UserError(
            f"the classifier has {model.num_classes} classes but {type(datamodule).__name__} has {data_classes}: "
            "explain it on the data it was trained for"
        )
    if source_class is not None and source_class >= model.num_classes:
        raise UserError(f"source_class {source_class} is out of range: the classifier has classes 0..{model.num_classes - 1}")

    device = trainer.strategy.root_device
    probs, labels = predict_queries(model, data, chosen, max(chunk_size, 256), device)
    check_data = getattr(method, "check_data", None)  # methods with a model of the data (a DDPM) check it here
    if callable(check_data):
        check_data(model, tuple(data[chosen[0]]["image"].shape), datamodule)
    preds = probs.argmax(-1)
    if (labels < 0).any() and (select != "all" or target == "label"):
        rule = f"select: {select}" if select != "all" else "target: label"
        raise UserError(
            f"{rule} needs labelled images, but these have none (a flat image folder): use class subfolders or another rule"
        )
    if select != "all":
        keep = (preds == labels) if select == "correct" else (preds != labels)
        kept = keep.nonzero().flatten().tolist()
        if num_queries is not None:
            kept = kept[:num_queries]
        chosen = [chosen[k] for k in kept]
        probs, labels, preds = probs[kept], labels[kept], preds[kept]
        if not chosen:
            raise UserError(f"the query selection is empty: no {select} queries in split {split!r}")
    pairs = resolve_targets(target, probs, labels, chosen, model.num_classes, target_file, on_source_equals_target)
    if not pairs:
        raise UserError("no (query, target) pairs remain after resolving the target rule")
    records = [
        {
            "record": r,
            "index": int(chosen[q]),
            "source_label": int(labels[q]),
            "orig_pred": int(preds[q]),
            "orig_prob": float(probs[q, preds[q]]),
            "target": int(t),
            "orig_target_prob": float(probs[q, t]),
            "seed": record_seed(seed, int(chosen[q]), int(t)),
        }
        for r, (q, t) in enumerate(pairs)
    ]
    method.prepare(model)  # choices that depend on the classifier, before describe() records them
    # attached before any output exists: a classifier the method cannot use fails here (e.g. DISC's
    # feature layers on TorchScript), not in a half-made run directory
    method.attach(model)
    plan = {
        "lit_cf_version": __version__,
        "method": method.describe(),
        "classifier": source_info,
        "data": datamodule.describe() if hasattr(datamodule, "describe") else type(datamodule).__name__,
        "split": split,
        "target_rule": target,
        "seed": seed,
        "chunk_size": chunk_size,
        "num_records": len(records),
    }
    # every rank reads the state; only rank 0 changes the folder
    state = rundir.state(plan, records, overwrite)
    if trainer.is_global_zero and state != "complete":
        state = rundir.prepare(plan, records, overwrite)
        if config_yaml is not None and state == "new":
            atomic_write_text(rundir.root / "config.yaml", config_yaml)
        if source_info["kind"] == "python":  # an in-memory model: a TorchScript copy lets `lit-cf evaluate` read the run
            export_classifier(model, rundir, torch.stack([data[i]["image"] for i in chosen[:2]]))
    if state == "complete":
        print(f"lit-cf explain: {rundir.root} is already complete; nothing to do (pass overwrite: true to recompute)")
        return rundir.root

    num_chunks = -(-len(records) // chunk_size)
    loader = DataLoader(ChunkDataset(data, records, chunk_size), batch_size=None, sampler=RankChunkSampler(rundir, num_chunks))
    writer = ChunkWriter(rundir, records)
    trainer.callbacks.append(writer)
    # explain needs autograd inside predict_step, and ranks keep their own chunks (no DistributedSampler)
    saved = trainer.predict_loop.inference_mode, trainer._accelerator_connector.use_distributed_sampler
    trainer.predict_loop.inference_mode = False
    trainer._accelerator_connector.use_distributed_sampler = False
    try:
        trainer.predict(method, dataloaders=loader, return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)
        trainer.predict_loop.inference_mode, trainer._accelerator_connector.use_distributed_sampler = saved
    trainer.strategy.barrier("explain-merge")
    if not trainer.is_global_zero:
        return rundir.root
    rows, integrity = rundir.merge(len(records))
    grids = write_grids(rundir, rows, num_grid_images)
    success = sum(r["success"] for r in rows) / len(rows)
    rundir.finish(
        {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "success_rate": success,
            "mean_steps": sum(r["steps"] for r in rows) / len(rows),
            "grids": [str(g.relative_to(rundir.root)) for g in grids],
            **integrity,
        }
    )
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and grids:
            from PIL import Image

            images = []
            for g in grids:
                with Image.open(g) as im:
                    images.append(im.copy())
            logger.log_image(key="explain/grids", images=images)
            logger.log_metrics({"explain/success_rate": success})
    print(
        f"lit-cf explain: {len(rows)} counterfactuals in {rundir.root} (success {success:.1%}); "
        f"grids: {', '.join(str(g) for g in grids)}"
    )
    return rundir.root
