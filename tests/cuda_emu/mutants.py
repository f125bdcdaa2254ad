"""Do the emulated CUDA tests catch broken kernels? Each mutant is one plausible bug in
csrc/cka_cuda.cu (an index, a bound, a weight, a missing barrier); every one must make
tests/test_cka_cuda_emulated.py fail (a read past a buffer's end may need its AddressSanitizer run). The source tree is not touched: each mutant is written to a
temporary file and built through DEPTHFAST_EMU_CU into its own build directory.

    python tests/cuda_emu/mutants.py            # all mutants, ≈ 3–4 min on 2 cores
    python tests/cuda_emu/mutants.py tile_pair  # some of them

Exit status 1 if any mutant survives (or no longer applies to the source).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# name: (text in cka_cuda.cu, replacement)
MUTANTS = {
    "tile_pair_decode": ("  J = I + p;", "  J = p;"),
    "offdiag_diagonal_in_every_tile": ("if (I == J && r == cc) continue;", "if (r == cc) continue;"),
    "offdiag_off_tile_weight": ("I == J ? 1.0 : 2.0);", "1.0);"),
    "mask_ignored": ("const bool keep = mask == nullptr || mask[r] != 0.f;", "const bool keep = true;"),
    "row_stride_ignored": ("to_f32<Tin>(x[r * ld + col])", "to_f32<Tin>(x[r * d + col])"),
    "layer_chunk_offset": ("static_cast<int>(l0));", "0);"),
    "row_norm_shuffle_offsets": ("for (int off = 16; off > 0; off /= 2) row_part",
                                 "for (int off = 8; off > 0; off /= 2) row_part"),
    "column_sums_unsynced": ("col_smem[warp][lane + 32 * j] = col_part[j];\n  __syncthreads();",
                             "col_smem[warp][lane + 32 * j] = col_part[j];"),
    "gram_tile_row_bound": ("sa[r][cc] = (ri < n && col < d) ? a[ri * d + col]", "sa[r][cc] = (col < d) ? a[ri * d + col]"),
    "gram_tile_column_bound": ("sa[r][cc] = (ri < n && col < d) ? a[ri * d + col]", "sa[r][cc] = (ri < n) ? a[ri * d + col]"),
    "gram_staging_unsynced": (
        "      sb[r][cc] = (rj < n && col < d) ? a[rj * d + col] : from_f32<T>(0.f);\n    }\n    __syncthreads();",
        "      sb[r][cc] = (rj < n && col < d) ? a[rj * d + col] : from_f32<T>(0.f);\n    }"),
    "gram_mma_unsynced": (
        "        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);\n    }\n"
        "    __syncthreads();\n  }\n}",
        "        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);\n    }\n  }\n}"),
    "offdiag_reduce_unsynced": ("  store_warp_tile(acc, sl);\n  __syncthreads();", "  store_warp_tile(acc, sl);"),
    "syrk_staging_same_tile": ("sb[kk][cc] = z(k0 + kk, J * kTile + cc);", "sb[kk][cc] = z(k0 + kk, I * kTile + cc);"),
    "syrk_last_partial_kstep": ("for (int64_t k0 = 0; k0 < n; k0 += kKStep) {",
                                "for (int64_t k0 = 0; k0 + kKStep <= n; k0 += kKStep) {"),
    "syrk_reduce_mirror_weight": ("const double w = mirror ? 2.0 : 1.0;", "const double w = 1.0;"),
    "syrk_syy_not_mirrored": ("if (mirror) syy_g[(j - d1) * d2 + (i - d1)] += v;", ""),
    "syrk_syx_overwritten": ("syx_g[(j - d1) * d1 + i] += v;", "syx_g[(j - d1) * d1 + i] = v;"),
    "syrk_skip_xx_too_early": ("if (skip_xx && (J + 1) * kTile <= d1) return;", "if (skip_xx && J * kTile <= d1) return;"),
}


def main(names: list[str]) -> int:
    with open(os.path.join(REPO, "csrc", "cka_cuda.cu"), encoding="utf-8") as f:
        source = f.read()
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(MUTANTS):
            old, new = MUTANTS[name]
            if source.count(old) != 1:
                print(f"{name:34s} does not apply: the source changed; update MUTANTS", flush=True)
                survivors.append(name)
                continue
            cu = os.path.join(tmp, "cka_cuda.cu")
            with open(cu, "w", encoding="utf-8") as f:
                f.write(source.replace(old, new))
            env = dict(os.environ, DEPTHFAST_EMU_CU=cu, DEPTHFAST_EMU_BUILD=os.path.join(tmp, "build"))
            res = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_cka_cuda_emulated.py"],
                cwd=REPO, env=env, capture_output=True, text=True,
            )
            last = ([ln for ln in res.stdout.splitlines() if ln.strip()] or ["(no output)"])[-1]
            verdict = "killed" if res.returncode == 1 else "SURVIVED" if res.returncode == 0 else f"error {res.returncode}"
            print(f"{name:34s} {verdict:9s} {last}", flush=True)
            if verdict != "killed":
                survivors.append(name)
    print(f"{len(survivors)} of {len(names or MUTANTS)} mutants not killed" + (f": {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
