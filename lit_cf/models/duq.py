"""Deterministic Uncertainty Quantification (van Amersfoort et al., ICML 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import BinaryAUROC

from lit_cf.models.base import ImageClassifier


def log_rbf_kernel(z: torch.Tensor, centroids: torch.Tensor, length_scale: float) -> torch.Tensor:
    """``log K_c``, exact (no clamping), so gradients survive where ``K_c`` underflows."""
    return -((z - centroids.unsqueeze(0)) ** 2).mean(1) / (2 * length_scale**2)


def rbf_kernel(z: torch.Tensor, centroids: torch.Tensor, length_scale: float) -> torch.Tensor:
    """DUQ kernel values ``K_c = exp(-mean_n (z_nc - e_nc)^2 / (2 sigma^2))``.

    Args:
        z: Per-class embeddings ``[B, n, C]`` (``W_c f(x)`` for every class ``c``).
        centroids: Centroids ``[n, C]``.
        length_scale: ``sigma``.

    Returns:
        Kernel values ``[B, C]`` in ``(0, 1]``.
    """
    return log_rbf_kernel(z, centroids, length_scale).exp()


def gradient_penalty(inputs: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Two-sided penalty ``mean_i (||d sum_c K_c(x_i) / d x_i||_2 - 1)^2`` (unsquared norm).

    Uses ``create_graph=True`` so the penalty itself is differentiated during training.
    """
    (grad,) = torch.autograd.grad(kernel.sum(), inputs, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


class DUQClassifier(ImageClassifier):
    """DUQ: an RBF head over backbone features with EMA class centroids.

    Training minimises binary cross-entropy between the kernel values of all classes and the
    one-hot label, plus ``gp_weight`` times the two-sided gradient penalty. The model owns its
    input normalisation (``input_mean``/``input_std``): training, evaluation and
    out-of-distribution data all go through the same ``(x - mean) / std``, and the penalty is
    taken with respect to the *normalised* input, as in the reference code (which normalises
    in its datasets). After every optimizer step the centroids follow an exponential moving
    average with factor ``gamma``: ``N_c <- g N_c + (1-g) n_c``,
    ``m_c <- g m_c + (1-g) sum_{y_i=c} W_c f(x_i)``, ``e_c = m_c / N_c``.

    Prediction is ``argmax_c K_c``; certainty is ``max_c K_c``; OOD score is ``-max_c K_c``.
    ``forward`` returns ``log K`` so that softmax gives ``K / sum K``; explainers and metrics
    that need probabilities therefore see normalised kernel values.

    Initialisation. The authors' code has two recipes: the Fashion-MNIST CNN draws ``W`` from
    ``N(0, 0.05)`` and starts ``N_c = 12``, ``m = N(0, 1) * N_c`` (centroids of std 1)
    (``configs/model/duq_cnn.yaml``); the CIFAR-10 ResNet draws ``W`` Kaiming-normal and
    starts ``N_c = 13``, ``m = N(0, 0.05) * N_c`` (centroids of std 0.05). The defaults below
    are the ResNet recipe, which is also what checkpoints saved before these switches existed
    were built with.

    Args:
        backbone: Feature extractor exposing ``out_features``.
        num_classes: Number of classes.
        embedding_size: ``n``, rows of each per-class weight matrix ``W_c``.
        length_scale: Kernel length scale ``sigma``.
        gamma: Centroid EMA factor.
        gp_weight: Gradient-penalty weight ``lambda`` (0 disables the penalty).
        centroid_features: ``"recompute"`` (reference code: a second no-grad forward pass in
            eval mode after the optimizer step) or ``"reuse"`` (the training pass's features,
            taken before the step; cheaper, not the reference).
        ood_data: Optional datamodule whose test split is out-of-distribution; ``test`` then
            logs ``test/ood_auroc`` (OOD positive, score ``-max_c K_c``), normalising the OOD
            images exactly like the in-distribution ones.
        input_mean: Per-channel normalisation mean applied inside the model.
        input_std: Per-channel normalisation std applied inside the model.
        w_init_std: Std of the normal initialisation of ``W`` (reference CNN: 0.05); ``None``
            (default): Kaiming normal for ReLU features (reference ResNet).
        centroid_init_count: Initial pseudo-count ``N_c`` (reference CNN 12, ResNet 13).
        centroid_init_std: Std of the initial centroids ``e_c = m_c / N_c`` (reference CNN 1,
            ResNet 0.05).
        drop_last: Skip a training batch smaller than the largest one seen (the incomplete
            last batch of an epoch), as the reference's ``DataLoader(drop_last=True)`` does:
            no loss, no parameter or centroid update for it (Lightning still counts it in
            ``global_step``).
        optimizer: Optimizer factory.
        scheduler: Optional LR scheduler factory.
    """

    N: torch.Tensor  # buffers, registered in __init__
    m: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        embedding_size: int = 256,
        length_scale: float = 0.1,
        gamma: float = 0.999,
        gp_weight: float = 0.05,
        centroid_features: str = "recompute",
        ood_data: L.LightningDataModule | None = None,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        w_init_std: float | None = None,
        centroid_init_count: float = 13.0,
        centroid_init_std: float = 0.05,
        drop_last: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes, input_mean, input_std, optimizer, scheduler)
        self.save_hyperparameters(ignore=["ood_data"])
        if not hasattr(backbone, "out_features"):
            raise ValueError(f"backbone {type(backbone).__name__} must expose `out_features`")
        if centroid_features not in ("recompute", "reuse"):
            raise ValueError(f"centroid_features must be 'recompute' or 'reuse', got {centroid_features!r}")
        if not 0.0 < gamma < 1.0 or length_scale <= 0 or gp_weight < 0:
            raise ValueError("DUQ needs 0 < gamma < 1, length_scale > 0 and gp_weight >= 0")
        if (w_init_std is not None and w_init_std <= 0) or centroid_init_count <= 0 or centroid_init_std < 0:
            raise ValueError("DUQ needs w_init_std > 0 (or None), centroid_init_count > 0 and centroid_init_std >= 0")
        self.backbone = backbone
        self.length_scale, self.gamma, self.gp_weight = length_scale, gamma, gp_weight
        self.centroid_features = centroid_features
        self.drop_last = drop_last
        self.ood_data = ood_data
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes, cast(int, backbone.out_features)))
        if w_init_std is None:
            nn.init.kaiming_normal_(self.W, nonlinearity="relu")
        else:
            nn.init.normal_(self.W, 0.0, w_init_std)
        # m = e * N: the centroids e_c start with std centroid_init_std and N_c acts as a
        # pseudo-count so that the first EMA updates move them smoothly
        self.register_buffer("N", torch.full((num_classes,), float(centroid_init_count)))
        self.register_buffer("m", torch.randn(embedding_size, num_classes) * centroid_init_std * centroid_init_count)
        self._reuse_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._full_batch = 0  # largest training batch seen (drop_last)
        self._skipped_batch = False
        self.ood_auroc = BinaryAUROC()

    # ----------------------------------------------------------------- model API
    @property
    def centroids(self) -> torch.Tensor:
        """``e_c = m_c / N_c``, shape ``[n, C]``."""
        return self.m / self.N.unsqueeze(0)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """``W_c f`` for all classes: ``[B, n, C]``."""
        # one GEMM over the stacked class matrices (einsum picked a slow batched matmul here)
        n, c, d = self.W.shape
        return F.linear(features, self.W.reshape(n * c, d)).view(-1, n, c)

    def kernel_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return rbf_kernel(self.embed(self.backbone(x)), self.centroids, self.length_scale)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel values ``K_c(x)`` ``[B, C]`` for images in ``[0, 1]``."""
        return self.kernel_normalized(self.normalize(x))

    def certainty(self, x: torch.Tensor) -> torch.Tensor:
        """``max_c K_c(x)``: high on the data manifold, low far from it."""
        return self.kernel(x).amax(-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # the exact log-kernel: counterfactual losses on DUQ models keep their gradient even
        # for classes whose kernel value underflows
        return log_rbf_kernel(self.embed(self.backbone(x)), self.centroids, self.length_scale)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``K / sum K``, computed as a softmax of the log-kernel (stable when all K underflow)."""
        return self(x).softmax(-1)

    # ----------------------------------------------------------------- training
    @torch.no_grad()
    def update_centroids(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """EMA update of ``N`` and ``m`` from embeddings ``z`` ``[B, n, C]`` and labels ``y``."""
        onehot = F.one_hot(y, self.num_classes).to(z.dtype)
        counts, sums = onehot.sum(0), torch.einsum("bnc,bc->nc", z, onehot)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank's batch counts (DDP would otherwise keep rank 0's buffers only)
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.N.mul_(self.gamma).add_((1 - self.gamma) * counts)
        self.m.mul_(self.gamma).add_((1 - self.gamma) * sums)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        y = batch["label"]
        self._full_batch = max(self._full_batch, len(y))
        self._skipped_batch = self.drop_last and len(y) < self._full_batch
        if self._skipped_batch:
            return None  # Lightning skips backward and the optimizer step for this batch
        x = self.normalize(batch["image"])
        if self.gp_weight > 0:
            x = x.detach().requires_grad_(True)
        z = self.embed(self.backbone(x))
        k = rbf_kernel(z.float(), self.centroids, self.length_scale)
        with torch.autocast(device_type=k.device.type, enabled=False):  # BCE is not autocast-safe
            bce = F.binary_cross_entropy(k, F.one_hot(y, self.num_classes).float())
        loss = bce
        if self.gp_weight > 0:
            gp = gradient_penalty(x, k)
            loss = loss + self.gp_weight * gp
            self.log("train/gp", gp, batch_size=len(y))
        if self.centroid_features == "reuse":
            self._reuse_cache = (z.detach(), y)
        self.log("train/bce", bce, batch_size=len(y))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/acc", (k.argmax(-1) == y).float().mean(), prog_bar=True, batch_size=len(y))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        # runs after optimizer.step(): the centroid update of the reference code
        if self._skipped_batch:
            return
        if self.centroid_features == "reuse" and self._reuse_cache is not None:
            z, y = self._reuse_cache
            self._reuse_cache = None
        else:
            self.eval()
            with torch.no_grad():
                z = self.embed(self.backbone(self.normalize(batch["image"])))
            self.train()
            y = batch["label"]
        self.update_centroids(z, y)

    # ----------------------------------------------------------------- OOD evaluation
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        probs = self._eval_step(batch, self.test_metrics, "test")
        if self.ood_data is not None:
            certainty = self.certainty(batch["image"])
            self.ood_auroc.update(-certainty, torch.zeros_like(batch["label"]))
        del probs

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.ood_data is None:
            return
        self.ood_data.setup("test")
        with torch.no_grad():
            for batch in self.ood_data.test_dataloader():
                x = batch["image"].to(self.device)
                self.ood_auroc.update(-self.certainty(x), torch.ones(len(x), dtype=torch.long, device=self.device))
        self.log("test/ood_auroc", self.ood_auroc.compute(), sync_dist=True)
        self.ood_auroc.reset()
