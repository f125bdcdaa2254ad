"""Do the tests catch broken kernels? Each mutant is one plausible bug (an index, a bound, a
weight, a missing barrier, a wrong moment update) planted in a kernel or its launcher; every one
must make that kernel's tests fail:

    csrc/cka_cuda.cu     tests/test_cka_cuda_emulated.py  (CUDA kernels, run by tests/cuda_emu)
    kernels/optim.py     tests/test_optim.py, tests/test_optim_fsdp.py  (Triton, interpreter)
    depthfast/optim.py   the same (the fused path's host side)

The working tree is not touched. The tracked files (and the built depthfast/_C) are copied to a
temporary directory, run there by an environment that sees this one's packages but not its editable
install of depthfast, and each mutant is written into the copy, tested and undone.

    python tests/mutants.py               # all 33, about 6 min on 2 cores
    python tests/mutants.py cuda/         # the names that start with cuda/ (or triton/, host/)

Exit status 1 if any mutant survives or no longer applies to its source.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TESTS = {
    "csrc/cka_cuda.cu": ["tests/test_cka_cuda_emulated.py"],
    "kernels/optim.py": ["tests/test_optim.py", "tests/test_optim_fsdp.py"],
    "depthfast/optim.py": ["tests/test_optim.py", "tests/test_optim_fsdp.py"],
}

# name: (file, its text, the replacement). cuda/: csrc/cka_cuda.cu.
_CUDA = {
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
_TRITON = {
    "adam_bias_correction_inside_sqrt": ("denom = tl.sqrt(v) / bc2_sqrt + eps", "denom = tl.sqrt(v / bc2_sqrt) + eps"),
    "adamw_decay_sign": ("u = u - lr_wd * w", "u = u + lr_wd * w"),
    "adam_l2_decay_dropped": ("                        g = g + wd * w\n", "                        g = g\n"),
    "adam_first_moment_not_lerp": ("m = m + one_m_beta1 * (g - m)", "m = m + one_m_beta1 * g"),
    "adam_second_moment_of_g": ("v = v * beta2 + one_m_beta2 * (g * g)", "v = v * beta2 + one_m_beta2 * g"),
    "adam_phase1_unrounded_moments": ("                    m = m_st.to(tl.float32)\n", ""),
    "ungrouped_entries_frozen": ("tl.load(scales + tl.maximum(gid, 0)), 1.0)", "tl.load(scales + tl.maximum(gid, 0)), 0.0)"),
    "unstepped_weights_not_counted": ("                tl.atomic_add(sums + NUM_GROUPS + gid, acc_w)\n    else:",
                                      "                pass\n    else:"),
    "sgd_nesterov_gradient_term_dropped": ("u = -lr * (grad_w * g + buf_w * buf)", "u = -lr * (buf_w * buf)"),
    "sgd_old_buffer_used": ("buf = tl.where(has_buf, buf_st.to(tl.float32), 0.0)", "buf = tl.where(has_buf, buf, 0.0)"),
    "sgd_maximize_ignored": ("g = g * sign + wd * w", "g = g + wd * w"),
    "bf16_rounding_ties_not_even": ("bits = bits + 0x7FFF + ((bits >> 16) & 1)", "bits = bits + 0x7FFF"),
}
_HOST = {
    "adam_step_count_off_by_one": ("            t = self.steps[h] + 1\n", "            t = self.steps[h] + 2\n"),
    "sgd_dampening_ignored": ("rows.append([lr, wd, momentum, 1.0 - dampening,", "rows.append([lr, wd, momentum, 1.0,"),
}
MUTANTS = {
    **{f"cuda/{k}": ("csrc/cka_cuda.cu", *v) for k, v in _CUDA.items()},
    **{f"triton/{k}": ("kernels/optim.py", *v) for k, v in _TRITON.items()},
    **{f"host/{k}": ("depthfast/optim.py", *v) for k, v in _HOST.items()},
}


def _copy_tree(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files + [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "depthfast", "_C*.so"))]:
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), os.path.join(dest, rel))


def _environment(dest: str) -> str:
    """A venv that sees this interpreter's site-packages through a plain path (.pth files there, such
    as the editable install's finder, are then not run), so depthfast comes from the copy."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", dest], check=True)
    site = subprocess.run([os.path.join(dest, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "parent_env.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])) + "\n")
    return os.path.join(dest, "bin", "python")


def main(prefixes: list[str]) -> int:
    names = [n for n in MUTANTS if not prefixes or any(n.startswith(p) for p in prefixes)]
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        _copy_tree(tree)
        python = _environment(os.path.join(tmp, "venv"))
        # ninja, torchrun, … of this environment stay on PATH.
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        env.pop("DEPTHFAST_EMU_BUILD", None)
        for name in names:
            path, old, new = MUTANTS[name]
            target = os.path.join(tree, path)
            with open(target, encoding="utf-8") as f:
                source = f.read()
            if source.count(old) != 1:
                print(f"{name:44s} does not apply: the source changed; update MUTANTS", flush=True)
                survivors.append(name)
                continue
            try:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(source.replace(old, new))
                res = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS[path]],
                                     cwd=tree, env=env, capture_output=True, text=True)
            finally:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(source)
            last = ([ln for ln in res.stdout.splitlines() if ln.strip()] or ["(no output)"])[-1]
            verdict = "killed" if res.returncode == 1 else "SURVIVED" if res.returncode == 0 else f"error {res.returncode}"
            print(f"{name:44s} {verdict:9s} {last}", flush=True)
            if verdict != "killed":
                survivors.append(name)
    print(f"{len(survivors)} of {len(names)} mutants not killed" + (f": {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
