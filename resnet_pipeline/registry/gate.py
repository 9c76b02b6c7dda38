"""The promotion gate (TFX Evaluator -> Pusher): does a new version beat the champion?

The decision is made before the version is committed and written into its manifest, with both
figures and the reason; the alias swap follows. Rules, in order:

- no champion yet: promote (the first model), and say so;
- the champion was tested on another split (another sha256 of data/manifest.parquet, or an
  unknown one): do not promote, the figures are not comparable;
- otherwise promote only if the candidate is strictly better on `metric` (read from the `test`
  group of metrics.json; `loss`-like metrics are better when lower) by at least `min_improvement`.
"""

from __future__ import annotations

from resnet_pipeline.registry.storage import RegistryError

LOWER_IS_BETTER = ("loss",)


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


def decide(metrics: dict, manifest_sha256: str | None, champion: dict | None, *, alias: str = "champion",
           metric: str = "top1", min_improvement: float = 0.0) -> dict:
    """The gate's decision for a candidate with `metrics` (its metrics.json) tested on the split of
    `manifest_sha256`, against `champion` (the champion version's manifest, or None)."""
    candidate = test_metric(metrics, metric, "metrics.json of the new version")
    if candidate is None:
        raise RegistryError(f"metrics.json: no test metric {metric!r} (register.gate_metric); "
                            f"test metrics: {sorted((metrics.get('test') or {}))}")
    better_high = higher_is_better(metric)
    decision = {"alias": alias, "metric": metric, "higher_is_better": better_high, "min_improvement": min_improvement,
                "candidate": candidate, "candidate_manifest_sha256": manifest_sha256,
                "champion": None, "champion_version": None, "champion_manifest_sha256": None, "improvement": None}
    if champion is None:
        return {**decision, "promote": True, "reason": f"no {alias} yet: the first model is promoted"}
    theirs_sha = (champion.get("data") or {}).get("manifest_sha256")
    theirs = test_metric(champion.get("metrics") or {}, metric, f"version {champion.get('version')}")
    decision.update(champion=theirs, champion_version=champion.get("version"), champion_manifest_sha256=theirs_sha)
    if manifest_sha256 is None or theirs_sha != manifest_sha256:
        why = ("the test split is unknown (no data/manifest.parquet hash)" if manifest_sha256 is None or theirs_sha is None
               else f"tested on another split (manifest sha256 {manifest_sha256[:12]} vs {theirs_sha[:12]})")
        return {**decision, "promote": False,
                "reason": f"not comparable with {alias} version {champion.get('version')}: {why}"}
    if theirs is None:
        return {**decision, "promote": False,
                "reason": f"{alias} version {champion.get('version')} has no test metric {metric!r} to compare with"}
    improvement = candidate - theirs if better_high else theirs - candidate
    decision["improvement"] = round(improvement, 12)
    promote = improvement > 0 and improvement >= min_improvement
    relation = "beats" if promote else "does not beat"
    return {**decision, "promote": promote,
            "reason": f"test {metric} {candidate:.6g} {relation} {alias} version {champion.get('version')}'s "
                      f"{theirs:.6g} by at least {min_improvement:g} ({'higher' if better_high else 'lower'} is better; "
                      f"improvement {improvement:+.6g})"}


def describe(decision: dict) -> str:
    """One line for the register command's output."""
    verdict = f"promoted to {decision['alias']}" if decision["promote"] else f"not promoted to {decision['alias']}"
    return f"{verdict}: {decision['reason']}"
