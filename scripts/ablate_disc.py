"""DISC ablation: ISO -> + feature preservation -> + DIP / + INR -> + manifold consistency -> + progressive.

Trains (with `lit-cf fit`) the explained classifier, an auxiliary DUQ model for manifold
consistency and an oracle; explains the same test queries towards the same targets with every
link of the chain (`lit-cf explain`, configs/explain/disc.yaml with switches); scores all runs
together with `lit-cf evaluate` (oracle agreement, fid_domain on the oracle's features, DUQ
certainty) and adds two numbers evaluate does not know:

* ``loc``: the localisation score, the share of the difference-map mass ``|x' - x|`` (summed
  over channels) inside the relevant region. CelebA Smiling/Young: the mouth box of the aligned
  64 px crop (rows 0.62-0.86, columns 0.28-0.72 of the image; the official aligned faces put
  the mouth corners near (73, 152) and (108, 152) of 178x218, i.e. rows ~0.74, columns
  0.41-0.61 after the 178x178 centre crop). MNIST: pixels within 2 px of the query's strokes
  (ink > 0.2), i.e. edits of the digit rather than of the background.
* ``s/cf``: seconds per counterfactual from the run manifests (prior fit included).

**Matched validity.** Links that preserve features can leave some queries short of the target
(the feature term holds them back), and a run's realism scores then average over a different
set of images than ISO's. The second table ("matched") therefore recomputes L1, L2,
``fid_domain`` (oracle features, queries as the real set, as ``lit-cf evaluate`` does), DUQ
certainty, OTA and ``loc`` on the queries that *every* link turned into a valid counterfactual
(classifier predicts the target), with the same metric classes evaluate uses.

Models are kept in ``--models`` and reused when present, so a second call (e.g. with more
queries) trains nothing. Usage::

    bash scripts/prepare_data.sh ../shared/data data
    python scripts/ablate_disc.py --data mnist --root data --out runs/ablate-mnist --queries 64
    python scripts/ablate_disc.py --data celeba --root data --out runs/ablate-celeba --queries 32 --attribute Smiling \
        --epochs 3 --duq-epochs 2 --feature-weight 10

The feature weight's scale follows the classifier's activations (``feature_distance: mse``):
30 matters on the MNIST CNN, while on the CelebA CNN it held back 31% (Smiling) and 69% (Young)
of 16 queries; 10 left every Smiling query valid, Young needed 3 (32 queries: all ISO/iso+fp/INR
and 31 of 32 DIP counterfactuals valid). ``--feature-distance relative_mse`` makes
the term scale-free.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
C = ROOT / "configs"

# the chain: name -> DISC switches (on top of configs/explain/disc.yaml)
CHAIN = {
    "iso": {"prior": "pixels", "feature_weight": 0, "mc_weight": 0, "progressive": "false"},
    "iso+fp": {"prior": "pixels", "mc_weight": 0, "progressive": "false"},
    "dip+fp": {"prior": "dip", "mc_weight": 0, "progressive": "false"},
    "inr+fp": {"prior": "inr", "mc_weight": 0, "progressive": "false"},
    "dip+fp+mc": {"prior": "dip", "progressive": "false"},
    "dip+fp+mc+prog": {"prior": "dip", "progressive": "true"},
}


def lit_cf(*args: str) -> None:
    print("$ lit-cf " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lit_cf", *args], check=True)


def data_args(args: argparse.Namespace) -> list[str]:
    if args.data == "mnist":
        return [f"--config={C / 'data/mnist.yaml'}", f"--data.init_args.root={args.root}"]
    return [
        f"--config={C / 'data/celeba.yaml'}",
        f"--data.init_args.root={args.root}",
        f"--data.init_args.target_attribute={args.attribute}",
    ]


def model_specs(args: argparse.Namespace) -> dict[str, tuple[list[str], int, int]]:
    """name -> (config args, epochs, seed)."""
    if args.data == "mnist":
        small_duq = [
            f"--config={C / 'model/duq_cnn.yaml'}",
            "--model.init_args.backbone.init_args.channels=[32,64,64]",
            "--model.init_args.backbone.init_args.hidden=128",
            "--model.init_args.embedding_size=128",
        ]
        return {
            "classifier": ([f"--config={C / 'model/cnn.yaml'}"], args.epochs, 0),
            "duq": (small_duq, args.duq_epochs, 0),
            "oracle": ([f"--config={C / 'model/cnn_wide.yaml'}"], args.epochs, 2),
        }
    return {
        "classifier": ([f"--config={C / 'model/cnn_celeba.yaml'}"], args.epochs, 0),
        "duq": ([f"--config={C / 'model/duq_cnn_celeba.yaml'}"], args.duq_epochs, 0),
        "oracle": ([f"--config={C / 'model/cnn_celeba.yaml'}"], args.epochs, 1),
    }


def train_models(args: argparse.Namespace) -> dict[str, Path]:
    ckpt = {}
    for name, (cfg, epochs, seed) in model_specs(args).items():
        folder = Path(args.models) / name
        if not (folder / "last.ckpt").exists():
            limit = [f"--data.init_args.limit={args.train_limit}"] if args.train_limit else []
            lit_cf(
                "fit",
                *data_args(args),
                *cfg,
                *limit,
                "--trainer.logger=false",
                f"--trainer.accelerator={args.accelerator}",
                "--sample_grid.num_samples=0",
                f"--seed_everything={seed}",
                f"--trainer.max_epochs={epochs}",
                f"--trainer.default_root_dir={folder}",
                "--trainer.callbacks+=ModelCheckpoint",
                f"--trainer.callbacks.dirpath={folder}",
                "--trainer.callbacks.filename=last",
                "--trainer.enable_progress_bar=false",
            )
        ckpt[name] = folder / "last.ckpt"
    return ckpt


def region_mask(args: argparse.Namespace, query):
    """``[N, 1, H, W]`` boolean mask of the relevant region per query (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = query.shape
    if args.data == "celeba":
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
        mask[:, :, int(0.62 * h) : int(0.86 * h), int(0.28 * w) : int(0.72 * w)] = True
        return mask
    ink = (query > 0.2).float()
    return F.max_pool2d(ink, 5, stride=1, padding=2) > 0


def localisation(args: argparse.Namespace, query, cf) -> float:
    """Mean over queries of the share of the difference mass inside the relevant region."""
    diff = (cf - query).abs().sum(1, keepdim=True)
    inside = (diff * region_mask(args, query)).flatten(1).sum(1)
    return float((inside / diff.flatten(1).sum(1).clamp_min(1e-12)).mean())


def run_localisation(args: argparse.Namespace, run_dir: Path) -> float:
    from lit_cf.explainers import ExplainRun

    run = ExplainRun(run_dir)
    return localisation(args, run.tensor("query").float(), run.tensor("counterfactual").float())


def matched_table(args: argparse.Namespace, ckpt: dict[str, Path], names: list[str], runs: list[str]) -> tuple[int, list[dict]]:
    """Metrics on the queries valid for every link (see "Matched validity" in the module docstring)."""
    import torch

    from lit_cf.explainers import ExplainRun
    from lit_cf.metrics.features import ClassifierFeatures
    from lit_cf.metrics.realism import DomainFID, DUQCertainty
    from lit_cf.models.base import ImageClassifier, freeze
    from lit_cf.models.duq import DUQClassifier
    from lit_cf.utils.checkpoint import load_module

    loaded = [ExplainRun(r) for r in runs]
    keys = [[(m["index"], m["target"]) for m in run.manifest] for run in loaded]
    if any(k != keys[0] for k in keys):
        sys.exit("ablate_disc: the links explained different queries or targets; cannot match them")
    valid = torch.ones(len(keys[0]), dtype=torch.bool)
    for run in loaded:
        valid &= torch.tensor([m["final_pred"] == m["target"] for m in run.manifest])
    oracle = freeze(load_module(ckpt["oracle"], ImageClassifier))
    duq = freeze(load_module(ckpt["duq"], DUQClassifier))
    target = torch.tensor([t for _, t in keys[0]])[valid]
    rows = []
    for name, run in zip(names, loaded):
        q, cf = run.tensor("query").float()[valid], run.tensor("counterfactual").float()[valid]
        row: dict = {"link": name, "n": int(valid.sum())}
        if len(q):
            delta = (cf - q).flatten(1)
            fid, cert = DomainFID(ClassifierFeatures(oracle)), DUQCertainty(duq)
            with torch.no_grad():
                fid.update(q, real=True)
                fid.update(cf, real=False)
                cert.update(cf, q)
                ota = (oracle(cf).argmax(-1) == target).float().mean()
            row.update(
                {
                    "l1_mean": float(delta.abs().sum(1).mean()),
                    "l2_mean": float(delta.norm(dim=1).mean()),
                    "fid_domain": float(fid.compute()["fid_domain"]),
                    "duq_certainty_cf_mean": float(cert.compute()["duq_certainty_cf_mean"]),
                    "ota_oracle": float(ota),
                    "loc": localisation(args, q, cf),
                }
            )
        rows.append(row)
    return int(valid.sum()), rows


def main() -> None:
    parser = argparse.ArgumentParser(description="DISC ablation chain")
    parser.add_argument("--data", choices=["mnist", "celeba"], default="mnist")
    parser.add_argument("--root", default="data", help="data root (MNIST/ or celeba/ inside)")
    parser.add_argument("--attribute", default="Smiling", help="CelebA target attribute")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--models", default=None, help="folder of trained models, reused when present (default: OUT/models)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--duq-epochs", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=None, help="train the models on the first N images only")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="DISC steps per stage")
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--feature-weight", type=float, default=30.0)
    parser.add_argument("--feature-distance", choices=["mse", "relative_mse", "cosine"], default="mse")
    parser.add_argument("--dip-channels", type=int, default=16)
    parser.add_argument("--fit-psnr", type=float, default=30.0)
    parser.add_argument("--mc-weight", type=float, default=0.1)
    parser.add_argument("--links", default=",".join(CHAIN), help="comma-separated subset of the chain")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"ablate_disc: {out} exists; choose a new --out (models can be reused with --models)")
    links = [x for x in args.links.split(",") if x]
    unknown = [x for x in links if x not in CHAIN]
    if unknown:
        sys.exit(f"ablate_disc: unknown links {unknown}; choose from {list(CHAIN)}")
    args.models = args.models or str(out / "models")
    ckpt = train_models(args)

    runs, names, seconds, psnr = [], [], {}, {}
    for name in links:
        run = out / "explain" / name.replace("+", "_")
        switches = {
            "feature_weight": args.feature_weight,
            "feature_distance": args.feature_distance,
            "mc_weight": args.mc_weight,
            **CHAIN[name],
        }
        lit_cf(
            "explain",
            *data_args(args),
            f"--config={C / 'explain/disc.yaml'}",
            "--trainer.logger=false",
            f"--trainer.accelerator={args.accelerator}",
            f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false",
            f"--classifier={ckpt['classifier']}",
            f"--output_dir={run}",
            f"--num_queries={args.queries}",
            f"--chunk_size={args.chunk_size}",
            f"--seed={args.seed}",
            f"--model.init_args.duq={ckpt['duq']}",
            f"--model.init_args.steps={args.steps}",
            f"--model.init_args.fit_steps={args.fit_steps}",
            f"--model.init_args.dip_channels={args.dip_channels}",
            f"--model.init_args.fit_psnr={args.fit_psnr}",
            *[f"--model.init_args.{k}={v}" for k, v in switches.items()],
        )
        rows = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
        seconds[name] = sum(r["seconds"] for r in rows) / len(rows)
        psnr[name] = sum(r["prior_psnr"] for r in rows) / len(rows)
        runs.append(str(run))
        names.append(name)
    lit_cf(
        "evaluate",
        *data_args(args),
        "--trainer.logger=false",
        f"--trainer.accelerator={args.accelerator}",
        f"--runs=[{','.join(runs)}]",
        f"--names=[{','.join(names)}]",
        f"--output_dir={out / 'evaluate'}",
        f"--oracles={{oracle: {ckpt['oracle']}}}",
        f"--feature_network={ckpt['oracle']}",
        f"--duq={ckpt['duq']}",
    )
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())["runs"]
    cols = ["flip_rate", "l1_mean", "l2_mean", "fid_domain", "duq_certainty_cf_mean", "ota_oracle"]
    table = []
    for name, run in zip(names, runs):
        o = metrics[name]["overall"]
        table.append(
            {
                "link": name,
                **{c: o.get(c, float("nan")) for c in cols},
                "loc": run_localisation(args, Path(run)),
                "prior_psnr": psnr[name],
                "s_per_cf": seconds[name],
            }
        )
    header = ["link", "validity", "L1", "L2", "fid_domain", "DUQ cert", "OTA", "loc", "PSNR", "s/cf"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        vals = [
            r["flip_rate"],
            r["l1_mean"],
            r["l2_mean"],
            r["fid_domain"],
            r["duq_certainty_cf_mean"],
            r["ota_oracle"],
            r["loc"],
            r["prior_psnr"],
            r["s_per_cf"],
        ]
        lines.append(f"| {r['link']} | " + " | ".join(f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}" for v in vals) + " |")
    n_matched, matched = matched_table(args, ckpt, names, runs)
    header = ["link", "n", "L1", "L2", "fid_domain", "DUQ cert", "OTA", "loc"]
    mlines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in matched:
        vals = [
            r.get(k, float("nan")) for k in ("l1_mean", "l2_mean", "fid_domain", "duq_certainty_cf_mean", "ota_oracle", "loc")
        ]
        mlines.append(
            f"| {r['link']} | {r['n']} | " + " | ".join(f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}" for v in vals) + " |"
        )
    md = "\n".join(lines) + f"\n\nmatched: the {n_matched} queries valid for every link\n" + "\n".join(mlines)
    (out / "ablation.json").write_text(
        json.dumps({"args": vars(args), "table": table, "matched": matched, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2)
    )
    (out / "ablation.md").write_text(md + "\n")
    print(
        f"\nDISC ablation ({args.data}{', ' + args.attribute if args.data == 'celeba' else ''}; "
        f"{args.queries} queries, target most_likely_other)\n{md}\nreport: {out / 'evaluate' / 'report.html'}"
    )


if __name__ == "__main__":
    main()
