"""The promotion gate (TFX Evaluator -> Pusher): does a new version beat the champion?

The decision is made before the version is committed and written into its manifest, with both
figures and the reason; the alias swap follows. Rules, in order:

- no champion yet: promote (the first model), and say so;
- the champion was tested on another split (another sha256 of data/manifest.parquet, or an
  unknown one): do not promote, the figures are not comparable;
- a candidate below `min_value` on `metric` (an absolute floor, as TFX's value thresholds) is never
  promoted, the first model included;
- otherwise, with `rule="better"`, promote only if the candidate is strictly better on `metric`
  (read from the `test` group of metrics.json; `loss`-like metrics are better when lower) by at
  least `min_improvement`;
- with `rule="paired_bootstrap"`, compare the two models image by image on the same test images
  (their `predictions.parquet`, matched by image sha256): promote only if the lower bound of the
  95% interval of (candidate - champion) top-1, over a seeded paired bootstrap, is above
  `min_improvement`, and, with `max_class_drop`, no class's accuracy drops by more than it.
"""

from __future__ import annotations

import numpy as np

from resnet_pipeline.registry.storage import RegistryError

LOWER_IS_BETTER = ("loss",)
RULES = ("better", "paired_bootstrap")


def higher_is_better(metric: str) -> bool:
    return not any(metric == m or metric.endswith("_" + m) for m in LOWER_IS_BETTER)


def test_metric(metrics: dict, metric: str, what: str) -> float | None:
    """`metrics["test"][metric]` as a number, None when absent."""
    value = (metrics.get("test") or {}).get(metric)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RegistryError(f"{what}: test metric {metric!r} is {value!r}, not a number")
    return float(value)


PREDICTIONS = "predictions.parquet"  # written by the evaluate stage: sha256, label, predicted, correct, ...


def read_predictions(path) -> dict:
    """The columns of a predictions.parquet the gate needs, checked; errors name the file."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:
        raise RegistryError(f"{path}: not a predictions Parquet file ({err})") from None
    needed = {"sha256", "label", "correct"}
    if not needed <= set(table.column_names):
        raise RegistryError(f"{path}: columns {sorted(table.column_names)}; expected at least {sorted(needed)}")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in sorted(needed)}


def paired(candidate: dict, champion: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate correct, champion correct, labels) on the images both were tested on, matched by
    sha256 (exact duplicates share a split and a label, so the first row of each sha256 is kept)."""

    def index(rows: dict) -> dict:
        out: dict[str, tuple[int, bool]] = {}
        for sha, label, correct in zip(rows["sha256"], rows["label"], rows["correct"]):
            out.setdefault(sha, (int(label), bool(correct)))
        return out

    mine, theirs = index(candidate), index(champion)
    common = sorted(set(mine) & set(theirs))
    if not common or len(common) < len(mine):
        raise RegistryError(
            f"gate: the candidate's and the champion's predictions share {len(common)} of the "
            f"candidate's {len(mine)} test images; not the same test split"
        )
    return (
        np.array([mine[k][1] for k in common]),
        np.array([theirs[k][1] for k in common]),
        np.array([mine[k][0] for k in common]),
    )


def paired_bootstrap(cand: np.ndarray, champ: np.ndarray, *, samples: int = 2000, seed: int = 0) -> dict:
    """Mean and 95% interval of (candidate - champion) accuracy over a seeded paired bootstrap."""
    diff = cand.astype(np.float64) - champ.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(samples)])
    low, high = np.quantile(means, [0.025, 0.975])
    return {
        "images": int(len(diff)),
        "mean": round(float(diff.mean()), 6),
        "low": round(float(low), 6),
        "high": round(float(high), 6),
        "samples": samples,
        "seed": seed,
    }


def class_drops(cand: np.ndarray, champ: np.ndarray, labels: np.ndarray, classes: list[str] | None) -> dict:
    """Per class: champion accuracy minus candidate accuracy on that class's test images."""
    out = {}
    for label in sorted(set(labels.tolist())):
        mask = labels == label
        name = classes[label] if classes and 0 <= label < len(classes) else str(label)
        out[name] = round(float(champ[mask].mean() - cand[mask].mean()), 6)
    return out


def compare_figures(candidate: dict, champion: dict) -> dict:
    """`{name: {"champion", "candidate", "delta"}}` (delta = candidate - champion) for every test figure
    both have as a number, the example count aside."""

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return {
        name: {"champion": champion[name], "candidate": mine, "delta": round(mine - champion[name], 6)}
        for name, mine in candidate.items()
        if name != "examples" and number(mine) and number(champion.get(name))
    }


def decide(
    metrics: dict,
    manifest_sha256: str | None,
    champion: dict | None,
    *,
    alias: str = "champion",
    metric: str = "top1",
    min_improvement: float = 0.0,
    min_value: float | None = None,
    rule: str = "better",
    predictions: tuple[dict, dict] | None = None,
    max_class_drop: float | None = None,
    classes: list[str] | None = None,
    bootstrap_samples: int = 2000,
    bootstrap_seed: int = 0,
) -> dict:
    """The gate's decision for a candidate with `metrics` (its metrics.json) tested on the split of
    `manifest_sha256`, against `champion` (the champion version's manifest, or None). With
    `rule="paired_bootstrap"`, `predictions` is (candidate's, champion's) per-image predictions.
    Beside the verdict, `figures` compares every test figure both have (None without a champion)."""
    if rule not in RULES:
        raise RegistryError(f"register.gate: received {rule!r}; allowed: {', '.join(RULES)}")
    candidate = test_metric(metrics, metric, "metrics.json of the new version")
    if candidate is None:
        raise RegistryError(
            f"metrics.json: no test metric {metric!r} (register.gate_metric); "
            f"test metrics: {sorted(metrics.get('test') or {})}"
        )
    better_high = higher_is_better(metric)
    decision = {
        "alias": alias,
        "rule": rule,
        "metric": metric,
        "higher_is_better": better_high,
        "min_improvement": min_improvement,
        "min_value": min_value,
        "candidate": candidate,
        "candidate_manifest_sha256": manifest_sha256,
        "champion": None,
        "champion_version": None,
        "champion_manifest_sha256": None,
        "improvement": None,
        "figures": None,
    }
    if min_value is not None and (candidate < min_value if better_high else candidate > min_value):
        return {
            **decision,
            "promote": False,
            "reason": f"test {metric} {candidate:.6g} is {'below' if better_high else 'above'} register.min_value "
            f"{min_value:g}: registered, not promoted",
        }
    if champion is None:
        return {**decision, "promote": True, "reason": f"no {alias} yet: the first model is promoted"}
    theirs_sha = (champion.get("data") or {}).get("manifest_sha256")
    theirs = test_metric(champion.get("metrics") or {}, metric, f"version {champion.get('version')}")
    decision.update(
        champion=theirs,
        champion_version=champion.get("version"),
        champion_manifest_sha256=theirs_sha,
        figures=compare_figures(metrics.get("test") or {}, (champion.get("metrics") or {}).get("test") or {}),
    )
    if manifest_sha256 is None or theirs_sha != manifest_sha256:
        why = (
            "the test split is unknown (no data/manifest.parquet hash)"
            if manifest_sha256 is None or theirs_sha is None
            else f"tested on another split (manifest sha256 {manifest_sha256[:12]} vs {theirs_sha[:12]})"
        )
        return {
            **decision,
            "promote": False,
            "reason": f"not comparable with {alias} version {champion.get('version')}: {why}",
        }
    if theirs is None:
        return {
            **decision,
            "promote": False,
            "reason": f"{alias} version {champion.get('version')} has no test metric {metric!r} to compare with",
        }
    improvement = candidate - theirs if better_high else theirs - candidate
    decision["improvement"] = round(improvement, 12)
    if rule == "paired_bootstrap":
        return _paired_decision(
            decision,
            predictions,
            min_improvement,
            max_class_drop,
            classes,
            bootstrap_samples,
            bootstrap_seed,
            alias,
            champion.get("version"),
        )
    promote = improvement > 0 and improvement >= min_improvement
    relation = "beats" if promote else "does not beat"
    return {
        **decision,
        "promote": promote,
        "reason": f"test {metric} {candidate:.6g} {relation} {alias} version {champion.get('version')}'s "
        f"{theirs:.6g} by at least {min_improvement:g} ({'higher' if better_high else 'lower'} is better; "
        f"improvement {improvement:+.6g})",
    }


def _paired_decision(
    decision: dict,
    predictions: tuple[dict, dict] | None,
    min_improvement: float,
    max_class_drop: float | None,
    classes: list[str] | None,
    samples: int,
    seed: int,
    alias: str,
    version,
) -> dict:
    if predictions is None:
        return {
            **decision,
            "promote": False,
            "reason": f"{alias} version {version} has no per-image predictions (predictions.parquet) for the "
            "paired bootstrap; not promoted",
        }
    cand, champ, labels = paired(*predictions)
    interval = paired_bootstrap(cand, champ, samples=samples, seed=seed)
    drops = class_drops(cand, champ, labels, classes)
    decision.update(paired_bootstrap=interval, class_drops=drops, max_class_drop=max_class_drop)
    worst = max(drops, key=lambda c: drops[c]) if drops else None
    where = (
        f"the 95% interval of top-1 (candidate - {alias} version {version}) over {interval['images']} paired "
        f"test images is [{interval['low']:+.4f}, {interval['high']:+.4f}] (mean {interval['mean']:+.4f})"
    )
    if interval["low"] <= min_improvement:
        return {**decision, "promote": False, "reason": f"{where}; its lower bound is not above {min_improvement:g}"}
    if max_class_drop is not None and worst is not None and drops[worst] > max_class_drop:
        return {
            **decision,
            "promote": False,
            "reason": f"{where}, but class {worst!r} drops by {drops[worst]:.4f}, more than "
            f"register.max_class_drop {max_class_drop:g}",
        }
    return {**decision, "promote": True, "reason": f"{where}; its lower bound is above {min_improvement:g}"}


def describe(decision: dict) -> str:
    """One line for the register command's output."""
    verdict = f"promoted to {decision['alias']}" if decision["promote"] else f"not promoted to {decision['alias']}"
    return f"{verdict}: {decision['reason']}"
