"""How a pipeline's layers are cut into stages: contiguous parts, given as boundaries.

    parts = [0, 5, 9]      stage s runs layers parts[s] .. parts[s+1]-1  (9 layers on 2 stages)

Three methods, DeepSpeed's names (`PipelineModule(partition_method=...)`):
    "uniform"       the same number of layers per stage; the L mod P leftover layers go to the
                    first stages:  parts[s] = s*floor(L/P) + min(s, L mod P)
    "parameters"    balance the trainable-parameter count per stage (each tied occurrence counted)
    "type:REGEX"    balance the number of layers whose class name matches REGEX (case-insensitive)

Balancing is the linear partition problem: choose P-1 cut points so that the heaviest part,
    max_s sum_{i in part s} w_i,
is as small as possible (the slowest stage sets the pipeline's pace). Solved exactly by dynamic
programming over prefix sums, O(P L^2); ties are broken towards the smallest spread (max - min),
as DeepSpeed's `partition_balanced` does.
"""
from __future__ import annotations

import re


def partition_uniform(num_items: int, num_parts: int) -> list:
    """[0, ..., num_items]: num_parts contiguous parts, the leftover items on the first parts."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    size, leftover = divmod(num_items, num_parts)
    return [p * size + min(p, leftover) for p in range(num_parts + 1)]


def partition_balanced(weights: list, num_parts: int) -> list:
    """Boundaries of num_parts contiguous parts minimising the heaviest part (then the spread)."""
    n = len(weights)
    if n <= num_parts:
        return partition_uniform(n, num_parts)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = (float("inf"), float("inf"))
    # best[j][i] = (heaviest, lightest) of the best split of items 0..i-1 into j parts; cut[j][i] its last cut
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = (0, float("inf"))
    for j in range(1, num_parts + 1):
        for i in range(j, n + 1):
            for k in range(j - 1, i):
                heavy, light = best[j - 1][k]
                if heavy == float("inf"):
                    continue
                part = prefix[i] - prefix[k]
                cand = (max(heavy, part), min(light, part))
                if (cand[0], cand[0] - cand[1]) <= (best[j][i][0], best[j][i][0] - best[j][i][1]):
                    best[j][i], cut[j][i] = cand, k
    parts, i = [n], n
    for j in range(num_parts, 0, -1):
        i = cut[j][i]
        parts.append(i)
    return parts[::-1]


def layer_weights(method: str, specs: list, count_params, class_name) -> list:
    """One weight per layer for a balancing method ("parameters" or "type:REGEX")."""
    if method == "parameters":
        return [count_params(spec) for spec in specs]
    if method.startswith("type:"):
        pattern = re.compile(method[len("type:"):], re.IGNORECASE)
        return [1 if pattern.search(class_name(spec)) else 0 for spec in specs]
    raise ValueError(f"partition_method {method!r}: use 'parameters', 'uniform' or 'type:REGEX' "
                     f"(e.g. 'type:Block')")


def partition_layers(method: str, specs: list, num_parts: int, count_params, class_name) -> list:
    method_lower = method.lower()
    if method_lower == "uniform":
        return partition_uniform(len(specs), num_parts)
    if method_lower.startswith("type:"):
        method_lower = method  # the regex keeps its case; matching ignores it
    weights = layer_weights(method_lower, specs, count_params, class_name)
    if method_lower.startswith("type:") and sum(weights) == 0:
        raise ValueError(f"partition_method {method!r}: no layer's class name matches")
    return partition_balanced(weights, num_parts)
