"""FAISS IndexFlatIP on the vectors `index_bench --export DIR` wrote: exact
inner-product top-k, one probe per call (Identify's access pattern), latency
p50/p99; with --batch B also B probes in one call (FAISS's own batching). Same output format as the Rust bench.

    python scripts/bench/faiss_search.py --dir DIR --sizes 10000,100000 --k 10
"""
import argparse
import time

import faiss
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=0, help="also time this many probes in one call")
    args = ap.parse_args()
    print(f"# faiss {faiss.__version__} IndexFlatIP: k={args.k} threads={faiss.omp_get_max_threads()}")
    for n in (int(s) for s in args.sizes.split(",")):
        gallery = np.load(f"{args.dir}/gallery_{n}.npy").astype(np.float32)
        queries = np.load(f"{args.dir}/queries_{n}.npy").astype(np.float32)
        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(gallery)
        for q in queries[:2]:
            index.search(q[None, :], args.k)  # warm-up
        lat = []
        for q in queries:
            t = time.perf_counter()
            index.search(q[None, :], args.k)
            lat.append((time.perf_counter() - t) * 1e3)
        lat.sort()
        pct = lambda p: lat[round((len(lat) - 1) * p)]
        print(f"faiss n={n} p50_ms={pct(0.5):.3f} p99_ms={pct(0.99):.3f} mean_ms={sum(lat) / len(lat):.3f}")
        if args.batch > 0:
            batch = np.resize(queries, (args.batch, queries.shape[1]))
            times = []
            for _ in range(5):
                t = time.perf_counter()
                index.search(batch, args.k)
                times.append((time.perf_counter() - t) * 1e3)
            times.sort()
            print(f"faiss-batch n={n} probes={args.batch} p50_ms={times[len(times) // 2]:.3f}")


if __name__ == "__main__":
    main()
