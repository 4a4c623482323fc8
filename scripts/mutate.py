#!/usr/bin/env python3
"""Mutation check of the Stage I / Stage II code, the attention score, the prompt rewriting, the
window batching, the generate wrapper and the Qwen, LLaVA-NeXT-Video and Video-LLaVA adapters: do the CPU tests
catch small realistic bugs?

Run it before resolving an algorithm change (it is not part of CI; it takes a while on 2 cores):

    python scripts/mutate.py                   # every mutation, default test selection
    python scripts/mutate.py --list            # the mutations and where they apply
    python scripts/mutate.py --only op-walk-lt-le --only ref-walk-lt-le
    python scripts/mutate.py --tests python_tests/test_handwritten_cases.py

What it does:
  1. copies the repository (``git ls-files``: tracked files plus untracked files that git does not
     ignore) to a scratch directory, and builds the CPU-only extension there
     (``EARLYTOM_SKIP_CUDA=1 <this python> setup.py build_ext --inplace``);
  2. runs the test selection once unmutated: it must pass, otherwise every mutation would look
     "caught";
  3. for each mutation: replaces one exact source string in one file (the string must occur
     exactly once in the files the mutation may touch, otherwise the script stops with an error,
     so a refactor cannot silently disable a mutation), rebuilds the extension when a C++ file was
     changed (incremental), runs the tests, and restores the file;
  4. prints a markdown table (mutation | file | tests failing | caught?).

Exit code: 0 when every mutation was caught, 1 when one survived (or its build failed), 2 on a
setup error (string not found, baseline failing, build failing).

The scratch copy imports its own ``earlytom_ext`` (``PYTHONPATH`` points at it; checked).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = [
    "python_tests/test_reference.py",
    "python_tests/test_merge_ops.py",
    "python_tests/test_select_tokens_op.py",
    "python_tests/test_attention_received_op.py",
    "python_tests/test_autograd_modes.py",
    "python_tests/test_handwritten_cases.py",
    "python_tests/test_prompt.py",
    "python_tests/test_window_attention.py",
    "python_tests/test_integration_glue.py",
    "python_tests/test_llava_next_video.py",
    "python_tests/test_video_llava.py",
    "python_tests/test_qwen2_5_vl.py",  # last: with -x, only what the earlier files pass reaches it
]
DEFAULT_PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]

# Files a mutation may touch. fnmatch's "*" also matches "/", so "csrc/*.cpp" is any .cpp under
# csrc/ at any depth: a file moved between csrc/cpu, csrc/kernels or csrc/ops is still found.
# CUDA sources (.cu) are left out: the mutated build is CPU-only.
CPP = ("csrc/*.cpp", "csrc/*.cc", "csrc/*.h", "csrc/*.hpp", "csrc/*.cuh")
REF = ("earlytom_ext/reference.py",)
PROMPT = ("earlytom_ext/integration/prompt.py",)
WRAPPERS = ("earlytom_ext/integration/wrappers.py",)
WINDOWS = ("earlytom_ext/integration/window_attention.py",)
QWEN = ("earlytom_ext/integration/adapters/qwen2*.py",)
LLAVA = ("earlytom_ext/integration/adapters/llava_*.py",)
VIDEO_LLAVA = ("earlytom_ext/integration/adapters/video_llava.py",)


@dataclass(frozen=True)
class Mutation:
    name: str
    globs: tuple[str, ...]
    find: str
    replace: str
    what: str

    @property
    def is_cpp(self) -> bool:
        return self.globs == CPP


MUTATIONS = [
    # ---- Stage I, EMA walk
    Mutation(
        "op-walk-lt-le",
        CPP,
        "if (s_hat < cfg.tau ||",
        "if (s_hat <= cfg.tau ||",
        "op walk cuts at s_hat == tau (`<` -> `<=`)",
    ),
    Mutation(
        "ref-walk-lt-le",
        REF,
        "if s_hat < cfg.tau or",
        "if s_hat <= cfg.tau or",
        "reference walk cuts at s_hat == tau (`<` -> `<=`)",
    ),
    Mutation(
        "op-norm-clamp",
        CPP,
        "std::max(std::sqrt(nn), mg::kNormEps)",
        "std::sqrt(nn)",
        "CPU op: token norm not clamped (zero tokens give NaN cosines)",
    ),
    Mutation(
        "ref-norm-clamp",
        REF,
        "return F.normalize(x.float(), dim=-1, eps=1e-12)",
        "return x.float() / x.float().norm(dim=-1, keepdim=True)",
        "reference: token norm not clamped",
    ),
    Mutation(
        "op-ema-swap",
        CPP,
        "s_hat = dadd_rn(dmul_rn(cfg.ema, static_cast<double>(c)), dmul_rn(keep, s_hat));",
        "s_hat = dadd_rn(dmul_rn(keep, static_cast<double>(c)), dmul_rn(cfg.ema, s_hat));",
        "op walk: EMA weights swapped",
    ),
    Mutation(
        "ref-ema-swap",
        REF,
        "s_hat = cfg.ema * c + (1.0 - cfg.ema) * s_hat",
        "s_hat = (1.0 - cfg.ema) * c + cfg.ema * s_hat",
        "reference walk: EMA weights swapped",
    ),
    Mutation("op-ema-reset", CPP, "      s_hat = 1.0;\n", "\n", "op walk: s_hat not reset to 1 after a cut"),
    Mutation(
        "ref-ema-reset", REF, "start, s_hat = i, 1.0", "start = i", "reference walk: s_hat not reset to 1 after a cut"
    ),
    Mutation(
        "op-window-off-by-one",
        CPP,
        "(i - start + 1) >= cfg.max_window",
        "(i - start + 1) > cfg.max_window",
        "op walk: segments of max_window frames (`>=` -> `>`)",
    ),
    Mutation(
        "ref-window-off-by-one",
        REF,
        "(i - start + 1) >= cfg.max_window",
        "(i - start + 1) > cfg.max_window",
        "reference walk: segments of max_window frames (`>=` -> `>`)",
    ),
    # ---- Stage I, fine merge
    Mutation(
        "op-merge-neighbour-tie",
        CPP,
        "if (sj > tau_m && sj > sn) {",
        "if (sj > tau_m && sj >= sn) {",
        "op fine merge: merges when sigma_j == sigma_j+1",
    ),
    Mutation(
        "op-merge-tau-m-tie",
        CPP,
        "if (sj > tau_m && sj > sn) {",
        "if (sj >= tau_m && sj > sn) {",
        "op fine merge: a pair merges when sigma_j == tau_m",
    ),
    Mutation(
        "op-merge-last-pair-tie",
        CPP,
        "if (sj > tau_m) {",
        "if (sj >= tau_m) {",
        "op fine merge: the last pair merges when sigma == tau_m",
    ),
    Mutation(
        "ref-merge-neighbour-tie",
        REF,
        "if sigma[j] > tau_m and sigma[j] > sigma[j + 1]:",
        "if sigma[j] > tau_m and sigma[j] >= sigma[j + 1]:",
        "reference fine merge: merges when sigma_j == sigma_j+1",
    ),
    Mutation(
        "ref-merge-tau-m-tie",
        REF,
        "if sigma[j] > tau_m and sigma[j] > sigma[j + 1]:",
        "if sigma[j] >= tau_m and sigma[j] > sigma[j + 1]:",
        "reference fine merge: a pair merges when sigma_j == tau_m",
    ),
    Mutation(
        "ref-merge-last-pair-tie",
        REF,
        "if sigma[j] > tau_m:",
        "if sigma[j] >= tau_m:",
        "reference fine merge: the last pair merges when sigma == tau_m",
    ),
    # ---- attention score (CPU op)
    Mutation(
        "op-attn-block-sum",
        CPP,
        "          acc.add_(col);\n",
        "\n",
        "attention_received CPU: only the first block of query rows counted",
    ),
    Mutation(
        "op-attn-thread-state",
        CPP,
        "    at::ThreadLocalStateGuard state_guard(caller_state);\n",
        "\n",
        "attention_received CPU: worker threads without the caller's inference mode",
    ),
    Mutation(
        "op-attn-scale",
        CPP,
        "at::mm_out(lg, qh.narrow(0, r0, rows), kT).mul_(scale);",
        "at::mm_out(lg, qh.narrow(0, r0, rows), kT);",
        "attention_received CPU: softmax scale not applied",
    ),
    # ---- Stage II
    Mutation(
        "op-topk-tie",
        CPP,
        "return kj > ki || (kj == ki && j < i);",
        "return kj > ki || (kj == ki && j > i);",
        "select_tokens CPU: top-k ties go to the highest index",
    ),
    Mutation(
        "ref-topk-tie",
        REF,
        "order = torch.sort(scores, descending=True, stable=True).indices",
        "order = scores.numel() - 1 - torch.sort(scores.flip(0), descending=True, stable=True).indices",
        "reference top-k: ties go to the highest index",
    ),
    Mutation(
        "ref-ceil-floor",
        REF,
        "return math.ceil(P * r_adj)",
        "return math.floor(P * r_adj)",
        "Stage II count: floor instead of ceil for dynamic frames",
    ),
    Mutation(
        "ref-round-half-away",
        REF,
        "return max(1, round(P * r_adj))",
        "return max(1, math.floor(P * r_adj + 0.5))",
        "Stage II count: round half away from zero instead of half to even",
    ),
    Mutation(
        "op-static-window-order",
        CPP,
        "out[w] = sel::window_argmax(keys.data(), start, stop);",
        "out[keep - 1 - w] = sel::window_argmax(keys.data(), start, stop);",
        "select_tokens CPU: a static frame's windows emitted in reverse order",
    ),
    Mutation(
        "ref-static-window-lengths",
        REF,
        "stop = start + base + (1 if i < extra else 0)",
        "stop = start + base + (1 if i >= n - extra else 0)",
        "reference: the last (not the first) P mod n windows are one longer",
    ),
    Mutation(
        "op-static-argmax-tie",
        CPP,
        "if (k > bk) {",
        "if (k >= bk) {",
        "select_tokens CPU: a window's top-1 tie goes to the highest index",
    ),
    # ---- prompt rewriting
    Mutation(
        "prompt-run-boundary",
        PROMPT,
        "if pos + n0 > e:",
        "if pos + n0 > e + 1:",
        "prompt: a video's placeholders may run one token past their run",
    ),
    Mutation(
        "prompt-padding-side",
        PROMPT,
        'padding_side = "right" if any(trail) and not any(lead) else "left"',
        'padding_side = "right" if any(trail) else "left"',
        "prompt: mixed padding is taken for right padding",
    ),
    Mutation(
        "windows-one-class",
        WINDOWS,
        "if len(starts) == 1:",
        "if len(starts) >= 1:",
        "window attention: windows of different lengths batched as if equal",
    ),
    Mutation(
        "windows-token-major",
        WINDOWS,
        "(t.reshape(count, length, heads, -1).transpose(1, 2) for t in (q_, k_, v_))",
        "(t.reshape(length, count, heads, -1).permute(1, 2, 0, 3) for t in (q_, k_, v_))",
        "window attention: tokens split into windows in the wrong order",
    ),
    Mutation(
        "ref-static-argmax-tie",
        REF,
        "pos = [a + int(torch.argmax(s[a:b])) for a, b in windows]",
        "pos = [b - 1 - int(torch.argmax(s[a:b].flip(0))) for a, b in windows]",
        "reference: a window's top-1 tie goes to the highest index",
    ),
    Mutation(
        "generate-config-check-keys",
        WRAPPERS,
        "if type(config) in _BUILDS and not any(getattr(config, k, None) is not None for k in keys):",
        "if type(config) in _BUILDS:",
        "generate: the model config's generation parameters are no longer refused",
    ),
    Mutation(
        "generate-config-check-build",
        WRAPPERS,
        "if type(config) in _BUILDS and not any(",
        "if not any(",
        "generate: a config class whose default config cannot be built passes the check",
    ),
    Mutation(
        "generate-config-check-text-off",
        WRAPPERS,
        "            with quick_config_check(core.model):\n                return orig(*args, **kwargs)",
        "            return orig(*args, **kwargs)",
        "generate: a call without video pays Hugging Face's per-call config rebuild again",
    ),
    Mutation(
        "generate-config-check-off",
        WRAPPERS,
        'with swap_attr(model, "_prepare_generation_config", quick_prepare):',
        "with contextlib.nullcontext():",
        "generate: Hugging Face's per-call config rebuild comes back",
    ),
    Mutation(
        "generate-assisted-settings",
        WRAPPERS,
        "value = generation_setting(model, call, name, _defaults())",
        "value = call.get(name)",
        "generate: assisted decoding asked for in a generation_config is no longer refused",
    ),
    Mutation(
        "generate-refused-off-values",
        WRAPPERS,
        "if value is not None and value not in off:",
        "if value is not None:",
        "generate: a prompt penalty at its off value (1.0, 0) is refused",
    ),
    Mutation(
        "generate-merge-cache-implementation",
        WRAPPERS,
        "if impl not in MERGE_CACHES:",
        "if impl not in MERGE_CACHES + (impl,):",
        "generate: the inner-LLM merge with a static cache fails inside instead of up front",
    ),
    Mutation(
        "generate-continuation-off",
        WRAPPERS,
        "        if not _FILLED:\n            return None",
        "        if _FILLED is not None:\n            return None",
        "generate: a returned cache continued with the caller's sequences sees the wrong tokens again",
    ),
    Mutation(
        "generate-continuation-mask",
        WRAPPERS,
        "head = cont.mask if cont.mask is not None else torch.ones_like(cont.compressed)",
        "head = torch.ones_like(cont.compressed)",
        "generate: a continued padded prompt attends to its padding",
    ),
    Mutation(
        "generate-callbacks-compressed",
        WRAPPERS,
        "return with_prompt(input_ids, self._compressed_len, self._prompt)",
        "return input_ids",
        "generate: custom logits processors and stopping criteria see the compressed prompt",
    ),
    Mutation(
        "generate-callbacks-before-merge",
        WRAPPERS,
        "    if not views or merge is None:\n        yield\n        return\n",
        '    for name, view in (("logits_processor", PromptView), ("stopping_criteria", CriterionView)):\n'
        "        if call.get(name):\n"
        "            call[name] = type(call[name])(view(f, prompt, compressed_len) for f in call[name])\n"
        "    if True:\n        yield\n        return\n",
        "generate: the caller's processors are wrapped before Hugging Face merges them (no longer replace its own)",
    ),
    Mutation(
        "generate-prefix-fn-row",
        WRAPPERS,
        "head = prompt[batch_id // per_sample].to(sent.device)",
        "head = prompt[batch_id % prompt.shape[0]].to(sent.device)",
        "generate: prefix_allowed_tokens_fn gets another sample's prompt with several returned sequences",
    ),
    Mutation(
        "position-ids-counting-up",
        ("earlytom_ext/integration/adapters/base.py",),
        "if not bool(((hi == lo) | ~attended.any(-1)).all()):",
        "if not bool(((hi >= lo) | ~attended.any(-1)).all()):",
        "forward: packed (restarting) caller position_ids pass and are silently renumbered",
    ),
    Mutation(
        "remove-wrapper-identity",
        ("earlytom_ext/integration/core.py",),
        "if model.__dict__.get(name, MISSING) is not wrapper:",
        "if getattr(model.__dict__.get(name, MISSING), '__name__', None) != wrapper.__name__:",
        "remove: a functools.wraps wrapper over the patched forward passes the check and is dropped",
    ),
    Mutation(
        "compile-video-path-traced",
        ("earlytom_ext/integration/core.py",),
        "    @torch.compiler.disable\n    def compress_call(",
        "    def compress_call(",
        "model.compile(): the compression is traced (its hooks do not run)",
    ),
    Mutation(
        "llm-merge-shared-stack",
        ("earlytom_ext/integration/llm_merge.py",),
        "    if language_model in _INSTALLED:",
        "    if False:",
        "inner-LLM merge: a second merge on a shared language model is accepted",
    ),
    Mutation(
        "handle-reentered-after-remove",
        ("earlytom_ext/integration/core.py",),
        "    def __enter__(self) -> EarlyTomHandle:\n        self._check_active()",
        "    def __enter__(self) -> EarlyTomHandle:",
        "handle: a removed handle re-entered as a context manager runs the unpatched model silently",
    ),
    # ---- Qwen2.5-VL / Qwen2-VL adapters
    Mutation(
        "qwen-mixed-grids-joined-in-pass-order",
        QWEN,
        "                    gathered[v] = value\n",
        "                    gathered[sum(g is not None for g in gathered)] = value\n",
        "Qwen: with videos on several grids, the positions of the kept tokens gathered in encoding order",
    ),
    Mutation(
        "qwen-mixed-grids-time-steps-not-split",
        QWEN,
        '"second_per_grid_ts": None if spg is None else [spg[v] for v in where],',
        '"second_per_grid_ts": None if spg is None else spg[: len(where)],',
        "Qwen2.5-VL: with videos on several grids, each pass given the first videos' time steps",
    ),
    Mutation(
        "qwen-merged-group-time",
        QWEN,
        "first = torch.minimum(first[plan_src[:, 0]], first[plan_src[:, 1]])",
        "first = torch.maximum(first[plan_src[:, 0]], first[plan_src[:, 1]])",
        "Qwen: a merged group takes the temporal position of its last (not first) source group",
    ),
    Mutation(
        "qwen-score-pooling",
        QWEN,
        "scores = run.scores.view(n, P, unit).sum(dim=-1)[:, geo.inv]",
        "scores = run.scores.view(n, P, unit).amax(dim=-1)[:, geo.inv]",
        "Qwen: a merged token's score is its best patch's, not the sum of its 2x2 patches",
    ),
    Mutation(
        "qwen-text-after-video",
        QWEN,
        "rel=rel, advance=int(row[0, 2 + n]) - begin,",
        "rel=rel, advance=int(row[0, 2 + n]) - begin + 1,",
        "Qwen: the text after a video starts one position later than in the uncompressed prompt",
    ),
    Mutation(
        "qwen2-vl-patch-order",
        QWEN,
        "perm, cu = torch.arange(S // unit), torch.tensor([0, S])",
        "perm, cu = torch.arange(S // unit).flip(0), torch.tensor([0, S])",
        "Qwen2-VL: the patches of a group run in reverse order through the blocks (rounding differs)",
    ),
    # ---- LLaVA-NeXT-Video adapter
    Mutation(
        "next-video-score-pool-mode",
        LLAVA,
        'pool = F.max_pool2d if self.pool_mode == "max" else F.avg_pool2d',
        'pool = F.avg_pool2d if self.pool_mode == "max" else F.max_pool2d',
        "LLaVA-NeXT-Video: the scores pooled by the maximum where the model averages (and vice versa)",
    ),
    Mutation(
        "next-video-class-token-kept",
        LLAVA,
        '        if strategy == "default":\n            feats = feats[:, 1:]\n            scores = scores[:, 1:]',
        '        if strategy == "default":\n            feats = feats[:, :-1]\n            scores = scores[:, :-1]',
        "LLaVA: the 'default' strategy drops the last patch instead of the class token",
    ),
    Mutation(
        "next-video-prune-depth",
        LLAVA,
        "        return scaled_prune_layers(first + 1)\n",
        "        return scaled_prune_layers(self.depth)\n",
        "LLaVA: default prune layers scaled to the whole encoder, not to the layers that feed the features",
    ),
    Mutation(
        "llava-newline-in-feature-dtype",
        LLAVA,
        "newline = self.inner.image_newline.to(device=tokens[0].device)[None, :]",
        "newline = self.inner.image_newline.to(device=tokens[0].device, dtype=tokens[0].dtype)[None, :]",
        "LLaVA-OneVision: image_newline cast to the features' dtype (under autocast the model promotes both)",
    ),
    # ---- Video-LLaVA adapter
    Mutation(
        "video-llava-class-token-dropped",
        VIDEO_LLAVA,
        '        return "full"\n',
        '        return "default"\n',
        "Video-LLaVA: the class token of a frame dropped (the model keeps it for videos)",
    ),
    Mutation(
        "video-llava-scores-in-model-dtype",
        VIDEO_LLAVA,
        "return proj, scores.to(torch.float32)",
        "return proj, scores",
        "Video-LLaVA: the scores handed to Stage II in the model's dtype, not fp32",
    ),
    Mutation(
        "merge-prompt-checked-late",
        ("earlytom_ext/integration/core.py",),
        "            for_merge=self._llm_merge is not None,",
        "            for_merge=False,",
        "inner-LLM merge: several videos per sample / right padding caught only after the encoder ran",
    ),
    Mutation(
        "merge-checkpointing-accepted",
        ("earlytom_ext/integration/llm_merge.py",),
        'and getattr(m, "gradient_checkpointing", False) is True',
        'and getattr(m, "gradient_checkpointing", False) is None',
        "inner-LLM merge: gradient checkpointing under grad mode accepted (backward recomputes without the merge)",
    ),
    Mutation(
        "apply-preset-layers-silent",
        ("earlytom_ext/integration/__init__.py",),
        "    if adapter.presets_tuned:\n        return\n",
        "    if adapter.presets_tuned or True:\n        return\n",
        "apply: a preset's SigLIP prune layers accepted on another family without a warning",
    ),
    Mutation(
        "apply-preset-warning-on-llava-onevision",
        ("earlytom_ext/integration/adapters/llava_onevision.py",),
        "    presets_tuned = True",
        "    presets_tuned = False",
        "apply: the presets' layers warned about on LLaVA-OneVision, the family they were tuned on",
    ),
    Mutation(
        "apply-config-without-layers",
        ("earlytom_ext/integration/__init__.py",),
        "        cfg = cfg.replace(prune_layers=adapter.default_prune_layers())",
        "        cfg = EarlyTomConfig(prune_layers=adapter.default_prune_layers())",
        "apply: a config without prune layers gets the family's layers but loses its other settings",
    ),
]


class SetupError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[mutate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    return sorted({p for p in out.decode().split("\0") if p and (root / p).is_file()})


def copy_repo(root: Path, dest: Path, files: list[str]) -> None:
    """Copy ``files`` into ``dest``. A file whose content is already there is left untouched and a
    changed one gets a fresh mtime, so a reused scratch dir rebuilds exactly what changed (ninja
    compares mtimes: copying an old mtime over a newer object file would keep a stale build)."""
    for rel in files:
        src, dst = root / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        if dst.is_file() and dst.read_bytes() == data:
            continue
        dst.write_bytes(data)
        shutil.copymode(src, dst)


MARKER = ".earlytom-mutate-scratch"


def prepare_scratch(scratch: Path, files: list[str]) -> None:
    """Make ``scratch`` usable: a new or empty directory, or one this script made before. In a
    reused one, source files that are no longer in the repository (moved or deleted) are removed,
    so that the build does not compile stale copies; build outputs are kept."""
    scratch.mkdir(parents=True, exist_ok=True)
    marker = scratch / MARKER
    if not marker.exists():
        if any(scratch.iterdir()):
            raise SetupError(f"--scratch {scratch} is not empty and was not made by this script")
        marker.write_text("scratch copy of scripts/mutate.py; safe to delete\n")
        return
    keep = set(files) | {MARKER}
    for p in sorted(scratch.rglob("*"), reverse=True):
        rel = p.relative_to(scratch).as_posix()
        if rel.split("/")[0] == "build" or "__pycache__" in rel or ".egg-info" in rel or p.suffix in (".so", ".pyd"):
            continue
        if p.is_file() and rel not in keep:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def locate(m: Mutation, files: list[str], scratch: Path) -> str:
    """The one file among ``m.globs`` that holds ``m.find`` exactly once (else SetupError)."""
    candidates = [f for f in files if any(fnmatch.fnmatch(f, g) for g in m.globs)]
    if not candidates:
        raise SetupError(f"mutation {m.name}: no file matches {m.globs}")
    hits = [(f, (scratch / f).read_text().count(m.find)) for f in candidates]
    hits = [(f, n) for f, n in hits if n]
    if not hits:
        raise SetupError(
            f"mutation {m.name}: source string {m.find!r} not found in {m.globs} "
            f"(the code was changed: update the mutation in scripts/mutate.py)"
        )
    if len(hits) > 1 or hits[0][1] > 1:
        raise SetupError(f"mutation {m.name}: source string {m.find!r} is ambiguous: {hits}")
    return hits[0][0]


def build(scratch: Path, jobs: int) -> tuple[bool, str]:
    env = dict(os.environ, EARLYTOM_SKIP_CUDA="1", MAX_JOBS=str(jobs))
    env.pop("EARLYTOM_FORCE_CUDA", None)
    p = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
    )
    return p.returncode == 0, (p.stdout + p.stderr)[-4000:]


def test_env(scratch: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(scratch) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_import(scratch: Path) -> None:
    code = "import earlytom_ext, sys; print(earlytom_ext.__file__); sys.exit(0 if earlytom_ext._ext.available() else 3)"
    p = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=test_env(scratch), capture_output=True, text=True)
    where = p.stdout.strip()
    if p.returncode != 0 or not Path(where).resolve().is_relative_to(scratch.resolve()):
        raise SetupError(
            f"the scratch copy does not import its own built earlytom_ext (got {where!r}, rc "
            f"{p.returncode}): {p.stderr[-2000:]}"
        )


FAILED_RE = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def run_tests(scratch: Path, tests: list[str], pytest_args: list[str]) -> tuple[int, list[str], str]:
    p = subprocess.run(
        [sys.executable, "-m", "pytest", *tests, *pytest_args],
        cwd=scratch,
        env=test_env(scratch),
        capture_output=True,
        text=True,
    )
    out = p.stdout + p.stderr
    failing = [m.group(2) for m in FAILED_RE.finditer(out)]
    return p.returncode, failing, out


def short_test(nodeid: str) -> str:
    return nodeid.replace("python_tests/", "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this mutation (repeatable; comma-separated names work too)",
    )
    ap.add_argument(
        "--tests",
        nargs="+",
        default=DEFAULT_TESTS,
        metavar="PATH",
        help="test selection, relative to the repository root (default: %(default)s)",
    )
    ap.add_argument(
        "--pytest-args", default=" ".join(DEFAULT_PYTEST_ARGS), help="pytest arguments (default: %(default)r)"
    )
    ap.add_argument(
        "--scratch",
        type=Path,
        help="scratch directory to use and keep (reused builds are incremental); "
        "default: a temporary directory, removed at the end",
    )
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default: %(default)s)")
    ap.add_argument("--verbose", action="store_true", help="print the pytest output of every mutation")
    args = ap.parse_args(argv)

    selected = MUTATIONS
    if args.only:
        names = [n.strip() for o in args.only for n in o.split(",") if n.strip()]
        unknown = sorted(set(names) - {m.name for m in MUTATIONS})
        if unknown:
            ap.error(f"unknown mutation(s) {unknown}; --list shows the names")
        selected = [m for m in MUTATIONS if m.name in names]

    files = repo_files(ROOT)
    if args.list:
        for m in MUTATIONS:
            try:
                where = locate(m, files, ROOT)
            except SetupError as e:
                where = f"ERROR: {e}"
            print(f"{m.name:28s} {where:40s} {m.what}")
        return 0

    missing = [t for t in args.tests if t.split("::")[0] not in files]
    if missing:
        ap.error(f"test paths not in the repository: {missing}")
    pytest_args = args.pytest_args.split()

    keep = args.scratch is not None
    scratch = args.scratch.resolve() if keep else Path(tempfile.mkdtemp(prefix="earlytom-mutate-"))
    try:
        prepare_scratch(scratch, files)
        log(f"copying {len(files)} files to {scratch}")
        copy_repo(ROOT, scratch, files)
        # Locate every mutation before the (slow) build: a stale string fails at once.
        where = {m.name: locate(m, files, scratch) for m in selected}
        log("building the CPU-only extension (unmutated)")
        ok, out = build(scratch, args.jobs)
        if not ok:
            raise SetupError(f"the unmutated CPU-only build failed:\n{out}")
        check_import(scratch)
        log(f"baseline: {' '.join(args.tests)}")
        rc, failing, out = run_tests(scratch, args.tests, pytest_args)
        if rc != 0:
            raise SetupError(f"the unmutated test selection fails (rc {rc}, {failing}); fix that first:\n{out[-4000:]}")

        # Python mutations first (they share the unmutated build), then the C++ ones.
        ordered = [m for m in selected if not m.is_cpp] + [m for m in selected if m.is_cpp]
        rows, needs_rebuild = [], False
        for m in ordered:
            rel = where[m.name]
            path = scratch / rel
            original = path.read_text()
            log(f"{m.name}: {rel}")
            path.write_text(original.replace(m.find, m.replace, 1))
            try:
                status, tests_failing = "", ""
                if m.is_cpp or needs_rebuild:
                    ok, out = build(scratch, args.jobs)
                    needs_rebuild = m.is_cpp
                    if not ok:
                        status, tests_failing = "NO (build failed)", out.strip().splitlines()[-1][:100]
                if not status:
                    rc, failing, out = run_tests(scratch, args.tests, pytest_args)
                    if args.verbose:
                        print(out, file=sys.stderr)
                    if rc == 1 and failing:
                        status = "yes"
                        tests_failing = ", ".join(short_test(t) for t in failing)
                    elif rc == 0:
                        status = "**NO**"
                        tests_failing = "none"
                    else:
                        status = f"NO (pytest rc {rc})"
                        tests_failing = out.strip().splitlines()[-1][:100] if out.strip() else ""
            finally:
                path.write_text(original)
            log(f"{m.name}: caught = {status}")
            rows.append((m, rel, tests_failing, status))

        print("| mutation | file | tests failing | caught? |")
        print("| --- | --- | --- | --- |")
        for m, rel, tests_failing, status in rows:
            print(f"| `{m.name}`: {m.what} | {rel} | {tests_failing} | {status} |")
        survived = [m.name for m, _, _, s in rows if s != "yes"]
        print()
        print(
            f"{len(rows) - len(survived)} of {len(rows)} mutations caught"
            + (f"; NOT caught: {', '.join(survived)}" if survived else "")
        )
        return 1 if survived else 0
    except SetupError as e:
        print(f"mutate.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
