"""``lit-cf explain``: plan the records, run the method through ``Trainer.predict``, merge.

Steps: load the classifier safely; select the queries; one batched no-grad pass over them
(checks images, records the original prediction, resolves target rules); plan fixed chunks of
records; skip the chunks a previous run already committed; optimise the rest in Lightning's
predict loop (each rank takes every ``world_size``-th pending chunk); merge on rank 0.

Chunks are a fixed partition of the record list, so a resumed or multi-device run optimises
exactly the same batches as an uninterrupted single-device run.

The trainer is used through public API only: its own settings stay as the user gave them. The
method leaves inference mode inside its ``predict_step`` (see
:meth:`~lit_cf.explainers.base.CounterfactualMethod.predict_step`), and the chunk sampler is a
``DistributedSampler``, which Lightning never replaces. Rank 0 prints one progress line per
chunk it commits (:class:`ExplainProgress`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence, Sized
from pathlib import Path
from typing import Any, TextIO, cast

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from lit_cf import __version__
from lit_cf.errors import UserError
from lit_cf.explainers.base import CounterfactualMethod
from lit_cf.explainers.targets import resolve_targets
from lit_cf.models.base import ImageClassifier
from lit_cf.models.external import ClassifierSource, export_classifier, load_classifier
from lit_cf.report.grids import write_grids
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


class RankChunkSampler(DistributedSampler[int]):
    """This rank's share (every ``world_size``-th) of the chunks not yet committed.

    A ``DistributedSampler`` so that Lightning leaves it in place under every strategy: with
    ``Trainer(use_distributed_sampler=True)`` (the default) Lightning does not replace a sampler
    that is already distributed, and with ``False`` it replaces none. The engine shards whole
    chunks itself, without the padding of a plain ``DistributedSampler``.

    Rank and world size are resolved lazily, on first use inside the predict loop: by then every
    rank has joined the process group, which happens after rank 0 prepared (or cleared) the run
    directory (and under ``ddp_spawn`` the sampler is pickled before the ranks exist).
    """

    def __init__(self, rundir: RunDir, chunks: ChunkDataset) -> None:
        # one replica until _mine() knows better: the base class must not look for a process group yet
        super().__init__(chunks, num_replicas=1, rank=0, shuffle=False)
        self.rundir, self.num_chunks = rundir, len(chunks)
        self._ids: list[int] | None = None

    def _mine(self) -> list[int]:
        if self._ids is None:
            done = self.rundir.done_chunks()
            pending = [c for c in range(self.num_chunks) if c not in done]
            if dist.is_available() and dist.is_initialized():
                self.rank, self.num_replicas = dist.get_rank(), dist.get_world_size()
                pending = pending[self.rank :: self.num_replicas]
            self._ids = pending
            self.num_samples = self.total_size = len(pending)
        return self._ids

    def __iter__(self) -> Iterator[int]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


def _format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format_rate(seconds_per_record: float) -> str:
    if seconds_per_record >= 1:
        return f"{seconds_per_record:.1f} s/record"
    return f"{seconds_per_record * 1000:.0f} ms/record"


class ExplainProgress:
    """Progress of an explain run, one line per chunk that rank 0 commits (to ``stream``).

    Counts come from the committed chunk files, so under DDP the lines cover every rank's work
    (each other rank's chunk is read once, when rank 0 next commits). Chunks committed by an
    earlier, interrupted run are counted as resumed: they are in the record counts and the
    success rate but not in the time per record, which covers this run's records only.

    Args:
        rundir: The run directory.
        num_records: Records of the whole run.
        num_chunks: Chunks of the whole run.
        stream: Where the lines go (default: ``sys.stderr`` at the time of printing).
    """

    def __init__(self, rundir: RunDir, num_records: int, num_chunks: int, stream: TextIO | None = None) -> None:
        self.rundir, self.num_records, self.num_chunks, self.stream = rundir, num_records, num_chunks, stream
        self.seen: set[int] = set()
        self.records = self.successes = 0
        self.resumed_chunks = self.resumed_records = 0
        self.new_records = 0
        self.start = time.perf_counter()

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    def _tally(self, chunk: int, rows: Sequence[dict[str, Any]] | None = None) -> int:
        """Count a committed chunk once; returns its number of records (0 if already counted)."""
        if chunk in self.seen:
            return 0
        if rows is None:
            rows = self._read_rows(chunk)
            if rows is None:
                return 0
        self.seen.add(chunk)
        self.records += len(rows)
        self.successes += sum(bool(r.get("success")) for r in rows)
        return len(rows)

    def _read_rows(self, chunk: int) -> list[dict[str, Any]] | None:
        """The rows of a chunk another rank (or an earlier run) committed; None if unreadable.

        Only the outcome columns are needed here; the shard checksums are verified at the merge.
        """
        try:
            lines = self.rundir.chunk_paths(chunk)[1].read_text().splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError):
            return None
        return [r for r in rows if isinstance(r, dict) and "commit" not in r]

    def resume(self) -> None:
        """Count the chunks already committed before this run and say so (if any)."""
        for chunk in sorted(self.rundir.done_chunks()):
            n = self._tally(chunk)
            if n:
                self.resumed_chunks += 1
                self.resumed_records += n
        if self.resumed_chunks:
            self._print(
                f"lit-cf explain: resuming: {self.resumed_chunks}/{self.num_chunks} chunks "
                f"({self.resumed_records}/{self.num_records} records) already committed, "
                f"success {self.successes / max(self.records, 1):.1%}"
            )
        self.start = time.perf_counter()

    def committed(self, chunk: int, rows: Sequence[dict[str, Any]]) -> None:
        """Rank 0 committed ``chunk`` (its ``rows``): count it and the other ranks' new chunks."""
        self.new_records += self._tally(chunk, rows)
        for other in sorted(self.rundir.done_chunks() - self.seen):
            self.new_records += self._tally(other)
        elapsed = time.perf_counter() - self.start
        per_record = elapsed / max(self.new_records, 1)
        resumed = f", {self.resumed_records} resumed" if self.resumed_records else ""
        this_chunk = sum(bool(r.get("success")) for r in rows) / max(len(rows), 1)
        remaining = max(self.num_records - self.records, 0)
        self._print(
            f"lit-cf explain: chunk {len(self.seen)}/{self.num_chunks} ({self.records}/{self.num_records} records{resumed}) "
            f"success {self.successes / max(self.records, 1):.1%} (this chunk {this_chunk:.1%}), "
            f"{_format_rate(per_record)}, eta {_format_duration(remaining * per_record)}"
        )


class ChunkWriter(BasePredictionWriter):
    """Commits each optimised chunk to the run directory as soon as it is done."""

    def __init__(self, rundir: RunDir, records: list[dict[str, Any]], progress: ExplainProgress | None = None) -> None:
        super().__init__(write_interval="batch")
        self.rundir, self.records, self.progress = rundir, records, progress

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
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
        if self.progress is not None and trainer.is_global_zero:
            self.progress.committed(chunk, rows)


def _trainer_attr(trainer: L.Trainer, name: str) -> Any:
    """A public Trainer attribute that Lightning sets in ``__init__`` without declaring it on the
    class (``callbacks``, ``fast_dev_run``), so a type checker cannot see it."""
    return getattr(trainer, name)


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
    n = len(cast(Sized, data))
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
    if _trainer_attr(trainer, "fast_dev_run") or (limit is not None and (isinstance(limit, int) or limit < 1.0)):
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
    chunks = ChunkDataset(data, records, chunk_size)
    loader = DataLoader(chunks, batch_size=None, sampler=RankChunkSampler(rundir, chunks))
    progress = ExplainProgress(rundir, len(records), num_chunks)
    if trainer.is_global_zero:
        progress.resume()
    writer = ChunkWriter(rundir, records, progress)
    callbacks: list[Callback] = _trainer_attr(trainer, "callbacks")
    callbacks.append(writer)
    try:
        trainer.predict(method, dataloaders=loader, return_predictions=False)
    finally:
        callbacks.remove(writer)
        method.remove_hooks()  # also after a failed run: the user's classifier is left as it was given
    trainer.strategy.barrier("explain-merge")
    if not trainer.is_global_zero:
        return rundir.root
    rows, integrity = rundir.merge(len(records))
    grids = write_grids(rundir, cast(list[dict[str, Any]], rows), num_grid_images)  # rows: plain JSON objects
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
