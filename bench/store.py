"""Concept store benchmark: how small and how fast are stored masks and deltas at SD 1.5 shapes.

    python -m bench.store          # a table
    python -m bench.store --json   # the table, then one JSON object on the last line

Masks are Cones-like index sets over the 32 cross-attention K/V tensors of SD 1.5 (19,169,280
positions) at 0.5 %, 1.32 % (the paper's figure) and 5 %, with positions either uniformly random
or clustered (runs of consecutive positions along a row, mean length 8). Each row gives the coded
size, its ratio to the information limit (sum over tensors of log2 C(n, k) bits: the least any
code can average for a uniformly random set of that size; a clustered set can go below it),
int32 indices for comparison, and encode / decode times (best of 3, all 32 tensors). The CNS row
is a sparse delta at 5.8 % density: indices + fp16 values. Timings are wall-clock on whatever
machine runs this; compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import zlib
import lzma
from pathlib import Path

import numpy as np

from cones_store.codec import decode_indices, encode_indices, put_uvarint
from cones_store.records import ConceptMeta, ConceptRecord, SparseDelta
from cones_store.serialize import decode_delta, encode_delta
from cones_store.store import ConceptStore

SD15_KV_POSITIONS = 19_169_280
PAPER_INT_INDEX_BYTES_1_32PCT = 1.43e6  # Cones paper: "1.43 MB per subject as int indices"
DENSITIES = (0.005, 0.0132, 0.05)
CNS_DENSITY = 0.058
TEXT_WIDTH = 768  # CLIP ViT-L/14 width: the `in` dimension of every SD 1.x K/V projection


def sd15_kv_shapes() -> dict[str, tuple[int, int]]:
    """The 32 `attn2.to_k/to_v` weights of SD 1.5's UNet: 16 transformer blocks (2 per down
    block at 320/640/1280 channels, 1 in the middle at 1280, 3 per up block at 1280/640/320),
    each with a K and a V projection of shape (channels, 768)."""
    blocks: list[tuple[str, int]] = []
    for i, ch in enumerate((320, 640, 1280)):
        blocks += [(f"down_blocks.{i}.attentions.{j}", ch) for j in range(2)]
    blocks.append(("mid_block.attentions.0", 1280))
    for i, ch in zip((1, 2, 3), (1280, 640, 320)):
        blocks += [(f"up_blocks.{i}.attentions.{j}", ch) for j in range(3)]
    shapes = {f"{b}.transformer_blocks.0.attn2.{kv}.weight": (ch, TEXT_WIDTH)
              for b, ch in blocks for kv in ("to_k", "to_v")}
    assert len(shapes) == 32
    assert sum(c * w for c, w in shapes.values()) == SD15_KV_POSITIONS
    return shapes


def info_limit_bits(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def random_mask(rng, n: int, density: float) -> np.ndarray:
    return np.sort(rng.choice(n, round(n * density), replace=False)).astype(np.int64)


def clustered_mask(rng, n: int, density: float, row: int = TEXT_WIDTH, mean_run: int = 8):
    """Runs of consecutive positions (geometric lengths) that stay inside one row."""
    runs = max(1, round(n * density / mean_run))
    starts = rng.choice(n, runs, replace=False)
    lengths = np.minimum(rng.geometric(1 / mean_run, runs), row - starts % row)
    idx = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.unique(idx + np.arange(int(lengths.sum())))


def best_ms(fn, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def measure_mask(mask: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]]) -> dict:
    sizes = {t: shapes[t][0] * shapes[t][1] for t in shapes}
    coded = {t: encode_indices(mask[t], sizes[t]) for t in shapes}
    for t in shapes:  # the round trip is exact, or the figures mean nothing
        assert np.array_equal(decode_indices(coded[t])[0], mask[t])
    k = sum(v.size for v in mask.values())
    limit = sum(info_limit_bits(sizes[t], mask[t].size) for t in shapes) / 8
    return {
        "k": k,
        "density": k / SD15_KV_POSITIONS,
        "bytes": sum(len(b) for b in coded.values()),
        "info_limit_bytes": limit,
        "int32_bytes": 4 * k,
        "encode_ms": best_ms(lambda: [encode_indices(mask[t], sizes[t]) for t in shapes]),
        "decode_ms": best_ms(lambda: [decode_indices(coded[t]) for t in shapes]),
    }


def baselines(mask: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Other index codes for the same set, for the record: varint gaps (+ zlib / lzma) and
    Elias-Fano (size by formula: 2 + ceil(log2(n/k)) bits per position)."""
    varints = bytearray()
    ef_bits = 0
    for t, idx in mask.items():
        n = shapes[t][0] * shapes[t][1]
        for gap in np.diff(idx, prepend=-1).tolist():
            put_uvarint(varints, gap - 1)
        ef_bits += idx.size * (2 + math.ceil(math.log2(n / idx.size))) if idx.size else 0
    return {"varint": len(varints), "varint+zlib": len(zlib.compress(bytes(varints), 9)),
            "varint+lzma": len(lzma.compress(bytes(varints), preset=9)),
            "elias-fano": math.ceil(ef_bits / 8)}


def measure_delta(rng, shapes: dict[str, tuple[int, int]]) -> dict:
    deltas = {}
    for t, shape in shapes.items():
        idx = random_mask(rng, shape[0] * shape[1], CNS_DENSITY)
        deltas[t] = SparseDelta(idx, rng.standard_normal(idx.size).astype(np.float16), shape)
    coded = {t: encode_delta(d) for t, d in deltas.items()}
    k = sum(d.indices.size for d in deltas.values())
    return {"k": k, "bytes": sum(len(b) for b in coded.values()), "values_bytes": 2 * k,
            "encode_ms": best_ms(lambda: [encode_delta(d) for d in deltas.values()]),
            "decode_ms": best_ms(lambda: [decode_delta(b) for b in coded.values()])}


def measure_store(mask: dict[str, np.ndarray]) -> dict:
    """A whole Cones concept through the store: one put, one get, its size on disk."""
    record = ConceptRecord(meta=ConceptMeta(name="bench", method="cones", class_word="dog",
                                            token="sks"), masks=mask)
    with tempfile.TemporaryDirectory() as tmp, ConceptStore.open(Path(tmp) / "s") as store:
        put_ms = best_ms(lambda: store.put(record, replace=True))
        get_ms = best_ms(lambda: store.get("bench"))
        return {"put_ms": put_ms, "get_ms": get_ms, "stored_bytes": store.size_of("bench")}


def run(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = sd15_kv_shapes()
    rows = []
    for pattern, make in (("random", random_mask), ("clustered", clustered_mask)):
        for density in DENSITIES:
            mask = {t: make(rng, s[0] * s[1], density) for t, s in shapes.items()}
            rows.append({"pattern": pattern, "target": density, **measure_mask(mask, shapes)})
            if pattern == "random" and density == 0.0132:
                reference_mask = mask
    return {"rows": rows, "baselines_1_32pct": baselines(reference_mask, shapes),
            "store_1_32pct": measure_store(reference_mask), "cns": measure_delta(rng, shapes)}


def summary(result: dict) -> dict:
    ref = next(r for r in result["rows"] if r["pattern"] == "random" and r["target"] == 0.0132)
    out = {
        "mask_bytes_1_32pct": ref["bytes"],
        "mask_info_limit_bytes_1_32pct": round(ref["info_limit_bytes"]),
        "encode_ms_1_32pct": round(ref["encode_ms"], 2),
        "decode_ms_1_32pct": round(ref["decode_ms"], 2),
        "paper_int_index_bytes_1_32pct": PAPER_INT_INDEX_BYTES_1_32PCT,
        "cns_delta_bytes_5_8pct": result["cns"]["bytes"],
        "cns_delta_index_bytes_5_8pct": result["cns"]["bytes"] - result["cns"]["values_bytes"],
    }
    for r in result["rows"]:
        tag = f"{r['pattern']}_{r['target'] * 100:g}pct".replace(".", "_")
        out[f"mask_bytes_{tag}"] = r["bytes"]
        out[f"mask_ratio_to_limit_{tag}"] = round(r["bytes"] / r["info_limit_bytes"], 4)
    out.update({f"baseline_{k.replace('+', '_').replace('-', '_')}_bytes_1_32pct": v
                for k, v in result["baselines_1_32pct"].items()})
    out.update({f"store_{k}_1_32pct": round(v, 2) for k, v in result["store_1_32pct"].items()})
    return out


def print_table(result: dict) -> None:
    kb = lambda b: f"{b / 1e3:,.1f} KB"  # noqa: E731 - local formatter
    print(f"Masks over SD 1.5 K/V ({SD15_KV_POSITIONS:,} positions in 32 tensors)")
    head = ("pattern", "density", "indices", "coded", "limit", "coded/limit", "int32",
            "encode", "decode")
    print("  ".join(f"{h:>11}" for h in head))
    for r in result["rows"]:
        cells = (r["pattern"], f"{r['density'] * 100:.2f} %", f"{r['k']:,}", kb(r["bytes"]),
                 kb(r["info_limit_bytes"]), f"{r['bytes'] / r['info_limit_bytes']:.3f}",
                 kb(r["int32_bytes"]), f"{r['encode_ms']:.1f} ms", f"{r['decode_ms']:.1f} ms")
        print("  ".join(f"{c:>11}" for c in cells))
    print(f"\nPaper (Cones): {kb(PAPER_INT_INDEX_BYTES_1_32PCT)} per subject as int indices "
          "at about 1.3 %.")
    print("Other codes for the random 1.32 % set: " + ", ".join(
        f"{k} {kb(v)}" for k, v in result["baselines_1_32pct"].items()))
    s = result["store_1_32pct"]
    print(f"Through the store (random 1.32 % Cones concept): put {s['put_ms']:.1f} ms, "
          f"get {s['get_ms']:.1f} ms, {kb(s['stored_bytes'])} stored")
    c = result["cns"]
    print(f"\nCNS delta at {CNS_DENSITY * 100:.1f} % ({c['k']:,} positions, fp16 values): "
          f"{kb(c['bytes'])} = indices {kb(c['bytes'] - c['values_bytes'])} + values "
          f"{kb(c['values_bytes'])}; encode {c['encode_ms']:.1f} ms, decode {c['decode_ms']:.1f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args.seed)
    print_table(result)
    if args.json:
        print(json.dumps(summary(result)))


if __name__ == "__main__":
    main()
