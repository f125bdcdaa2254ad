"""Do the tests catch broken kernels? Each mutant is one plausible bug (an index, a bound, a
weight, a missing barrier, a wrong moment update) planted in a kernel or its launcher; every one
must make that kernel's tests fail:

    cuda/    the CUDA kernels of csrc/*.cu     tests/test_cka_cuda_emulated.py  (run by tests/cuda_emu)
    triton/  the Triton kernels (kernels/)     tests/test_optim.py, tests/test_optim_fsdp.py  (interpreter)
    host/    the fused optimizer's host side   the same

How a mutant finds its site, so that moving code between files does not break the harness: a mutant
names the *function* it mutates and a text inside it, not a file. The function is looked up in the
tracked files of its language (Python: *.py, CUDA: *.cu, *.cuh; tests/ is never searched): Python by
its definition (``ast``; ``Class.method`` for a method, needed where several classes define one), CUDA
by a definition ``name(...) {`` and its matching brace (comments and strings skipped). It must be
defined exactly once, and its text (from the ``def`` or the line of the name to the end of its body)
must hold the mutant's text exactly once. A site that moved to another file is found there; one whose
function was renamed, or whose text was rewritten, is reported by name with the reason ("no function
X in the tracked *.py files", "X (path:line) holds the text 0 times") and counts as not killed.

The working tree is not touched. The tracked files (and the built depthfast/_C) are copied to a
temporary directory, run there by an environment that sees this one's packages but not its editable
install of depthfast, and each mutant is written into the copy, tested and undone.

    python tests/mutants.py               # all 33, about 6 min on 2 cores
    python tests/mutants.py cuda/         # the names that start with cuda/ (or triton/, host/)
    python tests/mutants.py --locate      # only find every site (seconds): after a refactor

Exit status 1 if any mutant survives or its site is not found.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUFFIXES = {"python": (".py",), "cuda": (".cu", ".cuh")}
TESTS = {
    "cuda": ["tests/test_cka_cuda_emulated.py"],
    "triton": ["tests/test_optim.py", "tests/test_optim_fsdp.py"],
    "host": ["tests/test_optim.py", "tests/test_optim_fsdp.py"],
}
LANGUAGE = {"cuda": "cuda", "triton": "python", "host": "python"}


class Mutant(NamedTuple):
    function: str  # where: a function (or Class.method) defined once in the tracked files
    old: str  # text that occurs exactly once inside it
    new: str  # its replacement


_CUDA = {
    "tile_pair_decode": Mutant("upper_tile_pair", "  J = I + p;", "  J = p;"),
    "offdiag_diagonal_in_every_tile": Mutant("offdiag_kernel", "if (I == J && r == cc) continue;", "if (r == cc) continue;"),
    "offdiag_off_tile_weight": Mutant("offdiag_kernel", "I == J ? 1.0 : 2.0);", "1.0);"),
    "mask_ignored": Mutant("prepare_kernel", "const bool keep = mask == nullptr || mask[r] != 0.f;", "const bool keep = true;"),
    "row_stride_ignored": Mutant("prepare_kernel", "to_f32<Tin>(x[r * ld + col])", "to_f32<Tin>(x[r * d + col])"),
    "layer_chunk_offset": Mutant("launch_prepare", "static_cast<int>(l0));", "0);"),
    "row_norm_shuffle_offsets": Mutant("prepare_kernel", "for (int off = 16; off > 0; off /= 2) row_part",
                                       "for (int off = 8; off > 0; off /= 2) row_part"),
    "column_sums_unsynced": Mutant("prepare_kernel", "col_smem[warp][lane + 32 * j] = col_part[j];\n  __syncthreads();",
                                   "col_smem[warp][lane + 32 * j] = col_part[j];"),
    "gram_tile_row_bound": Mutant("accumulate_gram_tile", "sa[r][cc] = (ri < n && col < d) ? a[ri * d + col]",
                                  "sa[r][cc] = (col < d) ? a[ri * d + col]"),
    "gram_tile_column_bound": Mutant("accumulate_gram_tile", "sa[r][cc] = (ri < n && col < d) ? a[ri * d + col]",
                                     "sa[r][cc] = (ri < n) ? a[ri * d + col]"),
    "gram_staging_unsynced": Mutant(
        "accumulate_gram_tile",
        "      sb[r][cc] = (rj < n && col < d) ? a[rj * d + col] : from_f32<T>(0.f);\n    }\n    __syncthreads();",
        "      sb[r][cc] = (rj < n && col < d) ? a[rj * d + col] : from_f32<T>(0.f);\n    }"),
    # The barrier after a k-slab's products: without it the next slab's staging overwrites operands in use.
    "gram_mma_unsynced": Mutant("accumulate_gram_tile",
                                "acc.template accumulate<true, kKStep>(&sa[0][0], &sb[0][0], kKStep + 8);\n    __syncthreads();",
                                "acc.template accumulate<true, kKStep>(&sa[0][0], &sb[0][0], kKStep + 8);"),
    "offdiag_reduce_unsynced": Mutant("offdiag_kernel", "  acc.store(sl);\n  __syncthreads();", "  acc.store(sl);"),
    "syrk_staging_same_tile": Mutant("syrk_kernel", "sb[kk][cc] = z(k0 + kk, J * kTile + cc);",
                                     "sb[kk][cc] = z(k0 + kk, I * kTile + cc);"),
    "syrk_last_partial_kstep": Mutant("syrk_kernel", "for (int64_t k0 = 0; k0 < n; k0 += kKStep) {",
                                      "for (int64_t k0 = 0; k0 + kKStep <= n; k0 += kKStep) {"),
    "syrk_reduce_mirror_weight": Mutant("syrk_kernel", "const double w = mirror ? 2.0 : 1.0;", "const double w = 1.0;"),
    "syrk_syy_not_mirrored": Mutant("syrk_kernel", "if (mirror) syy_g[(j - d1) * d2 + (i - d1)] += v;", ""),
    "syrk_syx_overwritten": Mutant("syrk_kernel", "syx_g[(j - d1) * d1 + i] += v;", "syx_g[(j - d1) * d1 + i] = v;"),
    "syrk_skip_xx_too_early": Mutant("syrk_kernel", "if (skip_xx && (J + 1) * kTile <= d1) return;",
                                     "if (skip_xx && J * kTile <= d1) return;"),
}
_TRITON = {
    "adam_bias_correction_inside_sqrt": Mutant("_adam_update", "denom = tl.sqrt(v) / bc2_sqrt + eps",
                                               "denom = tl.sqrt(v / bc2_sqrt) + eps"),
    "adamw_decay_sign": Mutant("_adam_update", "u = u - lr_wd * w", "u = u + lr_wd * w"),
    "adam_l2_decay_dropped": Mutant("_equal_step_kernel", "                        g = g + wd * w\n",
                                    "                        g = g\n"),
    "adam_first_moment_not_lerp": Mutant("_equal_step_kernel", "m = m + one_m_beta1 * (g - m)", "m = m + one_m_beta1 * g"),
    "adam_second_moment_of_g": Mutant("_equal_step_kernel", "v = v * beta2 + one_m_beta2 * (g * g)",
                                      "v = v * beta2 + one_m_beta2 * g"),
    "adam_phase1_unrounded_moments": Mutant("_equal_step_kernel", "                    m = m_st.to(tl.float32)\n", ""),
    "ungrouped_entries_frozen": Mutant("_equal_step_kernel", "tl.load(scales + tl.maximum(gid, 0)), 1.0)",
                                       "tl.load(scales + tl.maximum(gid, 0)), 0.0)"),
    "unstepped_weights_not_counted": Mutant("_equal_step_kernel",
                                            "                tl.atomic_add(sums + NUM_GROUPS + gid, acc_w)\n    else:",
                                            "                pass\n    else:"),
    "sgd_nesterov_gradient_term_dropped": Mutant("_equal_step_kernel", "u = -lr * (grad_w * g + buf_w * buf)",
                                                 "u = -lr * (buf_w * buf)"),
    "sgd_old_buffer_used": Mutant("_equal_step_kernel", "buf = tl.where(has_buf, buf_st.to(tl.float32), 0.0)",
                                  "buf = tl.where(has_buf, buf, 0.0)"),
    "sgd_maximize_ignored": Mutant("_equal_step_kernel", "g = g * sign + wd * w", "g = g + wd * w"),
    "bf16_rounding_ties_not_even": Mutant("_cast_to", "bits = bits + 0x7FFF + ((bits >> 16) & 1)", "bits = bits + 0x7FFF"),
}
_HOST = {
    "adam_step_count_off_by_one": Mutant("FusedAdam._hyper_rows", "t = self.steps[h] + 1\n", "t = self.steps[h] + 2\n"),
    "sgd_dampening_ignored": Mutant("FusedSgd._hyper_rows", "k.SGD_BUF_GRAD_W: 1.0 - dampening}", "k.SGD_BUF_GRAD_W: 1.0}"),
}
MUTANTS = {f"{kind}/{k}": m for kind, table in (("cuda", _CUDA), ("triton", _TRITON), ("host", _HOST))
           for k, m in table.items()}


# -- finding a site ------------------------------------------------------------------------------

class Site(NamedTuple):
    path: str  # relative to the tree
    start: int  # offset of the mutant's text in the file
    line: int


class NotFound(Exception):
    """The site of a mutant is not in the tree; the message says why."""


def _tracked(tree: str) -> list[str]:
    return subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=tree, capture_output=True,
                          text=True, check=True).stdout.split()


def _python_functions(source: str, name: str) -> list[tuple[int, int, int]]:
    """(start, end, line) of every definition of ``name`` (a bare name, or Class.method) in Python
    source: from the start of its ``def`` line to the end of its last line."""
    starts = [0]
    for ln in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(ln))
    found = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                if name in (child.name, qual) and not isinstance(child, ast.ClassDef):
                    found.append((starts[child.lineno - 1], starts[child.end_lineno], child.lineno))
                walk(child, qual + ".")

    walk(ast.parse(source), "")
    return found


def _blank_comments_and_strings(source: str) -> str:
    """The C++ source with comments and string/char literals replaced by spaces (offsets kept), so that
    braces and names inside them are not read as code."""
    out, i, n = list(source), 0, len(source)
    while i < n:
        c = source[i]
        if source.startswith("//", i):
            j = source.find("\n", i)
            j = n if j < 0 else j
        elif source.startswith("/*", i):
            j = source.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and source[j] != c:
                j += 2 if source[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def _matching(code: str, i: int, open_: str, close: str) -> int:
    """Offset just past the bracket that closes the one at ``code[i]``."""
    depth = 0
    for j in range(i, len(code)):
        depth += (code[j] == open_) - (code[j] == close)
        if depth == 0:
            return j + 1
    return len(code)


def _cuda_functions(source: str, name: str) -> list[tuple[int, int, int]]:
    """(start, end, line) of every definition ``name(...) [qualifiers] {...}`` in CUDA/C++ source:
    from the start of the line holding the name to the closing brace. Calls and declarations (the
    parameter list followed by anything but a body) are skipped."""
    code = _blank_comments_and_strings(source)
    found = []
    for m in re.finditer(r"\b" + re.escape(name) + r"\s*\(", code):
        after = _matching(code, m.end() - 1, "(", ")")
        body = re.match(r"[\s\w:]*\{", code[after:])  # const, noexcept, __launch_bounds__-free qualifiers
        if body is None:
            continue
        brace = after + body.end() - 1
        start = code.rfind("\n", 0, m.start()) + 1
        found.append((start, _matching(code, brace, "{", "}"), source.count("\n", 0, m.start()) + 1))
    return found


def locate(tree: str, name: str, files: list[str] | None = None) -> Site:
    """The site of mutant ``name`` in ``tree``; NotFound with the reason otherwise."""
    mutant = MUTANTS[name]
    language = LANGUAGE[name.split("/")[0]]
    finder = _python_functions if language == "python" else _cuda_functions
    defs = []
    for rel in files if files is not None else _tracked(tree):
        if not rel.endswith(SUFFIXES[language]) or rel.startswith("tests/"):
            continue
        with open(os.path.join(tree, rel), encoding="utf-8") as f:
            source = f.read()
        if mutant.function.split(".")[-1] not in source:
            continue
        try:
            defs += [(rel, source, *d) for d in finder(source, mutant.function)]
        except SyntaxError as exc:
            raise NotFound(f"{rel} does not parse ({exc.msg}, line {exc.lineno})") from None
    kinds = "/".join(f"*{s}" for s in SUFFIXES[language])
    if not defs:
        raise NotFound(f"no function {mutant.function} in the tracked {kinds} files (renamed or removed?)")
    if len(defs) > 1:
        where = ", ".join(f"{rel}:{line}" for rel, _, _, _, line in defs)
        raise NotFound(f"{mutant.function} is defined {len(defs)} times ({where}); name it Class.method")
    rel, source, start, end, line = defs[0]
    count = source.count(mutant.old, start, end)
    if count != 1:
        raise NotFound(f"{mutant.function} ({rel}:{line}) holds the mutant's text {count} times, not once "
                       f"(text {mutant.old[:60]!r}); update MUTANTS")
    at = source.index(mutant.old, start, end)
    return Site(rel, at, source.count("\n", 0, at) + 1)


# -- running -------------------------------------------------------------------------------------

def _copy_tree(dest: str) -> None:
    for rel in _tracked(REPO) + [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "depthfast", "_C*.so"))]:
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


def main(argv: list[str]) -> int:
    only_locate = "--locate" in argv
    prefixes = [a for a in argv if a != "--locate"]
    names = [n for n in MUTANTS if not prefixes or any(n.startswith(p) for p in prefixes)]
    survivors = []
    if only_locate:
        files = _tracked(REPO)
        for name in names:
            try:
                site = locate(REPO, name, files)
                print(f"{name:44s} {site.path}:{site.line}  in {MUTANTS[name].function}", flush=True)
            except NotFound as exc:
                print(f"{name:44s} NOT FOUND  {exc}", flush=True)
                survivors.append(name)
        print(f"{len(survivors)} of {len(names)} mutant sites not found" + (f": {survivors}" if survivors else ""))
        return 1 if survivors else 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        _copy_tree(tree)
        files = _tracked(REPO)  # the copy holds exactly these (it is not a git repository)
        python = _environment(os.path.join(tmp, "venv"))
        # ninja, torchrun, … of this environment stay on PATH.
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        env.pop("DEPTHFAST_EMU_BUILD", None)
        for name in names:
            mutant = MUTANTS[name]
            try:
                site = locate(tree, name, files)
            except NotFound as exc:
                print(f"{name:44s} NOT FOUND {exc}", flush=True)
                survivors.append(name)
                continue
            target = os.path.join(tree, site.path)
            with open(target, encoding="utf-8") as f:
                source = f.read()
            mutated = source[:site.start] + mutant.new + source[site.start + len(mutant.old):]
            try:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(mutated)
                res = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS[name.split("/")[0]]],
                                     cwd=tree, env=env, capture_output=True, text=True)
            finally:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(source)
            last = ([ln for ln in res.stdout.splitlines() if ln.strip()] or ["(no output)"])[-1]
            verdict = "killed" if res.returncode == 1 else "SURVIVED" if res.returncode == 0 else f"error {res.returncode}"
            print(f"{name:44s} {verdict:9s} {site.path}:{site.line}  {last}", flush=True)
            if verdict != "killed":
                survivors.append(name)
    killed = len(names) - len(survivors)
    print(f"{killed} of {len(names)} mutants killed; {len(survivors)} not" + (f": {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
