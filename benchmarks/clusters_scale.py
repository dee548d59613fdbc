"""How prompt clustering scales: synthetic corpora of N prompts in tasks with shared circuitry, timed phase by phase.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.clusters_scale --prompts 1000 10000

Each prompt uses its task's 20 core features and 10 of its 40 variable ones, plus 10 from a pool of 5,000 shared by
all (random influences); tasks have 100 prompts. Printed per N: the candidate pairs LSH proposes against all
N(N-1)/2 pairs, the time of each phase (vectors, MinHash signatures + buckets, cosines of the candidates, DBSCAN),
peak RSS, and how well the tasks are recovered (adjusted Rand index; unclustered prompts count as singletons).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def corpus(n: int, seed: int = 0) -> tuple[dict[str, dict[str, float]], list[int]]:
    rng = np.random.default_rng(seed)
    weights, tasks = {}, []
    for i in range(n):
        task = i // 100
        own = np.concatenate([np.arange(20), 20 + rng.choice(40, 10, replace=False)])
        shared = rng.choice(5000, 10, replace=False)
        w = {f"tc/{task}/{j}": float(rng.uniform(0.2, 1.0)) for j in own}
        w.update({f"tc/pool/{j}": float(rng.uniform(0.05, 0.5)) for j in shared})
        weights[f"p{i:06d}"] = w
        tasks.append(task)
    return weights, tasks


def main() -> None:
    from sklearn.metrics import adjusted_rand_score

    from atlas.analysis.clusters import cluster_labels, minhash_candidates, neighbour_graph, prompt_vectors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    for n in args.prompts:
        weights, tasks = corpus(n)
        t0 = time.perf_counter()
        vectors = prompt_vectors(weights)
        t1 = time.perf_counter()
        matrix = vectors.matrix
        sigs = []
        for i in range(n):
            row = matrix.getrow(i)  # type: ignore[attr-defined]
            sigs.append(row.indices[(-row.data).argsort(kind="stable")[:32]].tolist())
        pairs = minhash_candidates(sigs)
        t2 = time.perf_counter()
        graph = neighbour_graph(vectors, pairs, 15)
        t3 = time.perf_counter()
        labels = cluster_labels(graph, eps=0.5)
        t4 = time.perf_counter()
        singletons = np.where(labels < 0, -1 - np.arange(n), labels)
        ari = adjusted_rand_score(tasks, singletons)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"N {n:>6}: candidate pairs {len(pairs):>10,} of {n * (n - 1) // 2:>12,} "
            f"({len(pairs) / max(n * (n - 1) // 2, 1):.2%}); vectors {t1 - t0:.1f}s, MinHash {t2 - t1:.1f}s, "
            f"cosines {t3 - t2:.1f}s, DBSCAN {t4 - t3:.2f}s; {int(labels.max()) + 1} clusters, "
            f"{int((labels < 0).sum())} unclustered, ARI {ari:.3f}; peak RSS {peak:.0f} MiB"
        )


if __name__ == "__main__":
    main()
