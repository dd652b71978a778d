"""`make bench-lm-eval`: EleutherAI's lm-evaluation-harness against the osd endpoint, and against the same
target in-process with lm-eval's own ``hf`` model; the scores must be identical (speculation is lossless).

Two tasks, defined in bench/lm_eval_tasks/ over local JSONL (nothing is downloaded):

- ``osd_gsm8k_slice`` (generate_until): GSM8K test questions (Spec-Bench's math_reasoning copy), 2-shot
  from GSM8K train, greedy, ``max_gen_toks`` 64, lm-eval's gsm8k prompt, filters and exact_match;
- ``osd_gsm8k_mc`` (multiple_choice, i.e. loglikelihood): the same questions with four numeric answers.

Sides, one after the other on the same machine:

- ``hf``: ``lm_eval.models.huggingface.HFLM`` on the packaged SmolLM2 (its converted local copy), float32,
  batch size 1, ``--threads`` torch threads: plain HF ``generate`` and one forward per scored request;
- ``osd``: ``local-completions`` (token-id prompts, the same tokenizer) against the osd app deployed on a
  local Ray (one replica with ``--threads`` torch threads, the service's engine config: suffix speculation
  fused with the self-draft; an embedded Redis takes the training records), float32 as well; or
  ``--url`` for an endpoint already running. Generation requests are greedy completions; scoring requests
  are ``echo`` + ``logprobs: 1`` + ``max_tokens: 1`` (what local-completions sends).

Both sides run float32: the machine's "auto" dtype may be bf16, and two bf16 runs with different
kernels can flip near-ties; float32 makes exact agreement the expectation. Compared: every metric
(must be equal), each generation (must be the same text) and each choice's log-likelihood (to
``--tolerance``, with the same greedy flag). Timed: each task's evaluation on each side, model load
and deploy excluded; the osd side also reports its speculation (from /metrics).

    make bench-lm-eval                       # or: .venv/bin/python -m bench.lm_eval_compare
    .venv/bin/python -m bench.lm_eval_compare --limit 4 --out /tmp   # a quick look

Results to bench/results/lm_eval.json and a table in docs/benchmarks.md. The plain lm-eval commands
the two sides amount to are printed at the end (and in docs/api.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import tempfile
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path

from bench.report import environment, table, update_doc_section, write_json

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
DATA_DIR = TASKS_DIR / "data"
TASKS = ("osd_gsm8k_slice", "osd_gsm8k_mc")
QUESTIONS = ROOT / "osd" / "data" / "questions"


# --------------------------------------------------------------------------- the task data


def final_answer(solution: str) -> str:
    """GSM8K's answer: the number after '####', commas dropped."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None


def _spell(value: Decimal) -> str:
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def distractors(question: str, answer: str, k: int = 3) -> list[str]:
    """k wrong answers: numbers the question mentions (plausible slips), then near misses of the answer."""
    right = _number(answer)
    seen, out = {right}, []
    near = [right * 2, right + 10, right - 1, right + 1, right * 3] if right is not None else []
    for value in [_number(m) for m in re.findall(r"\$?\d[\d,]*(?:\.\d+)?", question)] + near:
        if value is not None and value >= 0 and value not in seen:
            seen.add(value)
            out.append(_spell(value))
        if len(out) == k:
            break
    return out


def build_task_data(questions: int = 20, fewshot: int = 2, out: Path = DATA_DIR) -> None:
    """Write the tasks' JSONL from the vendored question files (osd/data/questions): the first ``questions``
    GSM8K test questions of Spec-Bench's math_reasoning, the first ``fewshot`` GSM8K train examples, and
    the multiple-choice version (choices in numeric order, ``label`` the right one's index)."""
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(QUESTIONS / "spec_bench_questions.jsonl.gz", "rt") as f:
        bench = [q for q in map(json.loads, f) if q["category"] == "math_reasoning"][:questions]
    with gzip.open(QUESTIONS / "gsm8k_train.jsonl.gz", "rt") as f:
        shots = [json.loads(line) for _, line in zip(range(fewshot), f)]
    test = [{"question": q["turns"][0], "answer": q["reference"][0]} for q in bench]
    mc = []
    for row in test:
        answer = final_answer(row["answer"])
        choices = sorted([answer, *distractors(row["question"], answer)], key=lambda s: Decimal(s))
        mc.append({"question": row["question"], "choices": choices, "label": choices.index(answer)})
    for name, rows in (("gsm8k_test_slice", test), ("gsm8k_fewshot", shots), ("gsm8k_mc", mc)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- the two sides


def evaluate(lm, task: str, limit: int | None) -> dict:
    """One task through lm-eval's simple_evaluate: its metrics, per-sample responses and wall time."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                    limit=limit, bootstrap_iters=0, log_samples=True, verbosity="WARNING")
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in out["results"][task].items() if "," in k and "stderr" not in k}
    # One sample per doc and filter (generate_until has two filters), in a stable order.
    samples = sorted(out["samples"][task], key=lambda s: (s["doc_id"], s.get("filter", "")))
    samples = [{"doc_id": s["doc_id"], "filter": s.get("filter"), "resps": s["resps"],
                "filtered": s["filtered_resps"]} for s in samples]
    return {"seconds": seconds, "metrics": metrics, "samples": json.loads(json.dumps(samples, default=_plain))}


def _plain(value):
    """numpy scalars in lm-eval's samples, as JSON numbers."""
    return value.item() if hasattr(value, "item") else str(value)


def plain_model_dir(path: str) -> str:
    """``path`` as lm-eval's ``hf`` model can load it: the same files (linked), less the ``quantization_config``
    the GGUF conversion leaves in config.json, which lm-eval hands to transformers as a GGUF loading config
    (and transformers then refuses, there being no GGUF file to read: the weights are plain safetensors)."""
    src = Path(path)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" not in config:
        return path
    config.pop("quantization_config")
    dest = Path(tempfile.gettempdir()) / f"osd-lm-eval-{src.name}"
    dest.mkdir(exist_ok=True)
    for f in src.iterdir():
        link = dest / f.name
        if f.name != "config.json" and not link.exists():
            link.symlink_to(f.resolve())
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return str(dest)


def hf_model(path: str, threads: int):
    """lm-eval's ``hf`` model on ``path``: float32 on the CPU, batch size 1, ``threads`` torch threads."""
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(threads)
    return HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=1)


def osd_model(base_url: str, path: str):
    """lm-eval's ``local-completions`` against ``base_url``: token-id prompts from ``path``'s tokenizer, one at a time."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(model="osd", base_url=f"{base_url}/v1/completions", tokenizer_backend="huggingface",
                               tokenizer=path, num_concurrent=1, max_retries=1, timeout=600)


def spec_counters(base_url: str) -> dict[str, float]:
    """Totals of the osd counters that show speculation at work (summed over labels), from /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    names = {"osd:generation_tokens", "osd:target_forwards", "osd:spec_decode_num_drafts",
             "osd:spec_decode_num_accepted_tokens", "osd:prompt_tokens"}
    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name.removesuffix("_total") in names:
                out[s.name.removesuffix("_total")] += s.value
    return out


def run_sides(url: str, path: str, threads: int, limit: int | None, say=print) -> tuple[dict, dict]:
    """Each task on the hf side, then on the endpoint (adjacent, so machine noise hits both alike)."""
    start = time.perf_counter()
    hf_lm = hf_model(path, threads)
    hf, osd = {"load_s": time.perf_counter() - start, "tasks": {}}, {"tasks": {}}
    osd_lm = osd_model(url, path)
    for task in TASKS:
        hf["tasks"][task] = evaluate(hf_lm, task, limit)
        say(f"[hf] {task}: {hf['tasks'][task]['metrics']} in {hf['tasks'][task]['seconds']:.1f}s")
        before = spec_counters(url)
        osd["tasks"][task] = evaluate(osd_lm, task, limit)
        after = spec_counters(url)
        spent = {k.removeprefix("osd:"): after[k] - before[k] for k in after}
        rounds = spent["spec_decode_num_drafts"]
        spent["mean_acceptance_length"] = 1 + spent["spec_decode_num_accepted_tokens"] / rounds if rounds else None
        osd["tasks"][task]["server"] = spent
        say(f"[osd] {task}: {osd['tasks'][task]['metrics']} in {osd['tasks'][task]['seconds']:.1f}s; server {spent}")
    return hf, osd


def app_config_builder(threads: int):
    """bench.serve.deployed_endpoint's config: one replica, the service's engine, float32, no trainer."""
    def build(args, redis_url: str, max_clients: int):
        from actors.config import OsdAppConfig, TrainerSettings
        from osd.config import ModelConfig

        return OsdAppConfig(models=ModelConfig(dtype="float32"), redis_url=redis_url, num_replicas=1,
                            replica_num_cpus=1.0, replica_torch_threads=threads,
                            trainer=TrainerSettings(enabled=False))
    return build


# --------------------------------------------------------------------------- the comparison


def compare(hf: dict, osd: dict, tolerance: float) -> dict:
    """Per task: metrics equal, generations equal, log-likelihoods within ``tolerance`` with the same greedy flag."""
    out = {}
    for task in TASKS:
        a, b = hf["tasks"][task], osd["tasks"][task]
        row = {"metrics_equal": a["metrics"] == b["metrics"], "samples": len({s["doc_id"] for s in a["samples"]})}
        pairs = list(zip(a["samples"], b["samples"]))
        assert all(x["doc_id"] == y["doc_id"] for x, y in pairs) and len(a["samples"]) == len(b["samples"])
        first = a["samples"][0]["resps"][0][0] if a["samples"] else None
        if isinstance(first, str):  # generate_until: one text per doc
            differ = sorted({x["doc_id"] for x, y in pairs if x["resps"] != y["resps"]})
            row |= {"same_generations": row["samples"] - len(differ), "differing_docs": differ}
        else:  # loglikelihood: (ll, is_greedy) per choice
            gaps, flags = [], 0
            for x, y in pairs:
                for (lx, gx), (ly, gy) in zip((r[0] for r in x["resps"]), (r[0] for r in y["resps"])):
                    gaps.append(abs(lx - ly))
                    flags += gx != gy
            row |= {"loglikelihoods": len(gaps), "max_abs_diff": max(gaps, default=0.0),
                    "greedy_flags_differ": flags,
                    "within_tolerance": all(g <= tolerance for g in gaps)}
        row["agree"] = row["metrics_equal"] and not row.get("differing_docs") and row.get("within_tolerance", True) \
            and not row.get("greedy_flags_differ")
        out[task] = row
    return out


def generated_tokens(side: dict, path: str) -> int:
    """Tokens in the generate_until task's generations (the SmolLM2 tokenizer), for tokens/s."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = {s["doc_id"]: s["resps"][0][0] for s in side["tasks"]["osd_gsm8k_slice"]["samples"]}  # one per doc
    return sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts.values())


def commands(path: str, url: str) -> dict:
    tasks = f"--include_path bench/lm_eval_tasks --tasks {','.join(TASKS)}"
    return {"hf": f"lm_eval --model hf --model_args pretrained={path},dtype=float32,device=cpu "
                  f"--batch_size 1 {tasks}",
            "osd": f"lm_eval --model local-completions --model_args model=osd,base_url={url}/v1/completions,"
                   f"tokenizer_backend=huggingface,tokenizer={path},num_concurrent=1 {tasks}"}


def render_markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    rows = []
    for task in TASKS:
        h, o, c = (result[k]["tasks"][task] if k != "comparison" else result[k][task]
                   for k in ("hf", "osd", "comparison"))
        scores = ", ".join(f"{k.split(',')[0]}[{k.split(',')[1]}] {v:.3f}" for k, v in sorted(h["metrics"].items()))
        same = (f"{c['same_generations']}/{c['samples']} generations identical" if "same_generations" in c else
                f"{c['loglikelihoods']} log-likelihoods within {c['max_abs_diff']:.1e}")
        mal = o.get("server", {}).get("mean_acceptance_length")
        rows.append([task, c["samples"], scores, "yes" if c["metrics_equal"] else "NO", same,
                     f"{h['seconds']:.1f}", f"{o['seconds']:.1f}", f"{h['seconds'] / o['seconds']:.2f}x",
                     f"{mal:.2f}" if mal else "-"])
    gen = result.get("generated_tokens", {})
    speed = (f" Generation: {gen['hf']} tokens, {gen['hf'] / result['hf']['tasks']['osd_gsm8k_slice']['seconds']:.1f} "
             f"tok/s in-process HF, {gen['osd'] / result['osd']['tasks']['osd_gsm8k_slice']['seconds']:.1f} tok/s "
             "through the endpoint (prefill and HTTP included)." if gen else "")
    return "\n".join([
        f"## lm-eval against the endpoint and in-process (`make bench-lm-eval`, {env['date']})",
        "",
        (f"EleutherAI lm-evaluation-harness {cfg['lm_eval']}: `local-completions` against the osd endpoint "
         f"({cfg['endpoint']}; the service's engine: suffix speculation fused with the self-draft) next to `hf` "
         f"in-process, both on the packaged SmolLM2-135M in float32 with {cfg['threads']} torch threads, task by "
         f"task one after the other on {env['cpu_count']} cores (torch {env['torch']}). Tasks from bench/lm_eval_tasks (local "
         "JSONL): a GSM8K test slice, 2-shot, greedy, 64 new tokens (generate_until), and the same questions as "
         "4-way multiple choice (loglikelihood: `echo` + `logprobs` requests). Time: each task's evaluation, "
         f"model load and deploy excluded.{speed}"),
        "",
        table(["task", "docs", "scores (both sides)", "scores identical", "per sample", "hf s", "osd s",
               "osd speed-up", "osd mean acceptance length"], rows),
    ])


# --------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lm-eval and datasets must find everything locally
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.chdir(ROOT)  # the task YAMLs name their data relative to the repository root
    import lm_eval

    from bench.serve import deployed_endpoint
    from osd.models.loading import resolve_model_path

    if args.rebuild_data or not (DATA_DIR / "gsm8k_mc.jsonl").exists():
        build_task_data()
    path = plain_model_dir(resolve_model_path("smollm2"))  # both sides: the same weights and tokenizer files
    say = lambda text: print(text, flush=True)
    started = time.perf_counter()
    if args.url:
        url, deploy = args.url.rstrip("/"), None
        hf, osd = run_sides(url, path, args.threads, args.limit, say)
    else:
        args.target, args.draft = "smollm2", "self"  # what deployed_endpoint reports
        with deployed_endpoint(args, 1, say, config_builder=app_config_builder(args.threads)) as (url, _, info):
            hf, osd = run_sides(url, path, args.threads, args.limit, say)
            deploy = info["deploy_s"]
    result = {"benchmark": "lm_eval", "environment": environment(),
              "config": {"lm_eval": lm_eval.__version__, "model": path, "dtype": "float32", "threads": args.threads,
                         "limit": args.limit, "tasks": list(TASKS), "tolerance": args.tolerance,
                         "endpoint": "given with --url" if args.url else "Ray Serve, one replica"},
              "commands": commands(path, url if args.url else "http://127.0.0.1:8000"),
              "deploy_s": deploy, "total_s": time.perf_counter() - started, "hf": hf, "osd": osd,
              "comparison": compare(hf, osd, args.tolerance),
              "generated_tokens": {"hf": generated_tokens(hf, path), "osd": generated_tokens(osd, path)}}
    out = write_json(args.out, "lm_eval", result)
    markdown = render_markdown(result)
    print("\n" + markdown + f"\n\nresults: {out}")
    if args.doc:
        print(f"table:   {update_doc_section(args.doc, 'lm_eval', markdown)}")
    print("\nthe same runs with lm-eval's CLI (from the repository root):\n  " + "\n  ".join(result["commands"].values()))
    agree = all(c["agree"] for c in result["comparison"].values())
    print("\nverdict: " + ("the endpoint's scores and samples equal in-process HF's" if agree else
                           "DISAGREEMENT: see comparison in the results"))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side (default 2)")
    p.add_argument("--limit", type=int, default=None, help="docs per task (default: all, 20)")
    p.add_argument("--url", default=None, help="an osd endpoint already running (default: deploy one on a local Ray)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest log-likelihood difference accepted")
    p.add_argument("--out", default="bench/results", help="directory for lm_eval.json")
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown to update with the table ('' for none)")
    p.add_argument("--rebuild-data", action="store_true", help="rewrite bench/lm_eval_tasks/data from osd/data/questions")
    p.add_argument("--redis-url", default=None, help="Redis for the deployed app (default: an embedded one)")
    p.add_argument("--deploy-timeout", type=float, default=600.0, help="bound on the deploy (model load)")
    args = p.parse_args(argv)
    result = run(args)
    return 0 if all(c["agree"] for c in result["comparison"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
