"""What the paper's scale would cost: measured per-image costs times the work of the paper profile.

    python -m backfill_utils.tools.scale_cost [--docs] [--gpu-json PATH] [--out PATH]

:func:`plan` lists the work of the ``paper`` profile on each dataset of :data:`DATASETS` from the
package's own logic (``train.model_spec``, ``seeds.seeds_of``, the method registry); :func:`measure`
times on this CPU, one torch thread, CPU seconds (robust to other jobs), a training step and an
embedding pass of ResNet-18/50 at each resolution and an epoch of every compatibility method;
:func:`estimate` scales them, with the engine's seconds of ``results/bench/bench.json`` and a
``gpu_check`` JSON if given, to seconds on 2 cores and on one GPU (formulas: docs/reproducibility.md,
"What the paper's scale would cost"). Writes ``results/bench/scale.json`` atomically; ``--docs``
(or ``--readme``) rewrites the block ``SCALE`` of docs/reproducibility.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import config as C, train as TR
from .. import io
from ..backfill import registry as MM
from ..backfill.experiments import train_roles
from ..data.transforms import nominal_stats
from ..models import CosineClassifier, EmbeddingNet
from ..studies import seeds as SD
from . import blocks

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT, BENCH_JSON = (ROOT / "results" / "bench" / f for f in ("scale.json", "bench.json"))
#: The page that holds the estimate's block, and the block's name (:mod:`backfill_utils.tools.blocks`).
DOC, BLOCK = blocks.DOCS / "reproducibility.md", "SCALE"
#: The paper's datasets: registry name, images per split (train, test), CIFAR stem or not.
#: Classes and resolution come from the registry (``transforms.nominal_stats``).
DATASETS = {"CIFAR-100": ("cifar100", 50_000, 10_000, True),
            "Tiny-ImageNet": ("tinyimagenet", 100_000, 10_000, True),
            "ImageNet-1K": ("imagenet", 1_281_167, 50_000, False),
            "Places-365": ("places365", 1_803_460, 36_500, False)}
STAGES = ("backbones", "embedding", "compatibility", "evaluation")
CORES = 2


def profile_for(dataset: str, data_root: str) -> dict:
    """The paper profile on ``dataset`` (a key of :data:`DATASETS`), with its stem."""
    name, _, _, small = DATASETS[dataset]
    return C.load_profile("paper", dataset=name, data_root=data_root,
                          overrides={"backbone": {"small_stem": small}, "new_backbone": {"small_stem": small}})


def fit_images(n_train: float, classes: int, used: int, val_fraction: float) -> float:
    """Training images of ``used`` classes of mean size less ``splits.validation_mask``'s hold-out.

    >>> fit_images(50_000, 100, 50, 0.1)   # 500 per class, 50 held out of each
    22500.0
    """
    n = n_train / classes
    k = min(max(math.floor(val_fraction * n + 1e-9), 1), n - 1) if val_fraction > 0 else 0
    return used * (n - k)


def plan(cfg: dict, n_train: int, n_test: int) -> dict:
    """The jobs of each stage of profile ``cfg`` on a dataset of ``n_train`` / ``n_test`` images."""
    classes, size = nominal_stats(cfg["dataset"], {})[:2]
    fit = lambda used: fit_images(n_train, classes, used, float(cfg["val_fraction"]))  # noqa: E731
    backbones, embeds, compat, curves = {}, {}, [], []
    trainable = [m for m in MM.names() if MM.get(m).trainable]
    untrained = [m for m in MM.names() if not MM.get(m).trainable and MM.get(m).reference is None]
    for s in cfg["settings"]:
        cls = TR.setting_classes(cfg, s)
        n_fit, n_test_s = fit(len(cls["new_classes"])), n_test / classes * len(cls["test_classes"])
        for role in TR.ROLES:
            spec = TR.model_spec(cfg, s, role)
            d, arch = str(TR.model_dir(spec)), spec["model"]["arch"]  # model key: "<arch>@<stem>"
            key = f"{arch}@{'cifar' if spec['model']['small_stem'] else 'standard'}"
            backbones.setdefault(d, {"setting": s, "role": role, "model": key,
                                     "images": fit(spec["num_classes"]), "epochs": spec["recipe"]["epochs"]})
            for split, c, n in (("train", cls["new_classes"], cfg["embed"]["train_passes"] * n_fit),
                                ("test", cls["test_classes"], n_test_s)):
                if split == "test" or role in train_roles():
                    embeds.setdefault((d, split, len(c)), {"setting": s, "role": role, "split": split,
                                                           "model": key, "images": n})
        compat += [{"setting": s, "method": m, "seed": seed, "items": n_fit, "epochs": int(
            MM.get(m).default_recipe(cfg).epochs)} for seed in SD.seeds_of(cfg, s) for m in trainable]
        curves.append({"setting": s, "gallery": n_test_s, "curves": len(untrained) + len(trainable) * len(
            SD.seeds_of(cfg, s))})
    return {"classes": classes, "image_size": size, "gallery": n_test, "train_images": n_train,
            "backbones": list(backbones.values()), "embedding": list(embeds.values()),
            "compatibility": compat, "evaluation": curves}


def _timed(fn, warmup: int, iters: int, per: int) -> tuple[float, float]:
    """(CPU, wall) seconds per item of ``fn`` (``per`` items a call) after ``warmup`` calls."""
    for i in range(warmup + iters):
        if i == warmup:
            c0, w0 = time.process_time(), time.perf_counter()
        fn()
    return (time.process_time() - c0) / (iters * per), (time.perf_counter() - w0) / (iters * per)


def measure_backbone(arch: str, size: int, small_stem: bool, batch: int = 16, iters: int = 2) -> dict:
    """CPU and wall seconds per image of a training step and of an embedding pass (width 64)."""
    torch.manual_seed(0)
    net = EmbeddingNet(arch, 100, 128, 64, small_stem)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))

    def step():  # the paper recipe's step: cross-entropy with label smoothing, SGD
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x)[1], y, label_smoothing=0.1).backward()
        opt.step()

    train = _timed(step, 1, iters, batch)
    net.eval()
    with torch.no_grad():
        fwd = _timed(lambda: net.embed(x), 1, iters, batch)
    return {"train_cpu_s": train[0], "train_wall_s": train[1], "embed_cpu_s": fwd[0], "embed_wall_s": fwd[1],
            "batch": batch, "iterations": iters}


def measure_compat(cfg: dict, n: int = 4096, classes: int = 128, passes: int = 2) -> dict:
    """CPU and wall seconds per item and epoch of every trainable method (one epoch)."""
    g = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(classes), n // classes)
    emb = F.normalize(torch.randn(passes, len(labels), 128, generator=g), dim=-1).numpy()
    clf = CosineClassifier(128, classes).requires_grad_(False)  # a stand-in for SettingData:
    data, out = SimpleNamespace(labels=labels, progress=False, embeddings=lambda r: emb,  # random unit items
                                classifier=lambda r: clf), {}
    for name in (m for m in MM.names() if MM.get(m).trainable):
        m, c0, w0 = MM.get(name), time.process_time(), time.perf_counter()
        m.fit(data, m.default_recipe(cfg).replace(epochs=1, warmup_epochs=0))  # a warm-up costs nothing extra
        out[name] = {"cpu_s": (time.process_time() - c0) / n, "wall_s": (time.perf_counter() - w0) / n}
    return out


def measure(plans: dict, cfg: dict) -> dict:
    """Every (model, resolution, stem) the plans need plus ResNet-18 at 32 px, and the methods."""
    need = {(j["model"], p["image_size"]) for p in plans.values() for j in p["backbones"]} | {("resnet18@cifar", 32)}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    back = {f"{m}/{size}": measure_backbone(m.split("@")[0], size, m.endswith("@cifar"))
            for m, size in tqdm(sorted(need, key=lambda k: (k[1], k[0])), desc="measure backbones")}
    out = {"backbone": back, "compat": measure_compat(cfg)}
    torch.set_num_threads(before)
    return out


def estimate(p: dict, meas: dict, bench: dict, gpu: dict | None = None) -> dict:
    """Seconds of each stage of plan ``p``: ``{stage: {"work", "cpu_s", "gpu_s"}}`` (see the docstring);
    ``cpu_s`` on this machine's cores, ``gpu_s`` on one GPU (``None`` without ``gpu``)."""
    b = {k.split("/")[0]: v for k, v in meas["backbone"].items() if k.endswith(f"/{p['image_size']}")}
    ref, ips = meas["backbone"]["resnet18@cifar/32"]["train_cpu_s"], gpu["train"]["images_per_s"] if gpu else None
    train = sum(j["images"] * j["epochs"] * b[j["model"]]["train_cpu_s"] for j in p["backbones"])
    fwd = sum(j["images"] * b[j["model"]]["embed_cpu_s"] for j in p["embedding"])
    compat = sum(j["items"] * j["epochs"] * meas["compat"][j["method"]]["cpu_s"] for j in p["compatibility"])
    # the bench's 50,000-item case with the nearest number of relevant items per query (log scale)
    case = min(bench["large"], key=lambda c: abs(math.log(c["per_class"] * p["classes"] / p["gallery"])))
    curves = sum(c["curves"] * case["cpu_seconds"] * (c["gallery"] / case["n"]) ** 2 for c in p["evaluation"])
    g = gpu["engine"] if gpu else None
    return {"backbones": {"work": sum(j["images"] * j["epochs"] for j in p["backbones"]), "cpu_s": train / CORES,
                          "gpu_s": train / ref / ips if gpu else None},
            "embedding": {"work": sum(j["images"] for j in p["embedding"]), "cpu_s": fwd / CORES,
                          "gpu_s": fwd / ref / ips if gpu else None},
            "compatibility": {"work": sum(j["items"] * j["epochs"] for j in p["compatibility"]),
                              "cpu_s": compat / CORES, "gpu_s": None},
            "evaluation": {"work": sum(c["curves"] for c in p["evaluation"]), "cpu_s": curves / CORES,
                           "gpu_s": sum(c["curves"] * g["as_is"]["device_seconds"] * (c["gallery"] / g["gallery"]) ** 2
                                        for c in p["evaluation"]) if gpu else None, "bench_case": case["name"]}}


def human(s: float | None) -> str:
    """Seconds in the largest sensible unit.

    >>> [human(x) for x in (42, 4000, 200000, 1e7, 1e9)]
    ['42 s', '67 min', '56 h', '116 days', '31.7 years']
    """
    if s is None:
        return ""
    for unit, size, limit in (("s", 1, 120), ("min", 60, 7200), ("h", 3600, 86400 * 3), ("days", 86400, 86400 * 730)):
        if s < limit:
            return f"{s / size:.0f} {unit}"
    return f"{s / 86400 / 365.25:.1f} years"


def _work(stage: str, p: dict, e: dict) -> str:
    if stage == "backbones":
        kinds = sorted({j["model"].split("@")[0] for j in p["backbones"]})
        count = ", ".join(f"{sum(j['model'].startswith(k) for j in p['backbones'])} x {k}" for k in kinds)
        return f"{len(p['backbones'])} models ({count}): {e['work'] / 1e6:,.1f} M image-epochs"
    if stage == "embedding":
        return f"{len(p['embedding'])} (model, split) passes: {e['work'] / 1e6:,.2f} M images"
    if stage == "compatibility":
        return f"{len(p['compatibility'])} modules: {e['work'] / 1e6:,.1f} M item-epochs"
    galleries = "/".join(f"{c['gallery']:,.0f}" for c in p["evaluation"])
    return f"{e['work']} curves over galleries of {galleries}"


def render(result: dict) -> str:
    """The SCALE block of docs/reproducibility.md: the table, the machine, the load and the measured costs it rests on."""
    env, gpu, meas = result["environment"], result.get("gpu"), result["measurements"]
    rows = ["| dataset | gallery (test) | training images | stage | work | this machine, 2 cores | one GPU |",
            "|---|---:|---:|---|---|---:|---:|"]
    for name, d in result["datasets"].items():
        p, est = d["plan"], d["estimate"]
        for i, (stage, e) in enumerate((s, est[s]) for s in STAGES):
            g = human(e["gpu_s"]) or ("not timed" if gpu or stage == "compatibility" else "run `make gpu-check`")
            head = (f"{name} ({p['classes']} classes, {p['image_size']} px)", f"{p['gallery']:,}",
                    f"{p['train_images']:,}") if i == 0 else ("", "", "")
            rows.append(f"| {' | '.join(head)} | {stage} | {_work(stage, p, e)} | {human(e['cpu_s'])} | {g} |")
        g = f"**{human(sum(est[s]['gpu_s'] or 0 for s in STAGES))}** + compatibility" if gpu else ""
        rows.append(f"| | | | **total** | | **{human(sum(est[s]['cpu_s'] for s in STAGES))}** | {g} |")
    costs = "; ".join(f"{k.replace('@', ' ').replace('/', ' stem, ')} px {v['train_cpu_s']:.3f} / "
                      f"{v['embed_cpu_s']:.4f} (wall {v['train_wall_s']:.3f} / {v['embed_wall_s']:.4f})"
                      for k, v in meas["backbone"].items())
    compat = ", ".join(f"{k} {v['cpu_s'] * 1e6:.0f}" for k, v in meas["compat"].items())
    case = "\", \"".join(dict.fromkeys(d["estimate"]["evaluation"]["bench_case"] for d in result["datasets"].values()))
    genv, eng = (gpu["environment"], gpu["engine"]) if gpu else (None, None)
    gline = (f"One GPU: `gpu_check` on {genv.get('card')} (torch {genv.get('torch')}, CUDA {genv.get('cuda')}): "
             f"{gpu['train']['images_per_s']:,.0f} training images/s (ResNet-18, CIFAR stem, 32 px, batch "
             f"{gpu['train']['batch_size']}), the engine's curve over {eng['gallery']:,} items in "
             f"{eng['as_is']['device_seconds']:.2f} s.") if gpu else (
        "One GPU: **no GPU was available here**, so the column holds no number; `make gpu-check` on a GPU "
        "machine, then `make scale-cost SCALE_ARGS=\"--gpu-json results/gpu_check.json\"` fills it.")
    return "\n".join(rows) + f"""

Generated by `python -m backfill_utils.tools.scale_cost` on {env['cpu_model']} ({env['cpu_count']} CPUs), torch \
{env['torch']}, one torch thread; load average {env['load_average_start'][0]:.1f} at the start and \
{env['load_average_end'][0]:.1f} at the end (above 2: other jobs shared the CPUs; CPU seconds do not count them).

* Measured, CPU seconds per image (training step, batch 16 / embedding pass; wall seconds, which other jobs \
inflate, in brackets): {costs}.
* Measured, CPU microseconds per item and epoch of each compatibility method (one epoch, 4,096 random \
128-d items): {compat}.
* Engine: the CPU seconds of `results/bench/bench.json`'s case "{case}" (the nearest number of relevant \
items per query), scaled to each gallery.
* {gline}
"""


def write_doc_block(result: dict, path: Path | None = None) -> None:
    """Replace the block between the SCALE markers of ``path`` (default :data:`DOC`) atomically;
    the rest is unchanged."""
    blocks.write_block(DOC if path is None else path, BLOCK, lambda: render(result))


def load_gpu(path: Path) -> dict:
    """A ``gpu_check`` JSON measured on a GPU (an error naming the file otherwise)."""
    gpu = json.loads(Path(path).read_text())
    try:
        device = gpu["environment"]["device"]
        gpu["train"]["images_per_s"], gpu["engine"]["as_is"]["device_seconds"], gpu["engine"]["gallery"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a gpu_check JSON (no {err}): write one with make gpu-check") from None
    if not str(device).startswith("cuda"):
        raise ValueError(f"{path} was measured on {device!r}, not a GPU: run make gpu-check on a GPU machine")
    width = gpu.get("config", {}).get("width", 64)
    if width != 64:
        raise ValueError(f"{path} was measured with --width {width}, not the paper's ResNet-18 (64): "
                         "run make gpu-check without --width")
    return gpu


def run(gpu: dict | None = None, bench_path: Path = BENCH_JSON) -> dict:
    """Plan every dataset, measure, estimate; the JSON-able result."""
    bench = json.loads(Path(bench_path).read_text())
    env = {"cpu_model": C.cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "torch_threads": 1, "load_average_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as empty:  # no dataset files: the registry's class counts
        cfgs = {name: profile_for(name, empty) for name in DATASETS}
        plans = {name: plan(cfgs[name], *DATASETS[name][1:3]) for name in DATASETS}
    meas = measure(plans, cfgs["CIFAR-100"])
    env["load_average_end"] = list(os.getloadavg())
    datasets = {name: {"plan": p, "estimate": estimate(p, meas, bench, gpu)} for name, p in plans.items()}
    return {"environment": env, "measurements": meas, "gpu": gpu, "datasets": datasets}


def main(argv=None) -> dict:
    """The command line (module docstring); prints the block and returns the result."""
    ap = argparse.ArgumentParser(prog="python -m backfill_utils.tools.scale_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", "--readme", dest="docs", action="store_true",
                    help="rewrite the block between the SCALE markers of docs/reproducibility.md")
    ap.add_argument("--gpu-json", type=Path, help="a gpu_check JSON (make gpu-check) for the GPU column")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    result = run(load_gpu(args.gpu_json) if args.gpu_json else None, BENCH_JSON)
    io.atomic_write_json(args.out, result, indent=1)
    if args.docs:
        write_doc_block(result)
    print(render(result))
    return result


if __name__ == "__main__":
    main()
